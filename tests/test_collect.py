"""Listing and reading each kind of source, without Ray: refs, path safety, shards, manifests."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.demo import corpus as synthetic
from pipelines.collect import RefReader, ShardReader
from pipelines.errors import UnsafePath
from pipelines.listing import list_directory, list_shards, manifest_refs, safe_join
from pipelines.spec import DecodeLimits, DirectorySource, ManifestSource, WebDatasetSource

LIMITS = DecodeLimits()


@pytest.mark.parametrize("path", ["../x.png", "a/../../x.png", "/etc/passwd", "s3://b/k.png"])
def test_safe_join_refuses_escapes(path):
    with pytest.raises(UnsafePath):
        safe_join("/data/root", path)


def test_safe_join_keeps_inner_paths():
    assert safe_join("/data/root", "a/./b/../c.png") == "/data/root/a/c.png"


def test_directory_groups_files_by_stem_with_class_folders(tmp_path):
    stems = synthetic.write_directory_source(tmp_path, n_per_class=2)
    (tmp_path / ".DS_Store").write_bytes(b"hidden files are skipped")
    refs = list_directory(
        DirectorySource(kind="directory", uri=str(tmp_path), class_folders=True)
    ).to_pylist()
    assert len(refs) == len(stems)
    first = refs[0]
    assert first["label"] == first["key"].split("/")[-2]
    assert first["label_source"] == "folder"
    assert first["text_uri"].endswith(".txt")


def test_symlink_out_of_the_root_is_refused(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("secret caption")
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("inside caption")
    (root / "b.txt").symlink_to(outside)
    refs = list_directory(DirectorySource(kind="directory", uri=str(root)))
    rows = RefReader({}, LIMITS)(refs).to_pylist()
    by_key = {Path(r["source_uri"]).name: r for r in rows}
    assert by_key["a"]["text"] == "inside caption"
    assert by_key["b"]["error_type"] == "UnsafePath"
    assert by_key["b"]["text"] is None


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_formats_give_the_same_refs(tmp_path, fmt):
    path = synthetic.write_manifest_source(tmp_path, n=6, fmt=fmt)
    source = ManifestSource(kind="manifest", uri=str(path))
    if fmt == "jsonl":
        table = pa.Table.from_pylist([json.loads(line) for line in path.read_text().splitlines()])
    elif fmt == "csv":
        with path.open() as f:
            table = pa.Table.from_pylist(list(csv.DictReader(f)))
    else:
        table = pq.read_table(path)
    refs = manifest_refs(table, source=source, root=str(tmp_path)).to_pylist()
    assert len(refs) == 6
    assert all(r["error_type"] is None for r in refs)
    rows = RefReader({}, LIMITS)(manifest_refs(table, source=source, root=str(tmp_path)))
    assert rows.column("error_type").null_count == 6
    assert set(rows.column("label_source").to_pylist()) == {"manifest"}


def test_manifest_extra_columns_become_metadata(tmp_path):
    source = ManifestSource(kind="manifest", uri=str(tmp_path / "m.jsonl"))
    table = pa.Table.from_pylist([{"text": "a red circle", "photographer": "ann", "score": 3}])
    (ref,) = manifest_refs(table, source=source, root=str(tmp_path)).to_pylist()
    assert json.loads(ref["metadata"]) == {"photographer": "ann", "score": 3}


def test_corrupt_shard_keeps_what_came_before_and_quarantines_the_rest(tmp_path):
    (shard,) = synthetic.write_webdataset_source(tmp_path, n=10, shard_size=10)
    data = shard.read_bytes()
    cut = tmp_path / "cut" / "shard-cut.tar"
    cut.parent.mkdir()
    cut.write_bytes(data[: len(data) // 2])
    source = WebDatasetSource(kind="webdataset", uri=str(cut.parent))
    shards = list_shards(source)
    assert list(shards) == [str(cut)]
    batch = pa.table({"shard": [str(cut)], "fingerprint": [shards[str(cut)]]})
    rows = ShardReader(source, LIMITS)(batch).to_pylist()
    assert {r["input_container"] for r in rows} == {str(cut)}
    errors_ = [r for r in rows if r["error_type"]]
    good = [r for r in rows if not r["error_type"]]
    assert [e["error_type"] for e in errors_].count("CorruptShard") == 1
    assert 0 < len(good) < 10


def test_shard_members_group_by_key_with_labels(tmp_path):
    (shard,) = synthetic.write_webdataset_source(tmp_path, n=4, shard_size=4)
    with tarfile.open(shard) as tar:
        keys = {m.name.split(".")[0] for m in tar.getmembers()}
    source = WebDatasetSource(kind="webdataset", uri=str(shard))
    batch = pa.table({"shard": [str(shard)], "fingerprint": ["fp"]})
    rows = ShardReader(source, LIMITS)(batch).to_pylist()
    assert {r["source_uri"].split("#")[1] for r in rows} == keys
    assert all(r["label"] in synthetic.CLASSES for r in rows)
    assert all(set(r["modalities"]) == {"text", "image", "audio"} for r in rows)
