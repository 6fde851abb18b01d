"""What a user sees while a job runs: mmfp's own lines on the terminal, Ray's log lines
(execution plans, progress, warnings) in the run's log file, and ``--verbose`` to see
them on the terminal too. Real ``python -m jobs`` processes, each with its own Ray."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from ray.data import DataContext

from features.store import FeatureStore
from jobs.demo import corpus as synthetic
from jobs.runtime import RAY_LOGGERS, current_log, prune_logs, route_ray_logs, run_log
from pipelines.spec import write_spec
from tests.helpers import make_spec

ROOT = Path(__file__).resolve().parents[1]
RAY_LINES = ("streaming_executor", "Execution plan", "Parquet dataset sampling", " INFO ")


def _mmfp(*args: str, logs: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMFP_LOG_DIR": str(logs)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MMFP_VERBOSE", None)
    return subprocess.run(
        [sys.executable, "-m", "jobs", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ray_lines_go_to_the_run_log_and_verbose_shows_them(tmp_path):
    data = tmp_path / "data"
    synthetic.write_directory_source(data, n_per_class=1, seed=3)
    spec_path = tmp_path / "spec.yaml"
    source = [{"kind": "directory", "uri": str(data)}]
    # on Ray even this small: the test is about Ray's lines (tests/test_in_process.py: not)
    on_ray = {"in_process_inputs": 0, "in_process_rows": 0}
    write_spec(make_spec(tmp_path / "store", source, resources=on_ray), spec_path)
    logs = tmp_path / "logs"

    quiet = _mmfp("build", str(spec_path), logs=logs)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    printed = quiet.stdout + quiet.stderr
    assert "new samples" in printed
    assert not [line for line in RAY_LINES if line in printed], printed[-2000:]
    # one plain line per stage (not a terminal): mmfp's display, not Ray's bars
    assert "plan: started" in quiet.stdout
    assert re.search(r"^collect: \d+ rows in [\d.]+ s", quiet.stdout, re.M), quiet.stdout
    (log,) = logs.glob("*.log")
    assert f"Ray's log lines: {log}" in printed
    assert log.stem in printed  # the file is named after the run id the summary prints
    assert "Starting execution of Dataset" in log.read_text()
    # Ray started once collect had inputs; that start is a stage of its own (inside collect)
    stages = FeatureStore(str(tmp_path / "store")).to_arrow("_stages").sort_by("started_at")
    assert stages.column("stage").to_pylist()[:3] == ["plan", "collect", "start ray"]

    idle = _mmfp("refresh", str(spec_path), logs=tmp_path / "idle")
    assert idle.returncode == 0, idle.stderr[-2000:]
    assert "nothing new: store unchanged" in idle.stdout
    # nothing to read: Ray never started (starting it makes the run's log file)
    assert not (tmp_path / "idle").exists()
    assert "Ray's log lines" not in idle.stdout

    loud = _mmfp("--verbose", "refresh", str(spec_path), logs=tmp_path / "loud")
    assert loud.returncode == 0, loud.stderr[-2000:]
    assert "unchanged inputs skipped" in loud.stdout
    assert not (tmp_path / "loud").exists()  # verbose: nothing routed, no file made

    # a failure that is not the user's, once Ray runs: one line, and the log
    synthetic.write_directory_source(data / "more", n_per_class=1, seed=4)  # work for Ray
    for part in (tmp_path / "store" / "samples").glob("*.parquet"):
        part.write_bytes(b"not parquet")  # the dedup registry reads the stored ids
    failed = _mmfp("build", str(spec_path), logs=tmp_path / "failed")
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    (log,) = (tmp_path / "failed").glob("*.log")
    assert f"(Ray's log lines of this run: {log})" in failed.stderr


def test_routing_is_idempotent_and_keeps_no_terminal_handler(tmp_path):
    loggers = [logging.getLogger(name) for name in RAY_LOGGERS]
    before = [(list(lg.handlers), lg.propagate) for lg in loggers]
    context = DataContext.get_current()
    bars = context.enable_progress_bars
    try:
        for name in ("a", "b"):  # a second run in one process replaces the first's file
            route_ray_logs(tmp_path / f"{name}.log")
        for logger in loggers:
            ours = [h.baseFilename for h in logger.handlers if h.get_name() == "mmfp-run-log"]
            assert ours == [str(tmp_path / "b.log")]  # Ray Data's own session file stays
            streams = {getattr(h, "stream", None) for h in logger.handlers}
            assert not streams & {sys.stderr, sys.stdout}
        assert current_log() == tmp_path / "b.log"
        logging.getLogger("ray.data").warning("a line from Ray Data")
        assert "a line from Ray Data" in (tmp_path / "b.log").read_text()
    finally:
        for logger, (handlers, propagate) in zip(loggers, before, strict=True):
            for h in logger.handlers:
                h.close()
            logger.handlers[:], logger.propagate = handlers, propagate
        context.enable_progress_bars = bars


def test_run_log_names_are_plain_file_names(tmp_path, monkeypatch):
    monkeypatch.setenv("MMFP_LOG_DIR", str(tmp_path))
    assert run_log("train-../../etc/x y") == tmp_path / "train-.._.._etc_x_y.log"


def test_old_run_logs_are_pruned_and_other_files_kept(tmp_path):
    names = [f"2026110{d}T000000-abcdef.log" for d in range(1, 6)]
    names.append("train-clip-20261101T000001-abcdef.log")  # sorts by its run id, not prefix
    for name in [*names, "notes.log", "other.txt"]:
        (tmp_path / name).write_text("x")
    prune_logs(tmp_path, keep=3)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([*names[2:5], "notes.log", "other.txt"])  # 03, 04, 05
