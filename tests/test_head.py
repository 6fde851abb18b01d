"""Fusion heads (``mmfp train CONFIG --head classify``): early, late and attention fusion
over feature sets' embeddings or a run's towers, selection on val, per-modality and
fused accuracy with a confusion matrix, and clear errors for bad configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from features.store import FeatureStore
from jobs.cli_train import app
from jobs.demo.synthetic_features import write_synthetic_feature_set
from jobs.head.config import parse_head_config
from jobs.head.data import load_branches
from jobs.head.fit import evaluate_head, train_head
from pipelines.errors import SpecError


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    """240 rows of 10 classes, three modalities, 10% of rows missing one of them."""
    store = FeatureStore(str(tmp_path_factory.mktemp("headstore")))
    write_synthetic_feature_set(store, "syn", missing=0.1, inputs=True, files=1, seed=4)
    return store


def _config(store: FeatureStore, tmp_path, **over) -> dict:
    raw = {
        "head": "classify", "name": "h", "store": store.uri, "storage_path": str(tmp_path),
        "inputs": [{"feature_set": "syn"}], "epochs": 40, "hidden": 32, "seed": 1,
    }  # fmt: skip
    return raw | over


def test_mmfp_train_head_classifies_and_evaluate_scores_it_again(store, tmp_path):
    path = tmp_path / "head.yaml"
    path.write_text(yaml.safe_dump(_config(store, tmp_path)))
    out = CliRunner().invoke(app, ["train", str(path), "--head", "classify"])
    assert out.exit_code == 0, out.output
    run = tmp_path / "h"
    report = json.loads((run / "eval_test.json").read_text())
    accuracy = report["accuracy"]
    assert set(accuracy) == {"fused", "audio", "image", "text"}
    assert accuracy["fused"] >= 0.8  # ten classes: chance is 0.1
    assert accuracy["fused"] >= max(accuracy[m] for m in ("audio", "image", "text")) - 0.05
    confusion = np.array(report["confusion"])
    assert confusion.shape == (10, 10)
    assert confusion.sum() == report["rows"]  # every scored row once, by its true class
    assert np.trace(confusion) / confusion.sum() == pytest.approx(accuracy["fused"])
    assert (run / "confusion_test.png").stat().st_size > 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = json.loads((run / "head.json").read_text())["best_epoch"]
    accs = [h["val_acc"] for h in history]
    assert accs[best - 1] == max(accs)  # the kept epoch is the best on val
    again = CliRunner().invoke(app, ["evaluate", str(run), "--split", "test"])
    assert again.exit_code == 0, again.output
    assert f"{accuracy['fused']:.3f}" in again.output  # the same head, the same rows


@pytest.mark.parametrize("fusion", ["early", "attention"])
def test_every_fusion_learns_and_classifies_single_modality_rows(store, tmp_path, fusion):
    result = train_head(parse_head_config(_config(store, tmp_path, fusion=fusion, width=16)))
    test = result.accuracy["test"]
    assert test["fused"] >= 0.75  # chance is 0.1
    assert all(test[m] >= 0.4 for m in ("audio", "image", "text"))  # one branch alone


def test_an_ensemble_of_inputs_reports_each_encoder_and_their_modality(store, tmp_path):
    inputs = [
        {"feature_set": "syn", "columns": ["image_emb", "audio_emb"], "name": "a"},
        {"feature_set": "syn", "columns": ["image_emb"], "name": "b"},
    ]
    result = train_head(parse_head_config(_config(store, tmp_path, inputs=inputs)))
    assert set(result.accuracy["test"]) == {"fused", "audio", "image", "a:image", "b:image"}


def test_towers_input_runs_the_towers_over_the_feature_set_they_read(store, tmp_path):
    """Branches of a run's towers are the towers' normalised outputs on the stored inputs."""
    from jobs.pretrain.config import parse_config
    from jobs.pretrain.data import feature_set_info
    from jobs.pretrain.model import ContrastiveModel, export_towers

    info = feature_set_info(store, "syn", None)
    cfg = parse_config({"store": store.uri, "feature_set": "syn", "modalities": {
        "image": {"kind": "cnn", "input": "image_pixels", "channels": [4], "out_dim": 8},
        "audio": {"kind": "cnn", "input": "audio_logmel", "channels": [4], "out_dim": 8},
    }})  # fmt: skip
    shapes = {c: info.shape(c) for c in ("image_pixels", "audio_logmel")}
    torch.manual_seed(0)
    model = ContrastiveModel(cfg, shapes).eval()
    meta = {"config": cfg.public_dict(), "shapes": shapes, "feature_set": "syn",
            "version": info.version, "encoders": info.encoders()}  # fmt: skip
    export_towers(model, tmp_path / "run" / "export", meta)
    config = parse_head_config(_config(store, tmp_path, inputs=[{"model": str(tmp_path / "run")}]))
    data = load_branches(store, config)
    assert sorted(data.x) == ["run:audio", "run:image"]
    rows = store.to_arrow(info.table, columns=["sample_id", "view", "image_pixels"])
    originals = rows.filter(rows.column("view").to_numpy() == -1)
    first = originals.column("sample_id")[0].as_py()
    pixels = torch.tensor([originals.column("image_pixels")[0].as_py()]).reshape(
        1, *shapes["image_pixels"]
    )
    want = model.encode("image", pixels).detach().numpy()[0]
    got = data.x["run:image"][list(data.ids).index(first)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert train_head(config).accuracy["test"]["fused"] > 0.1  # it trains on them


def test_bad_head_configs_are_clear_errors(store, tmp_path):
    with pytest.raises(SpecError, match="no embedding column 'video_emb'"):
        train_head(parse_head_config(_config(store, tmp_path, inputs=[
            {"feature_set": "syn", "columns": ["video_emb"]}])))  # fmt: skip
    with pytest.raises(SpecError, match="select: 'video' is not one of fused, "):
        train_head(parse_head_config(_config(store, tmp_path, select="video")))
    with pytest.raises(SpecError, match="share the name 'syn'"):
        parse_head_config(_config(store, tmp_path, inputs=[{"feature_set": "syn"}] * 2))
    with pytest.raises(SpecError, match="fusion"):
        parse_head_config(_config(store, tmp_path, fusion="sum"))
    out = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nothing"), "--split", "val"])
    assert out.exit_code == 2, out.output  # a user mistake: one line, no traceback
    assert "Traceback" not in out.output


def test_evaluate_refuses_inputs_that_no_longer_match_the_head(store, tmp_path):
    """The branches a head reads again must be the ones it was trained on."""
    inputs = [{"feature_set": "syn", "columns": ["image_emb"]}]
    result = train_head(parse_head_config(_config(store, tmp_path, epochs=2, inputs=inputs)))
    head = json.loads((tmp_path / "h" / "head.json").read_text())
    head["config"]["inputs"][0]["columns"] = ["audio_emb"]
    (tmp_path / "h" / "head.json").write_text(json.dumps(head))
    with pytest.raises(SpecError, match="the head was trained on"):
        evaluate_head(result.run_dir, split="test")
