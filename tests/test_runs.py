"""Where a run's time went: every stage's row in ``_stages``, ``mmfp runs ls/show``, and
the bottleneck named with its reason."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest
import ray
import ray.data
from typer.testing import CliRunner

from features.runs import bottleneck, run_stages
from features.schema import STAGES
from features.store import FeatureStore
from jobs.cli import app
from jobs.demo import corpus as synthetic
from jobs.timeline import stage_spans
from pipelines import progress
from pipelines.build import Execution, build
from pipelines.build.run import Run, task_stats
from tests.helpers import make_spec

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("runs")
    synthetic.write_directory_source(root / "data", n_per_class=2, seed=5)
    spec = make_spec(
        root / "store",
        [{"kind": "directory", "uri": str(root / "data"), "class_folders": True}],
        augment={"views_per_sample": 1, "image": [{"name": "HorizontalFlip"}]},
        encode={
            "feature_sets": [
                {"name": "inputs", "encoders": [{"name": "image_pixels", "params": {"size": 16}}]}
            ]
        },
    )
    result = build(spec)
    return spec, result, FeatureStore(str(root / "store"))


def test_every_stage_of_a_build_has_a_row(built):
    _, result, store = built
    stages = run_stages(store, result.run_id).to_pylist()
    names = [s["stage"] for s in stages]
    assert names[:2] == ["plan", "collect"]
    assert {"commit samples", "augment", "commit views", "encode inputs"} <= set(names)
    assert {"commit features/inputs", "commit _inputs"} <= set(names)
    by_name = {s["stage"]: s for s in stages}
    assert by_name["collect"]["rows"] == result.inputs
    assert by_name["collect"]["task_seconds"] > 0  # Ray Data's task stats reached the row
    assert by_name["collect"]["cpus"] == 2
    assert by_name["collect"]["peak_task_bytes"] > 2**20  # a decode task's memory (USS)
    assert 0 <= by_name["collect"]["backpressure_seconds"] <= by_name["collect"]["seconds"]
    assert by_name["collect"]["spilled_bytes"] == 0
    assert by_name["collect"]["gpus"] == 0  # no accelerator in this cluster
    assert all(s["driver_peak_bytes"] > 2**20 for s in stages)
    assert by_name["commit samples"]["rows"] == result.counts["samples"]
    assert by_name["commit samples"]["bytes"] > 0
    assert by_name["encode inputs"]["rows"] == result.feature_counts["inputs"]
    wall = (result.finished_at - result.started_at).total_seconds()
    staged = sum(s["seconds"] for s in stages)
    assert 0 < staged <= wall  # nested commits are not counted twice
    assert all(s["seconds"] >= 0 for s in stages)


def test_a_run_that_changes_nothing_records_no_stages(built):
    spec, _, store = built
    before = store.to_arrow("_stages").num_rows
    again = build(spec)
    assert not again.changed
    assert store.to_arrow("_stages").num_rows == before


def test_runs_ls_and_show_name_the_bottleneck(built):
    _, result, store = built
    listed = runner.invoke(app, ["runs", "ls", "--store", store.uri])
    assert listed.exit_code == 0, listed.output
    assert result.run_id in listed.output
    shown = runner.invoke(app, ["runs", "show", result.run_id, "--store", store.uri])
    assert shown.exit_code == 0, shown.output
    worst = bottleneck(run_stages(store, result.run_id))
    assert f"bottleneck: {worst.stage} (" in shown.output
    assert "collect" in shown.output
    unknown = runner.invoke(app, ["runs", "show", "no-such-run", "--store", store.uri])
    assert unknown.exit_code == 2
    assert "no stages recorded for run 'no-such-run'" in unknown.output
    assert result.run_id in unknown.output  # the recent runs are named


def test_a_nested_stage_is_taken_out_of_the_outer_one(tmp_path):
    run = Run.start(make_spec(tmp_path / "store", [{"kind": "directory", "uri": str(tmp_path)}]))
    with run.stage("outer"):
        time.sleep(0.05)
        with run.stage("inner"):
            time.sleep(0.2)
    outer, inner = run.result.stages["outer"], run.result.stages["inner"]
    assert 0.2 <= inner.seconds < 0.4
    assert 0.05 <= outer.seconds < 0.2


def _stages(*rows: dict) -> pa.Table:
    defaults = {"run_id": "r", "rows": 0, "bytes": 0, "cpus": 2.0}
    return pa.Table.from_pylist([{**defaults, **r} for r in rows], schema=STAGES)


@pytest.mark.parametrize(
    ("worst", "reason"),
    [
        ({"stage": "collect", "task_seconds": 19.0, "cpu_seconds": 18.0}, "CPU-bound: its Ray "
         "tasks kept 95% of 2 CPUs busy"),
        ({"stage": "collect", "task_seconds": 6.0, "cpu_seconds": 6.0}, "waiting for work: its "
         "Ray tasks kept only 30% of 2 CPUs busy"),
        ({"stage": "encode clip", "task_seconds": 18.0, "cpu_seconds": 3.0}, "waiting inside its "
         "tasks (I/O or an accelerator): they were on a CPU 17% of their time"),
        ({"stage": "commit samples", "task_seconds": 0.0, "cpu_seconds": 0.0}, "committing"),
        ({"stage": "plan", "task_seconds": 0.0, "cpu_seconds": 0.0}, "listing inputs"),
        ({"stage": "start ray", "task_seconds": 0.0, "cpu_seconds": 0.0}, "starting Ray"),
        ({"stage": "encode x", "task_seconds": 0.0, "cpu_seconds": 0.0}, "driver work"),
        ({"stage": "collect", "rows": 20, "task_seconds": 0.0, "cpu_seconds": 0.0},
         "in the CLI process (2 processes)"),
        ({"stage": "collect", "rows": 20, "task_seconds": 0.0, "cpu_seconds": 0.0, "cpus": 1.0},
         "in the CLI process (one process)"),
        ({"stage": "collect", "task_seconds": 8.0, "cpu_seconds": 8.0,
          "backpressure_seconds": 7.0}, "held back: an operator could not launch tasks for 70%"),
        ({"stage": "collect", "task_seconds": 19.0, "cpu_seconds": 18.0,
          "spilled_bytes": 3 * 2**20}, "CPU-bound: its Ray tasks kept 95% of 2 CPUs busy; it "
         "spilled 3 MiB of blocks to disk"),
        ({"stage": "encode clip", "task_seconds": 12.0, "cpu_seconds": 4.0, "gpus": 1.0,
          "accelerator_seconds": 9.5}, "accelerator-bound: its GPU actors (1 GPU) were busy 95%"),
        ({"stage": "encode clip", "task_seconds": 19.0, "cpu_seconds": 18.0, "gpus": 2.0,
          "accelerator_seconds": 6.0}, "the accelerator waited on preprocessing: its GPU actors "
         "(2 GPUs) were busy 30%"),
        ({"stage": "encode clip", "task_seconds": 6.0, "cpu_seconds": 4.0, "gpus": 1.0,
          "accelerator_seconds": 3.0}, "waiting for work: its GPU actors (1 GPU) were busy "
         "only 30%"),
    ],
)  # fmt: skip
def test_the_bottleneck_and_why(worst, reason):
    stages = _stages(
        {"stage": "plan", "seconds": 1.0, "task_seconds": 0.0, "cpu_seconds": 0.0},
        {"seconds": 10.0, **worst},
        {"stage": "commit _inputs", "seconds": 1.0, "task_seconds": 0.0, "cpu_seconds": 0.0},
    )
    found = bottleneck(stages)
    assert (found.stage, round(found.share, 2)) == (worst["stage"], round(10 / 12, 2))
    assert found.reason.startswith(reason)


def test_task_stats_read_ray_datas_operator_metrics(ray_session):
    """Time in the named (accelerator) operator's function, its tasks' memory, and
    backpressure come from Ray Data's own metrics of the executed dataset."""

    class Model:
        def __call__(self, batch: dict) -> dict:
            time.sleep(0.05)
            return batch

    ds = ray.data.range(64, override_num_blocks=8).map_batches(
        Model, batch_size=8, compute=ray.data.ActorPoolStrategy(size=1)
    )
    ds = ds.materialize()
    stats = task_stats(ds, accelerator="Model")
    assert 8 * 0.05 <= stats.accelerator_seconds < 8 * 0.05 + 2.0  # 8 batches of 50 ms
    assert stats.peak_task_bytes > 2**20
    assert stats.task_seconds >= stats.accelerator_seconds
    assert task_stats(ds).accelerator_seconds == 0.0  # no operator named: no accelerator


