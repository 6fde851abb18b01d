"""A small local CLI run stays in the CLI process (no Ray at all) and stores exactly what a
run on Ray stores: samples, quarantine, the ledger, views and features, row for row."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from features.store import FeatureStore
from jobs.demo import corpus as synthetic
from pipelines.build import build
from pipelines.spec import write_spec
from tests.helpers import make_spec

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "resources": {"batch_size": 4, "rows_per_block": 8},  # several files per table
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
        [sys.executable, "-m", "jobs", *args], env=env, capture_output=True, text=True, timeout=300
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
    source = [{"kind": "directory", "uri": str(data), "class_folders": True}]
    write_spec(make_spec(tmp_path / "here", source, **SECTIONS), tmp_path / "spec.yaml")

    logs = tmp_path / "logs"
    proc = _mmfp("build", str(tmp_path / "spec.yaml"), logs=logs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not logs.exists()  # Ray never started: starting it makes the run's log file
    on_ray = build(make_spec(tmp_path / "ray", source, **SECTIONS))  # this process's Ray
    here, there = FeatureStore(str(tmp_path / "here")), FeatureStore(str(tmp_path / "ray"))
    for table in COMPARED:
        assert _rows(here, table).equals(_rows(there, table)), table
    assert here.to_arrow("quarantine").num_rows > 0
    assert here.to_arrow("views").num_rows > 0
    samples = here.to_arrow("samples").num_rows
    files = len(list((tmp_path / "here" / "samples").glob("*.parquet")))
    assert files >= samples // 8  # a file per 8 inputs read: memory holds one block
    assert here.to_arrow("features/inputs").num_rows == on_ray.feature_counts["inputs"]

    stages = here.to_arrow("_stages").to_pylist()
    assert "start ray" not in {s["stage"] for s in stages}
    assert all(s["task_seconds"] == 0 for s in stages)  # no Ray task ran

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
    spec = make_spec(tmp_path / "store", source, resources={"in_process_rows": 3})
    write_spec(spec, tmp_path / "spec.yaml")
    proc = _mmfp("build", str(tmp_path / "spec.yaml"), logs=tmp_path / "logs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = FeatureStore(str(tmp_path / "store")).to_arrow("_stages").column("stage")
    assert "start ray" in stages.to_pylist()
    assert list((tmp_path / "logs").glob("*.log"))
