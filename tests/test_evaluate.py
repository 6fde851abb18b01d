"""jobs.evaluate on a checkpoint trained in-process (no Ray): recall, zero-shot, files, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from features.store import FeatureStore
from jobs.demo.synthetic_features import write_synthetic_feature_set
from jobs.evaluate import evaluate, plot_curves
from jobs.pretrain import checkpoint as ckpt
from jobs.pretrain.arrays import to_tensors
from jobs.pretrain.config import parse_config
from jobs.pretrain.data import feature_set_info, tower_inputs
from jobs.pretrain.loss import contrastive_loss
from jobs.pretrain.model import ContrastiveModel
from jobs.pretrain.train import run_meta
from pipelines.errors import SpecError


def _train_checkpoint(store: FeatureStore, directory: Path, modalities: tuple[str, ...]) -> Path:
    """A few hundred plain PyTorch steps on the train split, saved in the trainer's layout."""
    cfg = parse_config(
        {
            "store": store.uri,
            "feature_set": "syn",
            "modalities": {
                m: {"kind": "projection", "input": f"{m}_emb", "hidden": 64, "out_dim": 32}
                for m in modalities
            },
        }
    )
    info = feature_set_info(store, "syn", None)
    arrays = to_tensors(
        store.to_arrow("features/syn", info.version),
        inputs=tower_inputs(info, cfg),
        split="train",
        include_views=False,
    )
    torch.manual_seed(0)
    model = ContrastiveModel(cfg, {t.input: info.shape(t.input) for t in cfg.modalities.values()})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = len(arrays[f"has_{modalities[0]}"])
    history = []
    for step in range(200):
        idx = torch.randperm(rows)[:48]
        batch = {k: torch.as_tensor(v)[idx] for k, v in arrays.items()}
        out = model(batch)
        feats = {m: out[m] for m in modalities}
        present = {m: batch[f"has_{m}"] for m in modalities}
        loss, _ = contrastive_loss(
            feats, present, cfg.modality_pairs, kind="infonce", scale=out["scale"]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 49:
            history.append({"epoch": len(history) + 1, "train_loss": float(loss.detach())})
    meta = run_meta(store, info, cfg, steps_per_epoch=50, train_rows=rows, has_val=True)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": {},
        "scaler": {},
        "step": 200,
        "running": {},
        "history": history,
        "meta": meta,
    }
    ckpt.save_checkpoint(directory, state)
    return directory


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    store = FeatureStore(str(tmp_path_factory.mktemp("evalstore")))
    write_synthetic_feature_set(store, "syn", per_class=20, missing=0.1, files=1)
    return store


@pytest.fixture(scope="module")
def checkpoint(store, tmp_path_factory) -> Path:
    return _train_checkpoint(store, tmp_path_factory.mktemp("ck"), ("audio", "image", "text"))


def test_recall_zero_shot_and_files(checkpoint):
    result = evaluate(checkpoint, split="test")
    assert result.rows == 40
    assert set(result.pair_rows) == {"audio-image", "audio-text", "image-text"}
    assert all(n < 40 for n in result.pair_rows.values())  # rows missing a modality drop out
    assert len(result.recall) == 3 * 2 * 4  # pairs x directions x (3 k + class-match)
    assert set(result.means) == {"mean_r@1", "mean_class_r@1"}
    # the synthetic classes are easy: a nearest item of the other modality shares its class
    assert result.means["mean_class_r@1"] >= result.means["mean_r@1"]
    for direction, value in result.recall.items():
        if direction.endswith("r@1"):
            assert value > 0.15, direction  # chance is ~1/35
    assert set(result.zero_shot) == {"audio", "image"}
    assert all(acc > 0.5 for acc in result.zero_shot.values()), result.zero_shot
    assert "mean text-tower embedding" in result.zero_shot_note
    assert set(result.probes) == {"audio", "image", "text"}  # every tower's frozen features
    for modality, probe in result.probes.items():
        assert set(probe) == {"knn@5", "linear"}
        assert all(acc > 0.5 for acc in probe.values()), (modality, probe)  # chance is 0.1

    saved = json.loads((checkpoint / "eval_test.json").read_text())
    assert saved["recall"] == result.recall
    table = pq.read_table(checkpoint / "eval_test.parquet").to_pylist()
    assert {row["direction"] for row in table} == {
        "audio->image", "image->audio", "audio->text", "text->audio", "image->text", "text->image",
    }  # fmt: skip
    assert (checkpoint / "curves.png").stat().st_size > 1000


def test_zero_shot_is_skipped_without_a_text_tower(store, tmp_path):
    directory = _train_checkpoint(store, tmp_path / "ck", ("audio", "image"))
    result = evaluate(directory, split="val", out_dir=tmp_path / "out")
    assert result.zero_shot == {}
    assert result.zero_shot_note.startswith("skipped: no text tower")
    assert (tmp_path / "out" / "eval_val.json").is_file()


def test_not_a_checkpoint_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="not an mmfp training checkpoint"):
        evaluate(tmp_path)


def test_plot_needs_history(tmp_path):
    assert plot_curves([], tmp_path / "x.png") is None
    rows = [{"epoch": 1, "train_loss": 2.0, "val/image->text/r@1": 0.1}]
    assert plot_curves(rows, tmp_path / "x.png") == tmp_path / "x.png"


def test_cli_prints_a_recall_table_and_exits_2_on_user_errors(checkpoint, tmp_path):
    from jobs.cli_train import app

    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(checkpoint), "--split", "val"])
    assert result.exit_code == 0, result.output
    assert "image->text" in result.output
    assert "zero-shot accuracy" in result.output
    bad = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert bad.exit_code == 2
    assert "not an mmfp training checkpoint" in bad.output
    config = tmp_path / "bad.yaml"
    config.write_text("feature_set: syn\nmodalities: {image: {kind: nope, input: image_emb}}\n")
    bad = runner.invoke(app, ["train", str(config)])
    assert bad.exit_code == 2
    assert "modalities.image" in bad.output


def test_export_embeddings_writes_every_split_through_every_tower(checkpoint, store, monkeypatch):
    """A batch at a time (16 rows here), so a split larger than memory streams through."""
    from jobs import evaluate
    from jobs.cli_train import app

    monkeypatch.setattr(evaluate, "EMBEDDING_BATCH", 16)
    out = CliRunner().invoke(
        app, ["evaluate", str(checkpoint), "--split", "val", "--export-embeddings"]
    )
    assert out.exit_code == 0, out.output
    state = ckpt.load_state(checkpoint)
    meta = state["meta"]
    info = feature_set_info(store, meta["feature_set"], meta["version"])
    for split in ("train", "val", "test"):
        assert f"embeddings {split}: " in out.output
        table = pq.read_table(checkpoint / f"embeddings_{split}.parquet")
        originals = store.to_arrow(
            info.table, info.version, columns=["sample_id", "split", "view"]
        ).to_pylist()
        want = sorted(r["sample_id"] for r in originals if r["split"] == split and r["view"] == -1)
        assert sorted(table.column("sample_id").to_pylist()) == want
        assert set(table.column("split").to_pylist()) == {split}
        groups = pq.ParquetFile(checkpoint / f"embeddings_{split}.parquet").num_row_groups
        assert groups >= table.num_rows // 16  # written as it was read
        for m in ("audio", "image", "text"):
            emb = table.column(f"{m}_emb")
            present = [v for v in emb.to_pylist() if v is not None]
            assert 0 < len(present) <= table.num_rows  # rows missing the modality are null
            norms = np.linalg.norm(np.array(present, dtype=np.float32), axis=1)
            np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # the towers' normalised output
