"""A short sample of the fault-injection harness (benchmarks/faults.py) runs in CI: real
``python -m jobs`` processes SIGKILLed at random moments and racing writers, each store
checked against a clean build. The full run (200+ trials) is in RELIABILITY.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_killed_and_racing_runs_converge(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import faults

    out = tmp_path / "faults.json"
    # a SIGKILLed refresh driver has its own deterministic test (tests/test_refresh.py);
    # here a killed Ray worker and racing writers (the benchmark runs every scenario)
    scenarios = ["worker", "race"]
    args = ["--trials", "1", "--races", "1", "--samples", "10", "--scenarios", *scenarios]
    code = faults.main([*args, "--seed", "7", "--json", str(out)])
    report = json.loads(out.read_text())
    assert [row["scenario"] for row in report["table"]] == scenarios
    assert sum(row["trials"] for row in report["table"]) == 2
    assert [t for t in report["trials"] if not t["converged"]] == []
    assert code == 0
