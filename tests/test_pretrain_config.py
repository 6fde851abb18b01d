"""TrainConfig validation, feature-set checks and dense batches: no Ray, no training."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.errors import StoreError
from features.metadata import FeatureSetMeta
from features.schema import list_of
from features.store import FeatureStore
from jobs.demo.synthetic_features import write_synthetic_feature_set
from jobs.pretrain.arrays import dense, to_tensors
from jobs.pretrain.config import load_config, parse_config
from jobs.pretrain.data import (
    check_compatible,
    check_towers,
    count_rows,
    feature_set_info,
    tower_inputs,
    with_recorded_vocabulary,
)
from pipelines.errors import SpecError

EXAMPLE = """
name: clip-small
store: store                 # relative: next to this file
feature_set: syn
version: null                # latest at start, then pinned
modalities:
  image: {kind: projection, input: image_emb, hidden: 64, out_dim: 32}
  text: {kind: projection, input: text_emb, hidden: 64, out_dim: 32}
  audio: {kind: cnn, input: audio_logmel, channels: [8, 16], out_dim: 32}
pairs: {anchor: image}
loss: siglip
optimizer: {lr: 0.001, weight_decay: 0.05}
epochs: 3
batch_size: 16
"""


def _raw(**over):
    raw = {
        "feature_set": "syn",
        "modalities": {
            "image": {"kind": "projection", "input": "image_emb"},
            "text": {"kind": "projection", "input": "text_emb"},
        },
    }
    raw.update(over)
    return raw


def test_yaml_example_loads_and_resolves_paths(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(EXAMPLE)
    cfg = load_config(path)
    assert cfg.store == str(tmp_path / "store")
    assert cfg.run_storage_path == str(tmp_path / "store" / "_train")
    assert cfg.loss.kind == "siglip"
    assert cfg.modality_pairs == [("image", "audio"), ("image", "text")]
    assert cfg.embed_dim == 32


def test_all_pairs_are_every_combination():
    cfg = parse_config(
        _raw(
            modalities={
                m: {"kind": "projection", "input": f"{m}_emb"} for m in ("text", "image", "audio")
            }
        )
    )
    assert cfg.modality_pairs == [("audio", "image"), ("audio", "text"), ("image", "text")]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"epochz": 3}, "epochz: unknown field"),
        ({"loss": {"kind": "triplet"}}, "loss.kind"),
        (
            {"modalities": {"image": {"kind": "projection", "input": "image_emb", "hiden": 3}}},
            "hiden",
        ),
        ({"modalities": {"image": {"kind": "gru", "input": "image_emb"}}}, "modalities.image"),
        (
            {
                "modalities": {
                    "image": {"kind": "projection", "input": "text_emb"},
                    "text": {"kind": "projection", "input": "text_emb"},
                }
            },
            "modalities.image.input 'text_emb' is not a image column",
        ),
        (
            {
                "modalities": {
                    "image": {"kind": "projection", "input": "image_emb", "out_dim": 64},
                    "text": {"kind": "projection", "input": "text_emb"},
                }
            },
            "same out_dim",
        ),
        ({"pairs": {"anchor": "audio"}}, "pairs.anchor 'audio' has no tower"),
        ({"batch_size": 1}, "batch_size"),
    ],
)
def test_bad_configs_name_the_field(change, expected):
    with pytest.raises(SpecError, match="invalid train config") as info:
        parse_config(_raw(**change), origin="t.yaml")
    assert expected in str(info.value)


def test_projection_needs_an_embedding_column():
    raw = _raw(
        modalities={
            "image": {"kind": "projection", "input": "image_pixels"},
            "text": {"kind": "projection", "input": "text_emb"},
        }
    )
    with pytest.raises(SpecError, match=r"embedding column \(\*_emb\)"):
        parse_config(raw)


def test_hf_tower_needs_config_or_path():
    raw = _raw(
        modalities={
            "image": {"kind": "hf", "input": "image_pixels"},
            "text": {"kind": "projection", "input": "text_emb"},
        }
    )
    with pytest.raises(SpecError, match="exactly one of"):
        parse_config(raw)


def test_public_dict_redacts_secrets():
    cfg = parse_config(_raw(storage_options={"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_REGION": "x"}))
    assert cfg.public_dict()["storage_options"] == {
        "AWS_SECRET_ACCESS_KEY": "***",
        "AWS_REGION": "x",
    }
    assert "s3cr3t" not in json.dumps(cfg.public_dict())


# ---- dense batches --------------------------------------------------------------


def test_dense_fills_nulls_and_reports_presence():
    col = pa.array([[1.0, 2.0, 3.0, 4.0], None, [5.0, 6.0, 7.0, 8.0]], list_of(pa.float32()))
    x, present = dense(col, [2, 2], np.float32)
    assert x.shape == (3, 2, 2)
    assert present.tolist() == [True, False, True]
    assert x[1].sum() == 0
    assert x[2].tolist() == [[5, 6], [7, 8]]


def test_dense_refuses_rows_of_the_wrong_length():
    col = pa.array([[1.0, 2.0], [1.0]], list_of(pa.float32()))
    with pytest.raises(StoreError, match="shape"):
        dense(col, [2], np.float32)


def test_to_tensors_filters_split_and_views():
    table = pa.table(
        {
            "split": ["train", "train", "val", "train"],
            "view": pa.array([-1, 0, -1, -1], pa.int32()),
            "image_emb": pa.array([[1.0], [2.0], [3.0], None], list_of(pa.float32())),
        }
    )
    inputs = {"image": ("image_emb", [1], "float32")}
    out = to_tensors(table, inputs=inputs, split="train", include_views=False)
    assert out["x_image"][:, 0].tolist() == [1.0, 0.0]
    assert out["has_image"].tolist() == [True, False]
    out = to_tensors(table, inputs=inputs, split="train", include_views=True)
    assert out["x_image"][:, 0].tolist() == [1.0, 2.0, 0.0]


# ---- feature-set checks ---------------------------------------------------------


@pytest.fixture(scope="module")
def syn_store(tmp_path_factory):
    store = FeatureStore(str(tmp_path_factory.mktemp("cfgstore")))
    write_synthetic_feature_set(store, "syn", per_class=4, inputs=True, files=1)
    return store


def test_towers_are_checked_against_the_feature_set(syn_store):
    info = feature_set_info(syn_store, "syn", None)
    cfg = parse_config(
        _raw(
            modalities={
                "image": {"kind": "cnn", "input": "image_pixels"},
                "text": {"kind": "transformer", "vocab_size": 64},
            }
        )
    )
    check_towers(info, cfg)
    assert tower_inputs(info, cfg) == {
        "image": ("image_pixels", [3, 8, 8], "float32"),
        "text": ("text_ids", [12], "int32"),
    }
    bad = parse_config(
        _raw(
            modalities={
                "image": {"kind": "projection", "input": "image_embedding_emb"},
                "text": {"kind": "projection", "input": "text_emb"},
            }
        )
    )
    with pytest.raises(SpecError, match="modalities.image.input: feature set 'syn'.*no column"):
        check_towers(info, bad)
    mels = info.shape("audio_logmel")[0]
    too_many = parse_config(_raw(modalities={
        "audio": {"kind": "tdnn", "input": "audio_logmel", "n_mfcc": mels + 1},
        "image": {"kind": "cnn", "input": "image_pixels"},
    }))  # fmt: skip
    with pytest.raises(SpecError, match=f"n_mfcc: {mels + 1} coefficients from {mels} mel bins"):
        check_towers(info, too_many)


def test_text_towers_take_the_recorded_vocabulary(syn_store):
    """vocab_size and pad_id come from what the feature set records; a smaller vocabulary
    than recorded is refused before a worker's embedding would crash on an id."""
    info = feature_set_info(syn_store, "syn", None)
    text = {"kind": "transformer", "width": 16, "heads": 2}
    cfg = parse_config(_raw(modalities={"image": {"kind": "cnn", "input": "image_pixels"},
                                        "text": text}))  # fmt: skip
    resolved = with_recorded_vocabulary(info, cfg).modalities["text"]
    assert (resolved.vocab_size, resolved.pad_id) == (64, 0)
    bigger = parse_config(_raw(modalities={"image": {"kind": "cnn", "input": "image_pixels"},
                                           "text": {**text, "vocab_size": 100}}))  # fmt: skip
    assert with_recorded_vocabulary(info, bigger).modalities["text"].vocab_size == 100
    small = parse_config(_raw(modalities={"image": {"kind": "cnn", "input": "image_pixels"},
                                          "text": {**text, "vocab_size": 10}}))  # fmt: skip
    with pytest.raises(SpecError, match="vocab_size: 10 is smaller than the 64 ids"):
        with_recorded_vocabulary(info, small)


