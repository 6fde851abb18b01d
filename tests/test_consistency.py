"""Store consistency under renames, concurrent writers, retried slots and duplicate inputs.

Each case was a reproduced loss or duplication: a rename under ``on_removed: delete``
deleted the sample, a removal committed on a newer version resurrected or duplicated
rows, two specs (or two runs) of one slot suppressed or doubled each other, and
duplicate manifest rows or tar members landed twice or vanished.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake.transaction import Transaction

from features.commit import RunCommits, SlotCommitted, write_file
from features.leases import Lease, live_runs
from features.metadata import FeatureSetMeta
from features.schema import SAMPLES, conform
from features.store import FeatureStore
from jobs.demo import corpus
from pipelines.build import build, encode_only
from pipelines.build.run import slot_transaction
from tests.helpers import make_spec


def _rows(ids: list[str]) -> pa.Table:
    return conform(pa.table({"sample_id": ids, "text": [f"caption {i}" for i in ids]}), SAMPLES)


def _commit(store: FeatureStore, ids: list[str], run_id: str) -> int | None:
    run = RunCommits(store, run_id)
    run.pin("samples")
    run.add("samples", [write_file(store.table_uri("samples"), {}, _rows(ids), run_id)])
    return run.commit("samples")


def _ids(store: FeatureStore, table: str = "samples") -> list[str]:
    return sorted(store.to_arrow(table, columns=["sample_id"]).column(0).to_pylist())


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    store = FeatureStore(str(tmp_path / "store"))
    store.ensure_table("samples")
    _commit(store, ["a", "b", "c", "d"], "seed")
    return store


# ---- removals are planned on the version they commit on --------------------------------


def test_a_removal_does_not_resurrect_what_another_writer_removed(store):
    mine = RunCommits(store, "mine")
    mine.pin("samples")
    mine.remove_rows("samples", "sample_id", pa.array(["a"]))
    theirs = RunCommits(store, "theirs")
    theirs.pin("samples")
    theirs.remove_rows("samples", "sample_id", pa.array(["b"]))
    theirs.commit("samples")  # commits first, on the version `mine` planned against
    mine.commit("samples")
    assert _ids(store) == ["c", "d"]


def test_a_removal_racing_optimize_duplicates_nothing(store):
    _commit(store, ["e"], "more")  # two files, so compaction rewrites them
    mine = RunCommits(store, "mine")
    mine.pin("samples")
    mine.remove_rows("samples", "sample_id", pa.array(["a"]))
    store.optimize("samples")
    mine.commit("samples")
    assert _ids(store) == ["b", "c", "d", "e"]


def test_concurrent_removals_and_appends_lose_and_duplicate_nothing(store):
    _commit(store, [f"x{i}" for i in range(20)], "more")
    runs = []
    for n in range(4):
        run = RunCommits(store, f"r{n}")
        run.pin("samples")
        run.remove_rows("samples", "sample_id", pa.array([f"x{i}" for i in range(n, 20, 4)]))
        new = [f"n{n}", "shared"]
        run.add("samples", [write_file(store.table_uri("samples"), {}, _rows(new), f"r{n}")])
        runs.append(run)
    errors: list[BaseException] = []

    def commit(run: RunCommits) -> None:
        try:
            run.commit("samples")
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=commit, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert _ids(store) == ["a", "b", "c", "d", "n0", "n1", "n2", "n3", "shared"]
    assert sum(r.rows["samples"] for r in runs) == 5  # "shared" landed once
    assert sum(r.dropped["samples"] for r in runs) == 3


def test_a_runs_own_repeated_key_lands_once(store):
    run = RunCommits(store, "twice")
    uri = store.table_uri("samples")
    run.add(
        "samples",
        [write_file(uri, {}, _rows(["z", "y"]), "t"), write_file(uri, {}, _rows(["z"]), "t")],
    )
    run.commit("samples")
    assert _ids(store) == ["a", "b", "c", "d", "y", "z"]
    assert (run.rows["samples"], run.dropped["samples"]) == (2, 1)


# ---- exactly once per slot ---------------------------------------------------------------


def test_a_slot_commits_once_and_the_second_run_stops(store):
    slot = Transaction("mmfp:refresh:spec", 1700000000)
    first, second = (RunCommits(store, n, transaction=slot) for n in ("first", "second"))
    for run, ids in ((first, ["p"]), (second, ["q"])):
        run.pin("samples")
        run.add("samples", [write_file(store.table_uri("samples"), {}, _rows(ids), run.run_id)])
    first.commit("samples")
    with pytest.raises(SlotCommitted):
        second.commit("samples")
    assert "q" not in _ids(store)
    files = [p.name for p in Path(store.table_uri("samples")).glob("part-second-*.parquet")]
    assert files == []  # the stopped run's files are gone, not left for vacuum
    later = RunCommits(store, "later", transaction=Transaction(slot.app_id, slot.version + 60))
    later.add("samples", [write_file(store.table_uri("samples"), {}, _rows(["r"]), "later")])
    assert later.commit("samples") is not None


def test_slots_are_keyed_by_spec_identity(tmp_path):
    one = make_spec(tmp_path / "store", [{"kind": "directory", "uri": str(tmp_path / "a")}])
    two = make_spec(tmp_path / "store", [{"kind": "directory", "uri": str(tmp_path / "b")}])
    assert one.name == two.name  # the default name every spec shares
    ids = {slot_transaction(s, "refresh", 1).app_id for s in (one, two, one)}
    assert len(ids) == 2


@pytest.mark.usefixtures("ray_session")
def test_two_simultaneous_runs_of_one_slot_commit_once(tmp_path):
    corpus.write_directory_source(tmp_path / "data", n_per_class=2, seed=3)
    spec = make_spec(tmp_path / "store", [{"kind": "directory", "uri": str(tmp_path / "data")}])
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(build(spec, kind="refresh", incremental=True, slot=60))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = FeatureStore(str(tmp_path / "store"))
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == 20
    runs = store.to_arrow("_runs").to_pylist()
    assert len(runs) == 1
    assert runs[0]["finished_at"] is not None
    assert sorted(r.already_done for r in results) == [False, True]
    again = build(spec, kind="refresh", incremental=True, slot=60)
    assert again.already_done
    assert not again.changed


# ---- renames and duplicate inputs ----------------------------------------------------------


@pytest.mark.usefixtures("ray_session")
def test_a_rename_under_delete_keeps_the_sample(tmp_path):
    data = tmp_path / "data"
    stems = corpus.write_directory_source(data, n_per_class=1, seed=4)
    spec = make_spec(
        tmp_path / "store",
        [{"kind": "directory", "uri": str(data), "class_folders": True}],
        refresh={"on_removed": "delete"},
    )
    build(spec, kind="refresh", incremental=True)
    store = FeatureStore(str(tmp_path / "store"))
    before = _ids(store)
    for path in data.glob(f"*/{stems[0]}.*"):
        path.rename(path.with_name(f"renamed{path.suffix}"))
    moved = build(spec, kind="refresh", incremental=True)
    assert moved.removed == {"inputs": 1, "samples": 0}
    assert _ids(store) == before
    assert not build(spec, kind="refresh", incremental=True).changed
    for path in data.glob("*/renamed.*"):  # now it is really gone
        path.unlink()
    gone = build(spec, kind="refresh", incremental=True)
    assert gone.removed == {"inputs": 1, "samples": 1}
    assert len(_ids(store)) == len(before) - 1


@pytest.mark.usefixtures("ray_session")
def test_duplicate_manifest_rows_and_tar_members_are_quarantined(tmp_path):
    rows = [
        {"text": "the same caption"},
        {"text": "the same caption"},  # identical: one sample, one DuplicateSample
        {"id": "x", "text": "first"},
        {"id": "x", "text": "second"},  # the same id twice: ambiguous
    ]
    manifest = tmp_path / "m" / "rows.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shard = tmp_path / "shards" / "s.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, text in (("a.txt", "one"), ("a.txt", "two"), ("b.txt", "bee")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    spec = make_spec(
        tmp_path / "store",
        [
            {"kind": "manifest", "uri": str(manifest)},
            {"kind": "webdataset", "uri": str(shard.parent)},
        ],
    )
    result = build(spec)
    store = FeatureStore(str(tmp_path / "store"))
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == result.counts["samples"] == 3  # caption, x, bee
    reasons = {
        r["uri"].rsplit("/", 1)[-1]: r["error_type"]
        for r in store.to_arrow("quarantine").to_pylist()
    }
    assert reasons == {
        "rows.jsonl#the same caption#2": "DuplicateSample",
        "rows.jsonl#x#2": "AmbiguousSample",
        "s.tar#a": "AmbiguousSample",
    }
    texts = store.to_arrow("samples", columns=["text"]).column(0).to_pylist()
    assert sorted(texts) == ["bee", "first", "the same caption"]


@pytest.mark.usefixtures("ray_session")
def test_every_committed_row_traces_to_a_finished_run(tmp_path):
    corpus.write_directory_source(tmp_path / "data", n_per_class=1, seed=5)
    spec = make_spec(tmp_path / "store", [{"kind": "directory", "uri": str(tmp_path / "data")}])
    result = build(spec)
    store = FeatureStore(str(tmp_path / "store"))
    runs = {r["run_id"]: r for r in store.to_arrow("_runs").to_pylist()}
    assert set(store.to_arrow("samples", columns=["run_id"]).column(0).to_pylist()) == {
        result.run_id
    }
    assert runs[result.run_id]["finished_at"] is not None
    assert runs[result.run_id]["samples_written"] == result.counts["samples"] == 10
    assert json.loads(runs[result.run_id]["versions"])["samples"] == store.version("samples")


# ---- vacuum and runs in flight -------------------------------------------------------------


def test_vacuum_never_removes_the_files_of_a_run_in_flight(store):
    uri = store.table_uri("samples")
    run = RunCommits(store, "inflight")
    run.pin("samples")
    with Lease(store, "inflight", heartbeat_s=0.05):
        run.add("samples", [write_file(uri, {}, _rows(["w"]), "inflight")])
        time.sleep(0.2)  # a few beats
        gone = store.vacuum(retention_hours=0, force=True, dry_run=False)
        assert not any("inflight" in p for p in gone["samples"])
        run.commit("samples")
    assert "w" in _ids(store)
    assert live_runs(store) == set()  # the lease went with the run
    orphan = write_file(uri, {}, _rows(["o"]), "killed")  # a run that died before its commit
    gone = store.vacuum(retention_hours=0, force=True, dry_run=False)
    assert gone["samples"] == [orphan.path]
    assert not (Path(uri) / orphan.path).exists()
    assert _ids(store) == ["a", "b", "c", "d", "w"]


def test_a_lease_that_stopped_beating_expires(store):
    lease = Path(store.uri) / "_leases" / "old.json"
    lease.parent.mkdir(parents=True, exist_ok=True)
    lease.write_text(json.dumps({"run_id": "old", "beat": "2020-01-01T00:00:00+00:00"}))
    (Path(store.uri) / "_leases" / "torn.json").write_text("{")  # mid-write: kept as live
    assert live_runs(store) == {"torn"}


# ---- a feature set's description goes in with its rows -------------------------------------


@pytest.mark.usefixtures("ray_session")
def test_a_reencode_killed_before_its_properties_leaves_rows_described_truly(tmp_path, monkeypatch):
    corpus.write_directory_source(tmp_path / "data", n_per_class=1, seed=6)

    def spec(size: int):
        encode = {"feature_sets": [{"name": "px", "encoders": [
            {"name": "image_pixels", "params": {"size": size}}]}]}  # fmt: skip
        return make_spec(
            tmp_path / "store",
            [{"kind": "directory", "uri": str(tmp_path / "data")}],
            encode=encode,
        )

    build(spec(8))
    store = FeatureStore(str(tmp_path / "store"))
    assert store.feature_set("px").columns["image_pixels"].shape == [3, 8, 8]

    def killed(self, name, properties):  # the process dies right after the data commit
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureStore, "set_properties", killed)
    monkeypatch.setattr("features.tables.TableStore.set_properties", killed)
    with pytest.raises(KeyboardInterrupt):
        encode_only(spec(4), "px", reencode=True)
    monkeypatch.undo()
    # the property still names the old encoder, but the rows and their commit the new one
    stale = FeatureSetMeta.from_properties(store.properties("features/px"), table="features/px")
    assert stale.columns["image_pixels"].shape == [3, 8, 8]
    assert store.feature_set("px").columns["image_pixels"].shape == [3, 4, 4]
    pixels = store.to_arrow("features/px", columns=["image_pixels"]).column(0).drop_null()
    assert {len(v) for v in pixels.to_pylist()} == {3 * 4 * 4}
    assert not encode_only(spec(4), "px").changed  # nothing to do: the rows are the new ones
