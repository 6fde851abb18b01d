"""``mmfp export``: the demo store out as Parquet, WebDataset, a Hugging Face datasets
folder and Lance, read back with each format's own reader and compared to the store."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from features.errors import StoreError
from features.export import MANIFEST, export
from features.store import FeatureStore
from jobs.cli import app


@pytest.fixture(scope="module")
def store(demo) -> FeatureStore:
    workdir, _ = demo
    return FeatureStore(str(workdir / "store"))


def digests(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def stored(store: FeatureStore, splits: set[str] | None = None) -> dict[str, dict]:
    rows = store.to_arrow("samples").to_pylist()
    return {r["sample_id"]: r for r in rows if splits is None or r["split"] in splits}


def embeddings(store: FeatureStore) -> dict[str, dict]:
    rows = store.to_arrow("features/clip").to_pylist()
    return {r["sample_id"]: r for r in rows if r["view"] == -1}


def test_parquet_round_trip_is_the_store_at_that_version(store, tmp_path):
    manifest = export(store, tmp_path / "a", to="parquet", feature_set="clip", shard_rows=40)
    table = pq.read_table(tmp_path / "a")  # the folder, as any Parquet reader opens it
    want, vectors = stored(store), embeddings(store)
    assert table.num_rows == manifest["rows"] == len(want)
    assert len(manifest["files"]) == -(-len(want) // 40)
    got = table.to_pylist()
    assert [r["sample_id"] for r in got] == sorted(want)  # ordered by sample id
    for row in got:
        original = want[row["sample_id"]]
        assert {k: row[k] for k in original} == original  # every column, media bytes too
        assert row["image_emb"] == vectors[row["sample_id"]]["image_emb"]
    recorded = json.loads(table.schema.metadata[b"mmfp.export"])
    assert recorded["versions"] == {"samples": store.version("samples"),
                                    "features/clip": store.version("features/clip")}  # fmt: skip
    assert json.loads((tmp_path / "a" / MANIFEST).read_text()) == manifest
    again = export(store, tmp_path / "b", to="parquet", feature_set="clip", shard_rows=40)
    assert again == manifest
    assert digests(tmp_path / "a") == digests(tmp_path / "b")  # same version, same bytes


def test_webdataset_round_trip_through_its_own_reader(store, tmp_path):
    import webdataset as wds

    manifest = export(store, tmp_path / "a", to="webdataset", feature_set="clip",
                      splits=["train", "val"], shard_rows=25)  # fmt: skip
    want, vectors = stored(store, {"train", "val"}), embeddings(store)
    urls = [str(tmp_path / "a" / name) for name in manifest["files"]]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        original = want[sample["__key__"]]
        info = json.loads(sample["json"])
        assert info["split"] == original["split"]
        assert info["label"] == original["label"]
        assert info["source_uri"] == original["source_uri"]
        extension = {"jpeg": "jpg", "png": "png", "wav": "wav", "flac": "flac"}
        for modality in ("image", "audio"):
            if original[modality] is not None:  # under the extension its format names
                assert sample[extension[original[f"{modality}_format"]]] == original[modality]
        assert sample.get("txt", b"").decode() == (original["text"] or "")
        vector = vectors[sample["__key__"]]["image_emb"]
        if vector is not None:
            got = np.load(io.BytesIO(sample["image_emb.npy"]))
            np.testing.assert_array_equal(got, np.asarray(vector, np.float32))
        seen += 1
    assert seen == manifest["rows"] == len(want)
    export(store, tmp_path / "b", to="webdataset", feature_set="clip", splits=["val", "train"],
           shard_rows=25)  # fmt: skip
    assert digests(tmp_path / "a") == digests(tmp_path / "b")


def test_a_failed_export_leaves_nothing_and_a_user_mistake_is_one_line(store, tmp_path,
                                                                        monkeypatch):  # fmt: skip
    import features.export as module

    calls = {"n": 0}
    real = module._add

    def dies_midway(tar, name, data):  # a kill between two entries of a shard
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        real(tar, name, data)

    monkeypatch.setattr(module, "_add", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        export(store, tmp_path / "out", to="webdataset")
    assert list(tmp_path.iterdir()) == []  # no DEST, no partial folder
    monkeypatch.undo()

    runner = CliRunner()
    result = runner.invoke(app, ["export", str(tmp_path / "x"), "--to", "parquet", "--store",
                                 store.uri, "--feature-set", "nope"])  # fmt: skip
    assert result.exit_code == 2
    assert "no feature set 'nope'" in result.output
    (tmp_path / "taken").mkdir()
    result = runner.invoke(app, ["export", str(tmp_path / "taken"), "--to", "parquet",
                                 "--store", store.uri])  # fmt: skip
    assert result.exit_code == 2
    assert "exists" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "y"), "--to", "parquet", "--split",
                                 "test", "--store", store.uri])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(pq.read_table(tmp_path / "y").column("split").to_pylist()) == {"test"}
    with pytest.raises(StoreError, match="shard_rows"):
        export(store, tmp_path / "z", to="parquet", shard_rows=0)


def test_hf_round_trip_loads_with_datasets_and_is_the_store(store, tmp_path):
    import datasets

    manifest = export(store, tmp_path / "a", to="hf", feature_set="clip",
                      splits=["train", "val"], shard_rows=100)  # fmt: skip
    loaded = datasets.load_from_disk(str(tmp_path / "a"))  # the library's own reader
    assert isinstance(loaded.features["image"], datasets.Image)
    assert isinstance(loaded.features["audio"], datasets.Audio)
    want, vectors = stored(store, {"train", "val"}), embeddings(store)
    assert loaded.num_rows == manifest["rows"] == len(want)
    assert len(loaded.cache_files) == -(-len(want) // 100)
    raw = loaded.cast_column("image", datasets.Image(decode=False))
    raw = raw.cast_column("audio", datasets.Audio(decode=False))  # decoding needs torchcodec
    for row in raw:
        original = want[row["sample_id"]]
        for modality in ("image", "audio"):
            media = row[modality]
            assert (media and media["bytes"]) == original[modality]  # the stored bytes
            if media:
                assert media["path"].startswith(row["sample_id"] + ".")
        assert row["text"] == original["text"]
        assert row["labels"] == original["labels"]
        assert row["image_emb"] == pytest.approx(vectors[row["sample_id"]]["image_emb"])
    with_image = next(i for i, r in enumerate(raw) if r["image"])
    images = loaded.cast_column("audio", datasets.Audio(decode=False))
    picture, sid = images[with_image]["image"], images[with_image]["sample_id"]  # PIL decodes
    assert picture.size == (want[sid]["image_width"], want[sid]["image_height"])
    assert json.loads(loaded.info.description) == {k: manifest[k] for k in manifest
                                                   if k not in ("files", "rows")}  # fmt: skip
    export(store, tmp_path / "b", to="hf", feature_set="clip", splits=["val", "train"],
           shard_rows=100)  # fmt: skip
    assert digests(tmp_path / "a") == digests(tmp_path / "b")  # same version, same bytes


@pytest.mark.parametrize(("to", "module"), [("hf", "datasets"), ("lance", "lance")])
def test_a_format_without_its_library_is_one_clear_error(store, tmp_path, monkeypatch, to, module):
    monkeypatch.setitem(sys.modules, module, None)  # what an install without it sees
    with pytest.raises(StoreError, match=rf"pip install 'mmfp\[{to}\]'"):
        export(store, tmp_path / to, to=to)
    assert list(tmp_path.iterdir()) == []  # neither DIR nor a partial folder


def test_lance_round_trip_is_the_store_and_the_same_rows_each_time(store, tmp_path):
    import lance

    manifest = export(store, tmp_path / "a", to="lance", feature_set="clip", shard_rows=150)
    dataset = lance.dataset(str(tmp_path / "a"))  # the library's own reader
    want, vectors = stored(store), embeddings(store)
    table = dataset.to_table()
    assert table.num_rows == manifest["rows"] == len(want)
    assert len(dataset.get_fragments()) == len(manifest["files"]) == -(-len(want) // 150)
    got = table.to_pylist()
    assert [r["sample_id"] for r in got] == sorted(want)
    for row in got:
        assert {k: row[k] for k in want[row["sample_id"]]} == want[row["sample_id"]]
        assert row["text_emb"] == vectors[row["sample_id"]]["text_emb"]
    recorded = json.loads(dataset.schema.metadata[b"mmfp.export"])
    assert recorded["versions"]["samples"] == store.version("samples")
    again = export(store, tmp_path / "b", to="lance", feature_set="clip", shard_rows=150)
    assert again["rows_sha256"] == manifest["rows_sha256"]  # Lance names its files by UUID
    assert lance.dataset(str(tmp_path / "b")).to_table().equals(table)