def test_a_table_without_feature_set_metadata_is_refused(tmp_path):
    store = FeatureStore(str(tmp_path))
    store.ensure_table("features/raw", schema=pa.schema([pa.field("sample_id", pa.string())]))
    with pytest.raises(StoreError, match=FeatureSetMeta.KEY):
        feature_set_info(store, "raw", None)


def test_compatibility_names_every_changed_column(syn_store):
    info = feature_set_info(syn_store, "syn", None)
    cols = ["image_emb", "text_emb"]
    previous = {
        "feature_set": "syn",
        "version": 0,
        "signature": info.signature(cols),
        "checkpoint": "ck",
    }
    check_compatible(previous, info, cols)  # same signature: fine
    previous["signature"]["image_emb"]["shape"] = [64]
    previous["signature"]["text_emb"]["config_hash"] = "old"
    with pytest.raises(SpecError, match="refusing to resume ck") as err:
        check_compatible(previous, info, cols)
    message = str(err.value)
    assert "image_emb shape: checkpoint [64]" in message
    assert "feature set v" in message
    assert "text_emb config_hash: checkpoint 'old'" in message
    with pytest.raises(SpecError, match="trained on feature set 'other'"):
        check_compatible({**previous, "feature_set": "other"}, info, cols)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    present=st.lists(st.booleans(), min_size=0, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_dense_round_trips_flattened_rows(shape, present, seed):
    """Law: dense(flatten(x), shape) == x on present rows, zeros elsewhere, mask == present."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(present), *shape)).astype(np.float32)
    rows = [x[i].ravel().tolist() if p else None for i, p in enumerate(present)]
    got, mask = dense(pa.array(rows, list_of(pa.float32())), shape, np.float32)
    assert mask.tolist() == present
    want = np.where(np.array(present, bool).reshape(-1, *[1] * len(shape)), x, 0)
    np.testing.assert_array_equal(got, want.reshape(len(present), *shape))


def test_search_spaces_parse_numbers_and_values_go_into_shorthand_sections():
    from jobs.pretrain.tune import parse_space, with_values

    (uniform, choice) = parse_space(["loss.supervised_weight=uniform:0:0.5",
                                     "batch_size=choice:32,64"])  # fmt: skip
    assert uniform.args == (0.0, 0.5)
    assert all(isinstance(a, float) for a in uniform.args)  # Tune's uniform of two ints fails
    assert choice.args == (32, 64)
    raw = {"feature_set": "syn", "loss": "siglip"}
    full = {"feature_set": "syn", "loss": {"kind": "siglip", "supervised_weight": 0.0}}
    out = with_values(raw, {"loss.supervised_weight": 0.3, "optimizer.lr": 0.01}, full)
    assert out == {"feature_set": "syn", "loss": {"kind": "siglip", "supervised_weight": 0.3},
                   "optimizer": {"lr": 0.01}}  # fmt: skip
    assert raw["loss"] == "siglip"  # the user's data is left alone


def test_a_store_another_delta_writer_rewrote_still_filters(tmp_path):
    """delta-rs ``delete`` rewrites a file with string_view columns; split filters, stored
    query vectors and sample lookups read it like any other file."""
    from features.search import search
    from pipelines.build.in_process import stored_rows

    store = FeatureStore(str(tmp_path))
    write_synthetic_feature_set(store, "syn", per_class=4, files=2)
    rows = store.to_arrow("features/syn", columns=["sample_id", "split", "view"])
    train = [r for r in rows.to_pylist() if r["split"] == "train" and r["view"] == -1]
    gone, kept = train[0]["sample_id"], train[1]["sample_id"]
    store.delta("features/syn").delete(f"sample_id = '{gone}'")
    info = feature_set_info(store, "syn", None)
    assert count_rows(store, info, "train", include_views=False) == len(train) - 1
    hits = search(store, "syn", column="image_emb", sample_id=kept, k=50)  # all but kept
    assert sorted(hits.column("sample_id").to_pylist()) == sorted(
        r["sample_id"] for r in rows.to_pylist() if r["sample_id"] not in (kept, gone)
    )
    todo = pa.table({"sample_id": [kept, gone]})
    (found,) = stored_rows(store, "features/syn", ["sample_id"], todo, 100)
    assert found.column("sample_id").to_pylist() == [kept]


def test_a_run_keeps_the_duplicates_version_it_started_with(tmp_path):
    from features.duplicates import write_duplicates
    from features.schema import DUPLICATES, conform
    from features.tables import TableStore
    from jobs.pretrain.train import pinned_duplicates

    store = TableStore(str(tmp_path / "store"))
    excluding = parse_config(_raw(exclude_duplicates=True))
    assert pinned_duplicates(store, excluding, None) is None  # never searched
    row = {"sample_id": "dup", "duplicate_of": "kept", "samples_version": 1}
    for _ in range(2):
        write_duplicates(
            store, conform(pa.Table.from_pylist([row]), DUPLICATES), samples_version=1, run_id="r"
        )
    latest = store.version("duplicates")
    assert pinned_duplicates(store, excluding, None) == latest  # a new run: the latest
    assert pinned_duplicates(store, excluding, {"duplicates_version": 1}) == 1  # resumed
    assert pinned_duplicates(store, parse_config(_raw()), None) is None  # not excluding


def test_training_reads_leave_excluded_samples_out(syn_store):
    info = feature_set_info(syn_store, "syn", None)
    train = syn_store.to_arrow(info.table, columns=["sample_id", "split", "view"])
    ids = [r["sample_id"] for r in train.to_pylist() if r["split"] == "train"]
    everything = count_rows(syn_store, info, "train", include_views=False)
    left_out = pa.array(ids[:3] + ["not-a-sample"])
    assert count_rows(syn_store, info, "train", include_views=False, exclude=left_out) == (
        everything - 3
    )
    rows = to_tensors(
        syn_store.to_arrow(info.table),
        inputs={"image": ("image_emb", [48], "float32")},
        split="train",
        include_views=False,
        exclude=left_out,
    )
    assert len(rows["x_image"]) == everything - 3
