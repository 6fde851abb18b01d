"""RunCommits: one version per table per run, no duplicate keys from concurrent writers,
removals in the same commit."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.commit import RunCommits, write_file
from features.schema import SAMPLES, conform
from features.store import FeatureStore


def _rows(ids: list[str]) -> pa.Table:
    return conform(pa.table({"sample_id": ids, "text": [f"caption {i}" for i in ids]}), SAMPLES)


def _write(store: FeatureStore, ids: list[str], tag: str):
    return write_file(store.table_uri("samples"), {}, _rows(ids), tag)


def _commit(store: FeatureStore, ids: list[str], run_id: str, base: int | None) -> int | None:
    """A run that read ``samples`` at ``base`` and commits ``ids``."""
    run = RunCommits(store, run_id)
    run.base["samples"] = base
    run.add("samples", [_write(store, ids, run_id)])
    return run.commit("samples")


def _ids(store: FeatureStore) -> list[str]:
    return sorted(store.to_arrow("samples", columns=["sample_id"]).column(0).to_pylist())


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    store = FeatureStore(str(tmp_path / "store"))
    store.ensure_table("samples")
    return store


def test_a_run_that_started_earlier_drops_keys_committed_since(store):
    base = store.version("samples")
    assert _commit(store, ["a", "b"], "run1", base) == base + 1
    assert _commit(store, ["b", "c"], "run2", base) == base + 2
    assert _ids(store) == ["a", "b", "c"]
    assert store.history("samples")[0]["rows_added"] == 1


def test_nothing_left_after_dropping_means_no_commit(store):
    base = store.version("samples")
    _commit(store, ["a"], "r1", base)
    assert _commit(store, ["a"], "r2", base) is None
    assert store.version("samples") == base + 1


def test_concurrent_writers_never_duplicate_a_key(store):
    base = store.version("samples")
    runs = [[f"id{j}" for j in range(i, i + 30)] for i in range(0, 60, 10)]  # overlapping
    commits = []
    for n, ids in enumerate(runs):
        run = RunCommits(store, f"run{n}")
        run.base["samples"] = base
        run.add("samples", [_write(store, ids, f"run{n}")])
        commits.append(run)
    errors = []

    def commit(n: int) -> None:
        try:
            commits[n].commit("samples")
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(n,)) for n in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = _ids(store)
    assert ids == sorted(set(ids))
    assert set(ids) == {i for run in runs for i in run}


def test_removals_go_in_the_same_commit_as_adds(store):
    base = store.version("samples")
    _commit(store, ["a", "b", "c"], "r1", base)
    run = RunCommits(store, "r2")
    run.pin("samples")
    run.remove_rows("samples", "sample_id", pa.array(["b"]))
    assert len(run.removals["samples"]) == 1
    run.add("samples", [_write(store, ["d"], "r2")])
    assert run.commit("samples") == base + 2
    assert _ids(store) == ["a", "c", "d"]
    before = store.to_arrow("samples", version=base + 1).column("sample_id").to_pylist()
    assert sorted(before) == ["a", "b", "c"]


def test_files_compress_every_column_but_encoded_media(tmp_path):
    """zstd on every leaf column, nested ones included; JPEG/PNG bytes are stored as they are."""
    rows = pa.table(
        {
            "image": pa.array([b"\xff\xd8jpeg"] * 3, pa.binary()),
            "labels": pa.array([["a", "b"]] * 3, pa.list_(pa.string())),
            "embedding": pa.array([[1.0, 2.0]] * 3, pa.list_(pa.float32(), 2)),
            "metadata": pa.array([[("k", "v")]] * 3, pa.map_(pa.string(), pa.string())),
            "box": pa.array([{"x": 1, "y": 2}] * 3),
        }
    )
    action = write_file(str(tmp_path), {}, rows, "t")
    meta = pq.ParquetFile(tmp_path / action.path).metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(7)}
    assert meta.num_columns == 7
    assert codecs.pop("image") == "UNCOMPRESSED"
    assert set(codecs.values()) == {"ZSTD"}, codecs


def test_a_split_move_replans_on_a_second_writers_commit_and_keeps_its_rows(store, monkeypatch):
    from features import split_moves

    rows = _rows(["a", "b", "c"]).set_column(
        SAMPLES.get_field_index("split"), "split", pa.array(["train", "test", "test"])
    )
    run = RunCommits(store, "build")
    run.write("samples", rows)
    run.commit("samples")
    seen = []
    original = split_moves.moved_splits

    def moved_while_a_build_commits(rows, splits):
        if not seen:  # the first plan: a build appends a sample of its own meanwhile
            _commit(store, ["d"], "other", store.version("samples"))
        seen.append(rows.num_rows)
        return original(rows, splits)

    wanted = pa.table({"sample_id": ["b", "zzz"], "split": ["train", "val"]})
    monkeypatch.setattr(split_moves, "moved_splits", moved_while_a_build_commits)
    versions = split_moves.move_samples(store, wanted, "dedup")
    monkeypatch.undo()
    assert len(seen) > 1  # the first plan lost the race and was made again
    stored = store.to_arrow("samples", columns=["sample_id", "split"]).to_pylist()
    assert sorted((r["sample_id"], r["split"]) for r in stored) == [
        ("a", "train"), ("b", "train"), ("c", "test"), ("d", None)]  # fmt: skip
    assert versions == {"samples": store.version("samples")}
    assert split_moves.move_samples(store, wanted, "dedup") == {}  # done: no new version