def test_runs_show_writes_a_timeline(built, tmp_path):
    _, result, store = built
    out = tmp_path / "plots" / "timeline.png"
    shown = runner.invoke(
        app, ["runs", "show", result.run_id, "--store", store.uri, "--plot", str(out)]
    )
    assert shown.exit_code == 0, shown.output
    assert f"timeline: {out}" in shown.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_nested_stage_stays_inside_its_outer_span():
    t0 = datetime(2026, 11, 28, tzinfo=UTC)
    stages = _stages(
        {"stage": "plan", "seconds": 1.0, "started_at": t0},
        {"stage": "collect", "seconds": 10.0, "started_at": t0 + timedelta(seconds=1)},
        {"stage": "start ray", "seconds": 2.0, "started_at": t0 + timedelta(seconds=1.1)},
        {"stage": "commit samples", "seconds": 0.5, "started_at": t0 + timedelta(seconds=13)},
    )
    spans = stage_spans(stages.to_pylist())
    assert [(n, round(a, 2), round(b, 2)) for n, a, b in spans] == [
        ("plan", 0.0, 1.0),
        ("collect", 1.0, 13.0),  # its own 10 s plus the 2 s of start ray inside it
        ("start ray", 1.1, 3.1),
        ("commit samples", 13.0, 13.5),
    ]


