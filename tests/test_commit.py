"""Commits: one version per run, no duplicate keys from concurrent writers, removals in place."""

from __future__ import annotations

import threading

import pyarrow as pa
import pytest

from features.commit import rewrite_without, write_file
from features.schema import SAMPLES, conform
from features.store import FeatureStore


def _rows(ids: list[str]) -> pa.Table:
    return conform(pa.table({"sample_id": ids, "text": [f"caption {i}" for i in ids]}), SAMPLES)


def _write(store: FeatureStore, ids: list[str], tag: str):
    return write_file(store.table_uri("samples"), {}, _rows(ids), tag)


def _ids(store: FeatureStore) -> list[str]:
    return sorted(store.to_arrow("samples", columns=["sample_id"]).column(0).to_pylist())


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    store = FeatureStore(str(tmp_path / "store"))
    store.ensure_table("samples")
    return store


def test_a_run_that_started_earlier_drops_keys_committed_since(store):
    base = store.version("samples")
    first = _write(store, ["a", "b"], "run1")
    second = _write(store, ["b", "c"], "run2")
    assert store.commit("samples", [first], run_id="run1", base_version=base) == base + 1
    assert store.commit("samples", [second], run_id="run2", base_version=base) == base + 2
    assert _ids(store) == ["a", "b", "c"]
    assert store.history("samples")[0]["rows_added"] == 1


def test_nothing_left_after_dropping_means_no_commit(store):
    base = store.version("samples")
    store.commit("samples", [_write(store, ["a"], "r1")], run_id="r1", base_version=base)
    assert (
        store.commit("samples", [_write(store, ["a"], "r2")], run_id="r2", base_version=base)
        is None
    )
    assert store.version("samples") == base + 1


def test_concurrent_writers_never_duplicate_a_key(store):
    base = store.version("samples")
    runs = [[f"id{j}" for j in range(i, i + 30)] for i in range(0, 60, 10)]  # overlapping
    actions = [_write(store, ids, f"run{n}") for n, ids in enumerate(runs)]
    errors = []

    def commit(n: int) -> None:
        try:
            store.commit("samples", [actions[n]], run_id=f"run{n}", base_version=base)
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


def test_rewrite_without_removes_rows_in_the_same_commit_as_adds(store):
    base = store.version("samples")
    store.commit("samples", [_write(store, ["a", "b", "c"], "r1")], run_id="r1", base_version=base)
    dt = store.delta("samples")
    removes, rewritten = rewrite_without(dt, {}, "sample_id", ["b"], "r2")
    assert len(removes) == 1
    new = _write(store, ["d"], "r2")
    version = store.commit(
        "samples", [new, *rewritten], run_id="r2", base_version=dt.version(), removes=removes
    )
    assert version == base + 2
    assert _ids(store) == ["a", "c", "d"]
    assert sorted(store.to_arrow("samples", version=base + 1).column("sample_id").to_pylist()) == [
        "a",
        "b",
        "c",
    ]
