"""A training run's exported towers as an encoder (``{name: checkpoint, model: RUN}``): the
same featurizers the run read, then the towers, give the embeddings the model gives its
stored inputs; a run directory resolves to its best checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from features.store import FeatureStore
from jobs.demo import corpus as synthetic
from jobs.pretrain.arrays import dense
from jobs.pretrain.config import parse_config
from jobs.pretrain.data import feature_set_info, with_recorded_vocabulary
from jobs.pretrain.encoder import export_dir
from jobs.pretrain.model import ContrastiveModel, export_towers
from pipelines.build import build, encode_only
from pipelines.encoders import EncoderConfig, get_encoder
from pipelines.errors import SpecError
from tests.helpers import make_spec

INPUTS = {
    "name": "inputs",
    "encoders": [
        {"name": "image_pixels", "params": {"size": 16}},
        {"name": "audio_logmel", "params": {"n_mels": 16, "frames": 24}},
        {"name": "text_ids", "params": {"max_length": 12}},
    ],
}


def _spec(root: Path, *feature_sets: dict):
    source = {"kind": "directory", "uri": str(root / "data"), "class_folders": True}
    return make_spec(root / "store", [source], encode={"feature_sets": [INPUTS, *feature_sets]})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_session):
    """A built store and a run directory whose towers were exported at steps 3 and 5, with
    step 3 recorded as the best validation."""
    root = tmp_path_factory.mktemp("trained")
    synthetic.write_directory_source(root / "data", n_per_class=2, seed=9)
    build(_spec(root))
    store = FeatureStore(str(root / "store"))
    info = feature_set_info(store, "inputs", None)
    cfg = parse_config(
        {
            "store": str(root / "store"),
            "feature_set": "inputs",
            "modalities": {
                "image": {"kind": "cnn", "input": "image_pixels", "channels": [8], "out_dim": 8},
                "audio": {
                    "kind": "cnn",
                    "input": "audio_logmel",
                    "channels": [8],
                    "normalize": "cmvn",
                    "out_dim": 8,
                },
                "text": {"kind": "transformer", "width": 16, "heads": 2, "out_dim": 8},
            },
        }  # fmt: skip
    )
    cfg = with_recorded_vocabulary(info, cfg)
    shapes = {c: info.shape(c) for c in ("image_pixels", "audio_logmel", "text_ids")}
    meta = {"config": cfg.public_dict(), "shapes": shapes, "feature_set": "inputs",
            "version": info.version, "encoders": info.encoders()}  # fmt: skip
    models = {}
    for step, seed in ((3, 1), (5, 2)):
        torch.manual_seed(seed)
        models[step] = ContrastiveModel(cfg, shapes).eval()
        checkpoint = root / "run" / f"checkpoint_step{step:07d}"
        export_towers(models[step], checkpoint / "export", meta)
        rows = [{"step": 2, "best_step": 2}, {"step": step, "best_step": 3}]
        (checkpoint / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, store, models[3]


def test_a_run_directory_resolves_to_its_best_exported_checkpoint(trained):
    root, _, _ = trained
    assert export_dir(root / "run") == root / "run" / "checkpoint_step0000003" / "export"
    last = root / "run" / "checkpoint_step0000005"
    assert export_dir(last) == last / "export"
    assert export_dir(last / "export") == last / "export"
    with pytest.raises(SpecError, match="holds no exported towers"):
        export_dir(root / "data")


@pytest.fixture(scope="module")
def encoded(trained):
    """``mmfp encode``'s path with the run as the encoder of a feature set ``trained``."""
    root, _, _ = trained
    checkpoint = {"name": "checkpoint", "model": str(root / "run")}
    return encode_only(_spec(root, {"name": "trained", "encoders": [checkpoint]}), "trained")