def test_a_build_reports_each_stage_as_it_goes(tmp_path, ray_session, monkeypatch):
    monkeypatch.setattr(progress, "EVERY", 0.0)  # every scheduling step, not every 0.5 s
    synthetic.write_directory_source(tmp_path / "data", n_per_class=3, seed=6)
    synthetic.write_broken_inputs(tmp_path / "data" / "broken")
    spec = make_spec(
        tmp_path / "store",
        [{"kind": "directory", "uri": str(tmp_path / "data"), "class_folders": True}],
        resources={"batch_size": 2, "blocks_per_cpu": 4},  # several tasks: a share to report
    )
    events: list[tuple[str, bool, float | None, int, int]] = []

    def listener(p: progress.StageProgress) -> None:
        events.append((p.stage, p.finished, p.done, p.rows, p.quarantined))

    result = build(spec, execution=Execution(progress=listener))
    finished = {stage: (rows, q) for stage, done, _, rows, q in events if done}
    assert list(finished) == list(result.stages)  # every stage ends with one event
    assert finished["collect"] == (result.inputs, result.counts["quarantined"])
    assert result.counts["quarantined"] > 0  # the corpus has broken files
    shares = [share for stage, done, share, *_ in events if stage == "collect" and not done]
    assert shares[0] is None  # the start, before any task finished
    assert any(s is not None and 0 < s <= 1 for s in shares)  # Ray Data's tasks, as they end


def test_a_store_from_an_older_mmfp_gets_the_new_stage_columns(tmp_path, ray_session):
    """``_stages`` made before the memory and backpressure columns: the next run adds them
    (older rows read as null) instead of committing files the table's schema lacks."""
    from deltalake import write_deltalake

    old_schema = pa.schema([f for f in STAGES if f.name not in NEW_STAGE_COLUMNS])
    old_row = {"run_id": "old", "stage": "collect", "seconds": 2.0, "rows": 4, "bytes": 10,
               "task_seconds": 3.8, "cpu_seconds": 3.7, "cpus": 2.0}  # fmt: skip
    store_dir = tmp_path / "store"
    write_deltalake(str(store_dir / "_stages"), pa.Table.from_pylist([old_row], schema=old_schema))
    synthetic.write_directory_source(tmp_path / "data", n_per_class=1, seed=7)
    spec = make_spec(
        store_dir, [{"kind": "directory", "uri": str(tmp_path / "data"), "class_folders": True}]
    )
    result = build(spec)
    stages = FeatureStore(str(store_dir)).to_arrow("_stages")
    assert stages.schema.names == STAGES.names
    by_run = {r["run_id"]: r for r in stages.to_pylist() if r["stage"] == "collect"}
    assert by_run["old"]["peak_task_bytes"] is None  # older rows: not measured
    assert by_run[result.run_id]["peak_task_bytes"] > 0
    shown = runner.invoke(app, ["runs", "show", "old", "--store", str(store_dir)])
    assert shown.exit_code == 0, shown.output
    assert "CPU-bound" in shown.output


NEW_STAGE_COLUMNS = {"backpressure_seconds", "peak_task_bytes", "spilled_bytes",
                     "driver_peak_bytes", "gpus", "accelerator_seconds"}  # fmt: skip
