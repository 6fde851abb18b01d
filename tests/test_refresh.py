"""Refresh: only new inputs are read, reruns commit nothing, kills and races are safe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from features.store import FeatureStore
from jobs.demo import corpus as synthetic
from pipelines.build import build
from pipelines.label import LabelSpec
from pipelines.spec import write_spec
from tests.helpers import make_spec

pytestmark = pytest.mark.usefixtures("ray_session")
TABLES = ("samples", "quarantine", "_inputs", "_runs")


def _spec(tmp_path: Path, data: Path, **sections):
    return make_spec(
        tmp_path / "store",
        [{"kind": "directory", "uri": str(data), "class_folders": True}],
        **sections,
    )


def _versions(store: FeatureStore) -> dict[str, int | None]:
    return {name: store.version(name) for name in TABLES}


def _ids(store: FeatureStore) -> list[str]:
    return store.to_arrow("samples", columns=["sample_id"]).column(0).to_pylist()


def test_refresh_reads_only_new_inputs_and_reruns_commit_nothing(tmp_path):
    data = tmp_path / "data"
    synthetic.write_directory_source(data / "a", n_per_class=2, seed=1)
    spec = _spec(tmp_path, data)
    first = build(spec, kind="refresh", incremental=True)
    store = FeatureStore(str(tmp_path / "store"))
    n_first = first.counts["samples"]
    assert n_first == 20
    synthetic.write_directory_source(data / "b", n_per_class=1, seed=2)
    second = build(spec, kind="refresh", incremental=True)
    assert second.skipped_inputs == 20
    assert second.inputs == 10
    assert second.counts["samples"] == 10
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == 30
    before = _versions(store)
    third = build(spec, kind="refresh", incremental=True)
    assert third.inputs == 0
    assert third.skipped_inputs == 30
    assert not third.changed
    assert _versions(store) == before


def test_a_touched_file_is_read_again_but_adds_nothing(tmp_path):
    data = tmp_path / "data"
    stems = synthetic.write_directory_source(data, n_per_class=1, seed=3)
    spec = _spec(tmp_path, data)
    build(spec, kind="refresh", incremental=True)
    store = FeatureStore(str(tmp_path / "store"))
    touched = next(data.rglob(f"{stems[0]}.txt"))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    again = build(spec, kind="refresh", incremental=True)
    assert again.inputs == 1
    assert again.counts["already_stored"] == 1
    assert again.versions.keys() == {"_inputs", "_runs", "_stages"}  # the new fingerprint only
    assert len(_ids(store)) == 10


@pytest.mark.parametrize("policy", ["keep", "delete"])
def test_removed_inputs_follow_the_policy(tmp_path, policy):
    data = tmp_path / "data"
    stems = synthetic.write_directory_source(data, n_per_class=2, seed=4)
    augment = {"views_per_sample": 1, "audio": None, "text": None}
    spec = _spec(tmp_path, data, refresh={"on_removed": policy}, split={"ratios": {"train": 1.0}},
                 augment=augment)  # fmt: skip
    build(spec, kind="refresh", incremental=True)
    store = FeatureStore(str(tmp_path / "store"))
    views_before = store.to_arrow("views").num_rows
    assert views_before == 20
    for stem in stems[:3]:
        for path in data.rglob(f"{stem}.*"):
            path.unlink()
    result = build(spec, kind="refresh", incremental=True)
    assert result.removed["inputs"] == 3
    expected = 20 if policy == "keep" else 17
    assert len(_ids(store)) == expected
    assert store.to_arrow("views").num_rows == (20 if policy == "keep" else 17)
    history = store.history("samples")
    assert sum(1 for h in history if h["run_id"] == result.run_id) == (policy == "delete")
    before = _versions(store)
    assert not build(spec, kind="refresh", incremental=True).changed
    assert _versions(store) == before


def test_a_slot_commits_once(tmp_path):
    data = tmp_path / "data"
    synthetic.write_directory_source(data, n_per_class=1, seed=5)
    spec = _spec(tmp_path, data)
    first = build(spec, kind="refresh", incremental=True, slot=1_795_000_000)
    assert first.changed
    synthetic.write_directory_source(data / "more", n_per_class=1, seed=6)
    retry = build(spec, kind="refresh", incremental=True, slot=1_795_000_000)
    assert retry.already_done
    assert not retry.changed
    later = build(spec, kind="refresh", incremental=True, slot=1_795_000_900)
    assert later.counts["samples"] == 10


def test_concurrent_refreshes_leave_no_duplicates(tmp_path):
    data = tmp_path / "data"
    synthetic.write_directory_source(data, n_per_class=3, seed=7)
    spec = _spec(tmp_path, data)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(build(spec, kind="refresh", incremental=True))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = _ids(FeatureStore(str(tmp_path / "store")))
    assert len(ids) == len(set(ids)) == 30


def test_a_killed_refresh_leaves_the_previous_version_and_the_next_run_completes(tmp_path):
    data = tmp_path / "data"
    synthetic.write_directory_source(data / "old", n_per_class=1, seed=8)
    spec = _spec(tmp_path, data)
    build(spec, kind="refresh", incremental=True)
    store = FeatureStore(str(tmp_path / "store"))
    before = _versions(store)
    synthetic.write_directory_source(data / "new", n_per_class=4, seed=9)
    slow_label = {"sources": [{"kind": "function", "path": "tests.slowlabel:slow_label"}]}
    slow = spec.model_copy(
        update={
            "label": LabelSpec.model_validate(slow_label),
            # a file every 4 inputs: in the CLI process (small runs stay there) as on Ray,
            # files land while later inputs are still labelled, and the kill comes first
            "resources": spec.resources.model_copy(update={"batch_size": 4, "rows_per_block": 4}),
        }
    )
    spec_path = tmp_path / "slow.yaml"
    write_spec(slow, spec_path)
    samples_dir = tmp_path / "store" / "samples"
    files_before = set(samples_dir.glob("*.parquet"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.refresh", str(spec_path)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (set(samples_dir.glob("*.parquet")) - files_before):
            assert proc.poll() is None, "the refresh finished before it could be killed"
            time.sleep(0.1)
        assert set(samples_dir.glob("*.parquet")) - files_before, "no files written in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert _versions(store) == before  # files written, nothing committed
    assert len(_ids(store)) == 10  # the previous version reads as before
    result = build(spec, kind="refresh", incremental=True)
    assert result.counts["samples"] == 40
    ids = _ids(store)
    assert len(ids) == len(set(ids)) == 50