def test_mmfp_encode_with_the_towers_gives_the_models_embeddings(trained, encoded):
    root, store, model = trained
    result = encoded
    rows = store.to_arrow("features/trained").sort_by("sample_id")
    inputs = store.to_arrow("features/inputs").sort_by("sample_id")
    assert result.feature_counts["trained"] == rows.num_rows == inputs.num_rows
    for modality, column in (("image", "image_pixels"), ("audio", "audio_logmel"),
                             ("text", "text_ids")):  # fmt: skip
        x, present = dense(inputs.column(column), store_shape(store, column), np.float32)
        if column == "text_ids":
            x = x.astype(np.int64)
        want = model.encode(modality, torch.as_tensor(x[present])).detach().numpy()
        got, has = dense(rows.column(f"{modality}_emb"), [8], np.float32)
        assert has.tolist() == present.tolist()  # a row missing the modality stays null
        np.testing.assert_allclose(got[has], want, atol=1e-5)
    recorded = feature_set_info(store, "trained", None).meta.encoders[0]
    assert recorded.model == str(root / "run" / "checkpoint_step0000003" / "export")  # the run


def store_shape(store: FeatureStore, column: str) -> list[int]:
    return feature_set_info(store, "inputs", None).shape(column)


def test_the_towers_embed_free_text_and_refuse_a_missing_tower(trained):
    root, _, model = trained
    encoder = get_encoder(EncoderConfig(name="checkpoint", model=str(root / "run")))
    got = encoder.embed_texts(["a red circle"])
    ids = encoder.preprocess(pa.table({"text": ["a red circle"]}))["text_ids"]
    want = model.encode("text", torch.as_tensor(ids)).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(SpecError, match="has no video tower; it has: audio, image, text"):
        get_encoder(
            EncoderConfig(name="checkpoint", model=str(root / "run"),
                          params={"modalities": ["video"]})
        )  # fmt: skip
    with pytest.raises(SpecError, match="needs `model`"):
        get_encoder(EncoderConfig(name="checkpoint"))


def test_mmfp_search_embeds_a_text_query_with_the_trained_towers(trained, encoded):
    """A built-in encoder, so no --trust-store-code: text -> audio in the trained space."""
    from typer.testing import CliRunner

    from features.search import search
    from jobs.cli import app

    root, store, _ = trained
    out = CliRunner().invoke(
        app, ["search", "trained", "--text", "a red circle", "--column", "audio_emb",
              "--store", store.uri],
        env={"COLUMNS": "250"},  # wide enough for whole sample ids
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    encoder = get_encoder(EncoderConfig(name="checkpoint", model=str(root / "run")))
    query = encoder.embed_texts(["a red circle"])[0]
    top = search(store, "trained", column="audio_emb", vector=query, k=1)
    assert top.column("sample_id")[0].as_py()[:12] in out.output  # the same nearest audio


def test_user_code_named_by_an_export_is_imported_only_with_trust(trained, tmp_path):
    """An export's JSON names the encoders its inputs came from: a hostile one naming
    ``module:Class`` is refused unless the spec trusts it, and a store encoded with
    that trust is searched only with --trust-store-code."""
    import shutil

    root, store, _ = trained
    export = shutil.copytree(export_dir(root / "run"), tmp_path / "export")
    described = json.loads((export / "text.json").read_text())
    for entry in described["encoders"]:
        entry["config"]["name"] = "hostile_plugin:Encoder"
    (export / "text.json").write_text(json.dumps(described))
    encoder = get_encoder(EncoderConfig(name="checkpoint", model=str(export)))
    with pytest.raises(SpecError, match="code named only by the export's files"):
        encoder.embed_texts(["a red circle"])
    trusting = EncoderConfig(name="checkpoint", model=str(export), params={"trust_code": True})
    with pytest.raises(SpecError, match="cannot import encoder 'hostile_plugin:Encoder'"):
        get_encoder(trusting).embed_texts(["a red circle"])  # it did try: the spec said so


def test_a_store_encoded_with_trust_code_is_searched_only_with_trust(trained):
    from features.errors import StoreError
    from pipelines.encode import embed_query

    root, store, _ = trained
    checkpoint = {"name": "checkpoint", "model": str(root / "run"), "params": {"trust_code": True}}
    encode_only(_spec(root, {"name": "trusting", "encoders": [checkpoint]}), "trusting")
    with pytest.raises(StoreError, match="--trust-store-code"):
        embed_query(store, "trusting", text="a red circle")
    assert embed_query(store, "trusting", text="a red circle", trust_store_code=True).shape == (8,)
