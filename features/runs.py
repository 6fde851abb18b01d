"""Runs and where their time went: ``_runs`` and ``_stages`` as data for ``mmfp runs``.

Each stage row holds its wall time (stages nested in it taken out), what it
produced, the wall and CPU seconds of the Ray tasks it ran, how long Ray Data
held its operators back, the memory its tasks and the driver reached, and its
accelerator operator's time in the model; the bottleneck is the stage with the
largest share of the run, and its reason comes from how busy those tasks kept
the cluster's CPUs and accelerators.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from features.errors import StoreError
from features.schema import RUNS
from features.tables import TableStore

BUSY = 0.8  # tasks kept at least this share of the CPUs busy: the stage is CPU-bound
HELD = 0.5  # an operator held back this share of the stage: Ray Data's budget throttled it
ON_CPU = 0.5  # below this share of their time on a CPU, tasks were waiting inside


@dataclass
class Bottleneck:
    stage: str
    share: float  # of the run's staged time
    reason: str


def recent_runs(store: TableStore, limit: int = 20) -> pa.Table:
    """The newest ``limit`` runs, newest first."""
    if not store.exists("_runs"):
        return RUNS.empty_table()
    return store.to_arrow("_runs").sort_by([("started_at", "descending")]).slice(0, limit)


def run_stages(store: TableStore, run_id: str) -> pa.Table:
    """The stages of one run in the order they ran; an unknown run is a ``StoreError``."""
    stages = store.to_arrow("_stages") if store.exists("_stages") else None
    mine = stages.filter(pc.equal(stages.column("run_id"), run_id)) if stages else None
    if mine is None or mine.num_rows == 0:
        known = recent_runs(store, 5).column("run_id").to_pylist()
        hint = f"; recent runs: {', '.join(known)}" if known else ""
        raise StoreError(f"no stages recorded for run {run_id!r} in {store.uri}{hint}")
    return mine.take(pc.sort_indices(mine, [("started_at", "ascending")]))


def cpu_busy(row: dict) -> float | None:
    """The share of the cluster's CPUs the stage's Ray tasks kept busy (None: no tasks)."""
    if not row["task_seconds"] or not row["seconds"] or not row["cpus"]:
        return None
    return min(1.0, row["task_seconds"] / (row["seconds"] * row["cpus"]))


def accelerator_busy(row: dict) -> float | None:
    """The share of the stage's wall time its GPU actors were busy, per GPU (None: no GPU
    used): their time in the model call (host-side conversion and the forward), so an
    upper bound of the device's own utilisation."""
    if not row.get("gpus") or not row["seconds"]:
        return None
    return min(1.0, (row.get("accelerator_seconds") or 0.0) / (row["seconds"] * row["gpus"]))


def held_back(row: dict) -> float | None:
    """The share of the stage's time its most throttled Ray Data operator could not
    launch a task (None: no Ray tasks)."""
    if not row["task_seconds"] or not row["seconds"]:
        return None
    return min(1.0, (row.get("backpressure_seconds") or 0.0) / row["seconds"])


def staged_seconds(rows: list[dict]) -> float:
    """The run's time in its stages (each stage's own time, nested ones taken out)."""
    return sum(max(0.0, r["seconds"]) for r in rows)


def bottleneck(stages: pa.Table) -> Bottleneck | None:
    """The stage that took the largest share of the run, and why it took it."""
    rows = stages.to_pylist()
    total = staged_seconds(rows)
    if not rows or total <= 0:
        return None
    worst = max(rows, key=lambda r: r["seconds"])
    return Bottleneck(worst["stage"], worst["seconds"] / total, _reason(worst))


def _reason(row: dict) -> str:
    stage = row["stage"]
    if stage.startswith("commit "):
        return "committing to Delta on the driver (writing the log, checking keys)"
    if stage == "plan":
        return "listing inputs and reading the ledger on the driver"
    if stage == "start ray":
        return "starting Ray (a local one's processes, or joining a cluster) for the first work"
    busy = cpu_busy(row)
    if busy is None and row["rows"]:
        processes = int(row["cpus"] or 1)
        where = "one process" if processes == 1 else f"{processes} processes"
        return f"in the CLI process ({where}): small enough to skip starting Ray"
    if busy is None:
        return "driver work: no Ray tasks ran in it"
    reason = _ray_reason(row, busy)
    if row.get("spilled_bytes"):
        reason += f"; it spilled {row['spilled_bytes'] / 2**20:.0f} MiB of blocks to disk"
    return reason


def _ray_reason(row: dict, busy: float) -> str:
    cpus = f"{row['cpus']:g} CPUs"
    gpu = accelerator_busy(row)
    if gpu is not None:
        gpus = f"{row['gpus']:g} GPU{'s' if row['gpus'] != 1 else ''}"
        if gpu >= BUSY:
            return f"accelerator-bound: its GPU actors ({gpus}) were busy {gpu:.0%} of the stage"
        if busy >= BUSY:
            return (
                f"the accelerator waited on preprocessing: its GPU actors ({gpus}) were busy "
                f"{gpu:.0%} of the stage while its CPU tasks kept {busy:.0%} of {cpus} busy"
            )
        return (
            f"waiting for work: its GPU actors ({gpus}) were busy only {gpu:.0%} of the "
            f"stage and its tasks kept {busy:.0%} of {cpus} busy"
        )
    if row["cpu_seconds"] < ON_CPU * row["task_seconds"]:
        return (
            f"waiting inside its tasks (I/O or an accelerator): they were on a CPU "
            f"{row['cpu_seconds'] / row['task_seconds']:.0%} of their time"
        )
    if busy >= BUSY:
        return f"CPU-bound: its Ray tasks kept {busy:.0%} of {cpus} busy"
    held = held_back(row) or 0.0
    if held >= HELD:
        return (
            f"held back: an operator could not launch tasks for {held:.0%} of the stage "
            f"(Ray Data's memory budget or a full queue downstream); CPUs {busy:.0%} busy"
        )
    return (
        f"waiting for work: its Ray tasks kept only {busy:.0%} of {cpus} busy "
        "(start-up, scheduling, a model loading, or too few blocks)"
    )
