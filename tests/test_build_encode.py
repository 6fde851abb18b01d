"""Encode in a build: feature sets from featurizers and a tiny CLIP, in actor pools, incremental."""

from __future__ import annotations

import numpy as np
import pytest

from features.store import FeatureStore
from jobs.demo import corpus as synthetic
from jobs.demo import tiny_models as tiny
from pipelines.build import build
from pipelines.errors import SpecError
from tests.helpers import make_spec

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "clip": str(tiny.tiny_clip(root / "clip")),
        "tok": str(tiny.write_tokenizer(root / "tok")),
    }


def _encode(models, *, clip_params=None) -> dict:
    return {
        "feature_sets": [
            {
                "name": "inputs",
                "encoders": [
                    {"name": "image_pixels", "params": {"size": 16}},
                    {"name": "audio_logmel", "params": {"n_mels": 8, "frames": 10}},
                    {"name": "text_ids", "model": models["tok"], "params": {"max_length": 12}},
                ],
            },
            {
                "name": "clip",
                "encoders": [
                    {
                        "name": "clip",
                        "model": models["clip"],
                        "batch_size": 8,
                        "params": clip_params or {},
                    },
                ],  # fmt: skip
            },
            {
                "name": "probe",
                "views": False,
                "encoders": [{"name": "tests.probe_encoder:ProbeEncoder"}],
            },
        ]
    }


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("enc")
    synthetic.write_directory_source(root / "data", n_per_class=1, seed=11)
    spec = make_spec(
        root / "store",
        [{"kind": "directory", "uri": str(root / "data"), "class_folders": True}],
        augment={"views_per_sample": 1, "audio": None, "text": None},
        encode=_encode(models),
    )
    return root, spec, build(spec, kind="refresh", incremental=True)


def test_feature_sets_hold_every_sample_and_view(encoded):
    root, _, result = encoded
    store = FeatureStore(str(root / "store"))
    n_samples = store.to_arrow("samples").num_rows
    n_views = store.to_arrow("views").num_rows
    assert store.to_arrow("features/inputs").num_rows == n_samples + n_views
    assert result.feature_counts == {"inputs": n_samples + n_views, "clip": n_samples + n_views,
                                     "probe": n_samples}  # fmt: skip
    rows = store.to_arrow("features/inputs").to_pylist()
    assert {r["view"] for r in rows} == {-1, 0}
    with_image = [r for r in rows if r["image_pixels"] is not None]
    assert with_image
    assert all(len(r["image_pixels"]) == 3 * 16 * 16 for r in with_image)
    assert all(len(r["audio_logmel"]) == 80 for r in rows if r["audio_logmel"] is not None)
    assert all(len(r["text_ids"]) == 12 for r in rows)
    no_audio = [r for r in rows if "audio" not in r["modalities"]]
    assert no_audio
    assert all(r["audio_logmel"] is None for r in no_audio)


def test_embeddings_are_normalised_and_described(encoded):
    root, _, _ = encoded
    store = FeatureStore(str(root / "store"))
    meta = store.feature_set("clip")
    dim = meta.columns["image_emb"].shape[0]
    assert meta.columns["image_emb"].normalized is True
    assert meta.encoders[0].name == "clip"
    assert len(meta.encoders[0].config_hash or "") == 32
    rows = store.to_arrow("features/clip").to_pylist()
    emb = np.array([r["image_emb"] for r in rows if r["image_emb"] is not None], np.float32)
    assert emb.shape[1] == dim
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)


def test_model_encoders_run_in_an_actor_pool_loading_once(encoded):
    root, _, _ = encoded
    rows = FeatureStore(str(root / "store")).to_arrow("features/probe").to_pylist()
    probes = {tuple(r["text_emb"]) for r in rows}
    assert all(in_actor == 1.0 for _, in_actor, _ in probes)
    assert all(loads == 1.0 for _, _, loads in probes)  # one model load per actor process


def test_encoding_is_deterministic_across_runs(encoded, tmp_path):
    root, spec, _ = encoded
    again = spec.model_copy(update={"store": spec.store.model_copy(update={"uri": str(tmp_path)})})
    build(again)
    first = {
        (r["sample_id"], r["view"]): r["image_emb"]
        for r in FeatureStore(str(root / "store")).to_arrow("features/clip").to_pylist()
    }
    second = {
        (r["sample_id"], r["view"]): r["image_emb"]
        for r in FeatureStore(str(tmp_path)).to_arrow("features/clip").to_pylist()
    }
    assert first.keys() == second.keys()
    keys = [k for k in first if first[k] is not None]
    a = np.array([first[k] for k in keys])
    b = np.array([second[k] for k in keys])
    # batches group rows differently in each run; BLAS sums in another order
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_incremental_encoding_only_encodes_new_samples(encoded):
    root, spec, _ = encoded
    store = FeatureStore(str(root / "store"))
    before = store.to_arrow("features/clip").num_rows
    synthetic.write_directory_source(root / "data" / "more", n_per_class=1, seed=12)
    result = build(spec, kind="refresh", incremental=True)
    new_train = sum(1 for r in store.to_arrow("views").to_pylist() if r["run_id"] == result.run_id)
    assert result.feature_counts["clip"] == result.counts["samples"] + new_train
    assert store.to_arrow("features/clip").num_rows == before + result.feature_counts["clip"]
    nothing = build(spec, kind="refresh", incremental=True)
    assert nothing.feature_counts == {}
    assert not nothing.changed


def test_a_changed_encoder_config_is_refused(encoded, models):
    root, spec, _ = encoded
    from pipelines.encode import EncodeSpec

    changed = spec.model_copy(
        update={"encode": EncodeSpec.model_validate(_encode(models, clip_params={"max_length": 9}))}
    )
    with pytest.raises(SpecError, match="--reencode"):
        build(changed)


def test_reencode_replaces_a_feature_set_as_one_new_version(encoded, models):
    root, spec, _ = encoded
    from pipelines.build import encode_only
    from pipelines.encode import EncodeSpec

    store = FeatureStore(str(root / "store"))
    rows = store.to_arrow("features/clip").num_rows
    changed = spec.model_copy(
        update={"encode": EncodeSpec.model_validate(_encode(models, clip_params={"max_length": 9}))}
    )
    result = encode_only(changed, "clip", reencode=True)
    assert result.feature_counts["clip"] == rows
    assert store.to_arrow("features/clip").num_rows == rows
    before = store.feature_set("clip", result.versions["features/clip"] - 2)
    assert store.feature_set("clip").encoders[0].config_hash != before.encoders[0].config_hash
    again = encode_only(changed, "clip")  # now it matches: nothing to do
    assert not again.changed
    with pytest.raises(SpecError, match="no feature set 'nope'"):
        encode_only(changed, "nope")


def test_search_by_text_uses_the_feature_sets_own_encoder(encoded):
    from features.errors import StoreError
    from features.search import search
    from pipelines.encode import embed_query

    root, _, _ = encoded
    store = FeatureStore(str(root / "store"))
    vector = embed_query(store, "clip", text="a red circle")
    assert vector.shape == tuple(store.feature_set("clip").columns["image_emb"].shape)
    hits = search(store, "clip", column="image_emb", vector=vector, k=3)
    assert hits.num_rows == 3
    scores = hits.column("score").to_pylist()
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(StoreError, match="embeds text"):
        embed_query(store, "inputs", text="x")
