"""The CLI build, memory, serve and search benchmarks run end to end at a tiny size, so
they keep working (CI never times anything: the ratios they print are not checked, only
that they measured real runs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_build_cli_benchmark_runs_at_a_tiny_size(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run(
        [sys.executable, "benchmarks/build_cli.py", "--samples", "12", "--repeats", "1",
         "--refresh", "--no-peer", "--corpus-dir", str(tmp_path / "corpora")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "correctness: every store holds all samples: OK" in out
    assert "    collect " in out  # the run's own _stages rows (in process at this size)
    assert "n=12: mmfp/ideal " in out
    assert "no-op refresh / build " in out
    assert (tmp_path / "corpora" / "n12" / ".complete").exists()


def test_memory_benchmark_runs_at_a_tiny_size(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run(
        [sys.executable, "benchmarks/memory.py", "--samples", "12", "--skip-train",
         "--corpus-dir", str(tmp_path / "corpora")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for command in ("build", "encode", "search"):  # each measured a real process tree
        line = next(x for x in proc.stdout.splitlines() if x.startswith(f"{command}: peak"))
        assert float(line.split("= ")[1].split()[0]) > 0
    rows = [x.split() for x in proc.stdout.splitlines() if x.startswith(("build ", "search "))]
    assert all(float(r[1]) > 50 for r in rows)  # MiB: at least an interpreter with pyarrow


def test_serve_benchmark_runs_at_a_tiny_size():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run(
        [sys.executable, "benchmarks/serve.py", "--rows", "2000", "--queries", "4",
         "--concurrency", "2", "--ann"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "same top-10 as bare in 4/4" in out  # the service answers what NumPy answers
    assert "concurrency   2: " in out
    assert "commit -> served: " in out
    recall = float(out.split("service ann ")[1].split("recall@10 ")[1].split()[0])
    assert recall >= 0.9  # tuned to 0.95 on held-out rows at build time


def test_search_benchmark_runs_at_a_tiny_size(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/search.py", "--rows", "3000", "--dim", "16", "--queries",
         "3", "--streamed-queries", "1", "--cold-processes", "1", "--clusters", "20",
         "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout  # every exact answer was checked against NumPy's inside the script
    for line in ("search, snapshots mapped", "search, cold process", "cold process "):
        assert line in out
