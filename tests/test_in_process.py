"""A small local CLI run stays in the CLI process (no Ray at all, not even imported), forks
workers for its per-batch steps, and stores exactly what a run on Ray stores: samples,
quarantine, the ledger, views and features, row for row."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.sink import StoreSink
from features.store import FeatureStore
from jobs.demo import corpus as synthetic
from pipelines.build import build, in_process
from pipelines.build.in_process import run_steps
from pipelines.spec import write_spec
from tests.helpers import make_spec

ROOT = Path(__file__).resolve().parents[1]
# runs the CLI, then tells (on stderr) whether the process ever imported Ray
CLI_THEN_REPORT = """
import sys
from jobs.cli import app
try:
    app(sys.argv[1:], prog_name="mmfp")
except SystemExit as e:
    print("imported ray:", "ray" in sys.modules, file=sys.stderr)
    raise
"""
SECTIONS = {
    # several files per table; two workers wherever the suite runs
    "resources": {"batch_size": 4, "rows_per_block": 8, "in_process_workers": 2},
    "augment": {"views_per_sample": 1, "image": [{"name": "HorizontalFlip"}]},
    "encode": {
        "feature_sets": [
            {"name": "inputs", "encoders": [{"name": "image_pixels", "params": {"size": 16}}]}
        ]
    },
}
# table -> the columns that must match (times and run ids differ between two runs)
COMPARED = {
    "samples": ["sample_id", "source_uri", "split", "label", "image", "audio", "text"],
    "quarantine": ["quarantine_id", "uri", "stage", "error_type"],
    "_inputs": ["input_key", "fingerprint", "outcome", "sample_id"],
    "views": ["sample_id", "view", "image", "audio", "text", "transforms"],
    "features/inputs": ["sample_id", "view", "image_pixels"],
}


def _mmfp(*args: str, logs: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"PYTHONPATH": str(ROOT), "MMFP_LOG_DIR": str(logs)}
    return subprocess.run(
        [sys.executable, "-c", CLI_THEN_REPORT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _rows(store: FeatureStore, table: str) -> pa.Table:
    names = store.delta(table).schema().to_arrow().names
    columns = [c for c in COMPARED[table] if c in names]
    rows = store.to_arrow(table, columns=columns)
    return rows.sort_by([(c, "ascending") for c in columns[:2]])


@pytest.mark.usefixtures("ray_session")
def test_a_small_cli_run_stays_in_process_and_stores_what_ray_stores(tmp_path):
    data = tmp_path / "data"
    synthetic.write_directory_source(data, n_per_class=2, seed=9)
    synthetic.write_broken_inputs(data / "broken")
    shards = synthetic.write_webdataset_source(tmp_path / "shards", n=12, shard_size=5)
    source = [
        {"kind": "directory", "uri": str(data), "class_folders": True},
        {"kind": "webdataset", "name": "shards", "uri": str(shards[0].parent)},
    ]  # a shard per forked worker's batch, its members unknown until read
    write_spec(make_spec(tmp_path / "here", source, **SECTIONS), tmp_path / "spec.yaml")

    logs = tmp_path / "logs"
    proc = _mmfp("build", str(tmp_path / "spec.yaml"), logs=logs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not logs.exists()  # Ray never started: starting it makes the run's log file
    assert "imported ray: False" in proc.stderr  # 1-2 s of every small CLI call
    on_ray = build(make_spec(tmp_path / "ray", source, **SECTIONS))  # this process's Ray
    here, there = FeatureStore(str(tmp_path / "here")), FeatureStore(str(tmp_path / "ray"))
    for table in COMPARED:
        assert _rows(here, table).equals(_rows(there, table)), table
    assert here.to_arrow("quarantine").num_rows > 0
    assert here.to_arrow("views").num_rows > 0
    from_shards = [u for u in here.to_arrow("samples").column("source_uri").to_pylist()
                   if ".tar" in u]  # fmt: skip
    assert len(from_shards) == 12
    samples = here.to_arrow("samples").num_rows
    files = len(list((tmp_path / "here" / "samples").glob("*.parquet")))
    assert files >= samples // 8  # a file per 8 inputs read: memory holds one block
    assert here.to_arrow("features/inputs").num_rows == on_ray.feature_counts["inputs"]

    stages = here.to_arrow("_stages").to_pylist()
    assert "start ray" not in {s["stage"] for s in stages}
    assert all(s["task_seconds"] == 0 for s in stages)  # no Ray task ran
    processes = {s["stage"]: s["cpus"] for s in stages}
    assert processes["collect"] == processes["augment"] == processes["encode inputs"] == 2

    synthetic.write_directory_source(data / "more", n_per_class=1, seed=10)
    again = _mmfp("refresh", str(tmp_path / "spec.yaml"), logs=logs)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not logs.exists()
    assert "unchanged inputs skipped" in again.stdout
    build(make_spec(tmp_path / "ray", source, **SECTIONS), incremental=True, kind="refresh")
    for table in COMPARED:
        assert _rows(here, table).equals(_rows(there, table)), table


def test_a_run_over_the_limit_goes_to_ray(tmp_path):
    data = tmp_path / "data"
    synthetic.write_directory_source(data, n_per_class=1, seed=11)
    source = [{"kind": "directory", "uri": str(data)}]
    spec = make_spec(tmp_path / "store", source, resources={"in_process_inputs": 3})
    write_spec(spec, tmp_path / "spec.yaml")
    proc = _mmfp("build", str(tmp_path / "spec.yaml"), logs=tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = FeatureStore(str(tmp_path / "store")).to_arrow("_stages").column("stage")
    assert "start ray" in stages.to_pylist()
    assert list((tmp_path / "logs").glob("*.log"))


def test_collect_stays_in_process_at_any_size_on_a_few_cpus():
    """Default: the CLI process keeps up with ~7 workers, so up to 8 CPUs every input is
    collected here; a larger machine sends more than 20,000 to Ray; a set limit wins."""
    assert in_process.input_limit(None, 2) >= 10**9
    assert in_process.input_limit(None, in_process.FEW_CPUS) >= 10**9
    assert in_process.input_limit(None, in_process.FEW_CPUS + 1) == 20_000
    assert in_process.input_limit(500, 2) == 500
    assert in_process.input_limit(0, 2) == 0  # never


def test_a_model_loads_once_here_and_forked_workers_run_its_forwards(tmp_path):
    """An encode with a model stays in a local CLI run on a CPU-only box at any size: the
    model loads once in the CLI process, before the fork, and each worker runs forwards
    on one thread (the cores are the workers'); its stored rows are read a few blocks at
    a time."""
    data = tmp_path / "data"
    synthetic.write_directory_source(data, n_per_class=4, seed=12)
    source = [{"kind": "directory", "uri": str(data), "class_folders": True}]
    probe = {"name": "probe", "views": False}
    probe["encoders"] = [{"name": "tests.probe_encoder:ForkProbeEncoder", "batch_size": 2}]
    resources = {"batch_size": 4, "rows_per_block": 2, "in_process_workers": 2}
    spec = make_spec(
        tmp_path / "store", source, resources=resources, encode={"feature_sets": [probe]}
    )
    write_spec(spec, tmp_path / "spec.yaml")
    proc = _mmfp("build", str(tmp_path / "spec.yaml"), logs=tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = FeatureStore(str(tmp_path / "store"))
    rows = store.to_arrow("features/probe").column("text_emb").to_pylist()
    assert len(rows) == store.to_arrow("samples").num_rows > 8  # chunks of 2 rows: many
    ran_in, parent, loaded_in, threads, loads = (set(c) for c in zip(*rows, strict=True))
    assert len(ran_in) == 2  # two workers ...
    assert parent == loaded_in  # ... forked by the process that loaded the model
    assert len(loaded_in) == 1
    assert not ran_in & loaded_in
    assert threads == {1.0}
    assert loads == {1.0}  # the workers inherited the one load
    stages = {s["stage"]: s["cpus"] for s in store.to_arrow("_stages").to_pylist()}
    assert stages["encode probe"] == 2
    assert "start ray" not in stages


def test_stored_rows_come_a_few_blocks_at_a_time(tmp_path):
    from deltalake import write_deltalake

    store = FeatureStore(str(tmp_path))
    for start in range(0, 30, 6):  # five files of six rows
        ids = [f"s{i:02d}" for i in range(start, start + 6)]
        rows = pa.table({"sample_id": ids, "n": list(range(start, start + 6))})
        write_deltalake(store.table_uri("rows"), rows, mode="append")
    todo = pa.table({"sample_id": [f"s{i:02d}" for i in range(0, 30, 2)] + ["gone"]})
    chunks = list(in_process.stored_rows(store, "rows", ["sample_id", "n"], todo, 7))
    assert [c.num_rows for c in chunks] == [9, 6]  # whole files, >= 7 rows each but the last
    got = sorted(pa.concat_tables(chunks).column("n").to_pylist())
    assert got == list(range(0, 30, 2))  # just the wanted rows, each once


def test_a_stream_of_tables_keeps_its_order_and_leaves_no_shared_file(tmp_path, monkeypatch):
    spans = [(0, 7), (7, 7), (7, 20)]  # an empty table between two
    tables = [pa.table({"i": pa.array(range(a, b), pa.int64())}) for a, b in spans]
    steps = [_tag_pid, _tag_parent]
    for name in ("shared", "pickled"):
        if name == "pickled":  # batches go as their own IPC bytes instead
            monkeypatch.setattr(in_process, "SHARED_MEMORY", str(tmp_path / "no-such-dir"))
        sink = _sink(tmp_path / name)
        assert run_steps(iter(tables), steps, sink, 3, 100, workers=2, serial_from=1) == 2
        files = [tmp_path / name / "store" / "rows" / a.path for a in sink.files["rows"]]
        rows = pa.concat_tables(pq.read_table(f) for f in files)
        assert rows.column("i").to_pylist() == list(range(20))
        assert os.getpid() not in set(rows.column("pid").to_pylist())
        assert not _shared_files()


def _router(batch: pa.Table) -> tuple[dict[str, pa.Table], dict[str, int]]:
    return {"rows": batch}, {"rows": batch.num_rows}


def _tag_pid(batch: pa.Table) -> pa.Table:
    return batch.append_column("pid", pa.repeat(pa.scalar(os.getpid()), batch.num_rows))


def _tag_parent(batch: pa.Table) -> pa.Table:
    return batch.append_column("parent", pa.repeat(pa.scalar(os.getpid()), batch.num_rows))


def _fail_on_13(batch: pa.Table) -> pa.Table:
    if 13 in batch.column("i").to_pylist():
        raise ValueError("row 13 is cursed")
    return batch


def _die_on_13(batch: pa.Table) -> pa.Table:
    if 13 in batch.column("i").to_pylist():
        os._exit(9)  # a decoder's segfault, the OOM killer
    return batch


def _sink(tmp_path: Path) -> StoreSink:
    schema = pa.schema([("i", pa.int64()), ("pid", pa.int64()), ("parent", pa.int64())])
    (tmp_path / "store" / "rows").mkdir(parents=True)  # a declared table's folder
    store = FeatureStore(str(tmp_path / "store"))
    return StoreSink(store, _router, run_id="t", schemas={"rows": schema})


def _shared_files() -> list[str]:
    """This process's batch files in shared memory (none once a stage is over)."""
    return glob.glob(f"{in_process.SHARED_MEMORY}/{in_process.SHM_PREFIX}{os.getpid()}-*")


def test_run_steps_forks_the_per_batch_steps_and_keeps_batch_order(tmp_path, monkeypatch):
    taken = []  # how each worker output arrived: a shared-memory path, or a pickled table
    take = in_process._taken
    monkeypatch.setattr(in_process, "_taken", lambda out: take(taken.append(out) or out))
    sink = _sink(tmp_path)
    table = pa.table({"i": pa.array(range(40), pa.int64())})
    steps = [_tag_pid, _tag_parent]
    done: list[int] = []  # what the live display hears
    processes = run_steps([table], steps, sink, 3, 9, workers=2, serial_from=1, done=done.append)
    assert processes == 2
    assert done == [*range(3, 40, 3), 40]  # input rows done after each batch
    files = [tmp_path / "store" / "rows" / a.path for a in sink.files["rows"]]
    assert len(files) == 5  # a file per 9 input rows (3 batches), as a Ray task per block
    rows = pa.concat_tables(pq.read_table(f) for f in files)
    assert rows.column("i").to_pylist() == list(range(40))  # in order, none lost
    assert os.getpid() not in set(rows.column("pid").to_pylist())  # forked workers ...
    assert set(rows.column("parent").to_pylist()) == {os.getpid()}  # ... the rest here
    assert sink.counts["rows"] == 40
    if os.path.isdir(in_process.SHARED_MEMORY):
        assert len(taken) == 14  # every batch's output mapped from shared memory, none pickled
        assert all(isinstance(out, str) for out in taken)
    assert not _shared_files()  # each unlinked once mapped

    alone = _sink(tmp_path / "alone")  # one worker: everything here, nothing forked
    assert run_steps([table], steps, alone, 3, 9, workers=1) == 1


def test_outputs_are_pickled_where_shared_memory_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(in_process, "SHARED_MEMORY", str(tmp_path / "no-such-dir"))
    taken = []
    take = in_process._taken
    monkeypatch.setattr(in_process, "_taken", lambda out: take(taken.append(out) or out))
    table = pa.table({"i": pa.array(range(40), pa.int64())})
    sink = _sink(tmp_path)
    assert run_steps([table], [_tag_pid, _tag_parent], sink, 3, 9, workers=2, serial_from=1) == 2
    rows = pa.concat_tables(
        pq.read_table(tmp_path / "store" / "rows" / a.path) for a in sink.files["rows"]
    )
    assert rows.column("i").to_pylist() == list(range(40))
    assert len(taken) == 14
    assert all(isinstance(out, pa.Table) for out in taken)  # each pickled through the pipe


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no shared memory here")
def test_a_stage_removes_the_shared_files_of_dead_cli_processes(tmp_path):
    """A CLI process killed between a worker's write and its own read leaves tmpfs files
    (and their memory) behind; the next stage removes them, and never a live one's."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root, prefix = in_process.SHARED_MEMORY, in_process.SHM_PREFIX
    orphan = Path(root, f"{prefix}{dead.pid}-0123.arrow")
    live = Path(root, f"{prefix}{os.getppid()}-0123.arrow")  # pytest's parent: alive
    for path in (orphan, live):
        path.write_bytes(b"a batch")
    try:
        table = pa.table({"i": pa.array(range(8), pa.int64())})
        run_steps([table], [_tag_pid, _tag_parent], _sink(tmp_path), 3, 9, workers=2)
        assert not orphan.exists()
        assert live.exists()
    finally:
        for path in (orphan, live):
            path.unlink(missing_ok=True)


def test_a_failing_or_dying_worker_fails_the_run(tmp_path):
    table = pa.table({"i": pa.array(range(40), pa.int64())})
    with pytest.raises(ValueError, match="row 13 is cursed"):  # the step's own error
        run_steps([table], [_fail_on_13], _sink(tmp_path / "a"), 3, 9, workers=2)
    with pytest.raises(BrokenProcessPool):  # never a hang, never a partial success
        run_steps([table], [_die_on_13], _sink(tmp_path / "b"), 3, 9, workers=2)
    assert not _shared_files()  # the outputs nobody took were unlinked too


KILLED_MID_STAGE = """
import os, sys, time
import pyarrow as pa
from tests.test_in_process import _sink
from pipelines.build import in_process
from pipelines.build.in_process import run_steps
from pathlib import Path

def slow(batch):
    Path(sys.argv[1], str(os.getpid())).touch()  # the workers tell who they are
    time.sleep(60)
    return batch

table = pa.table({"i": pa.array(range(8), pa.int64())})
run_steps([table], [slow], _sink(Path(sys.argv[1])), 1, 9, workers=2)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (an init that does not reap would leave one)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_workers_end_with_a_killed_cli_process(tmp_path):
    """SIGKILL of the CLI process mid-stage (no cleanup runs) leaves no worker behind."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_MID_STAGE, str(tmp_path)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while len(pids := [int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()]) < 2:
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.1)
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while alive := [p for p in pids if _running(p)]:
        assert time.monotonic() < deadline, f"workers {alive} outlived their CLI process"
        time.sleep(0.1)
