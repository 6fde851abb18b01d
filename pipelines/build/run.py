"""One run of a spec: its id, what it found, the store versions it reads and commits.

A ``Run`` holds the spec, the store, the counts the stages report
(``BuildResult``) and the run's ``RunCommits``; the plan modules beside this
one (samples, views, feature sets) add files to it and commit their tables.
Its row in ``_runs`` is its first commit and, completed, its last.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from deltalake.transaction import Transaction

from features.commit import RunCommits
from features.schema import STAGES
from features.sink import StoreSink
from features.tables import TableStore
from pipelines.build.in_process import (
    Step,
    default_workers,
    input_limit,
    no_cuda,
    run_steps,
    stored_rows,
)
from pipelines.progress import Listener, StageProgress, report_done, watching
from pipelines.spec import PipelineSpec

if TYPE_CHECKING:
    import ray.data

OUTCOMES = (
    "samples",
    "quarantined",
    "filtered",
    "duplicates",
    "already_stored",
    "already_quarantined",
)
BASE_TABLES = ("samples", "quarantine", "views", "quality", "_inputs")


@dataclass
class TaskStats:
    """What one Ray Data execution's tasks did, from Ray Data's own execution stats."""

    task_seconds: float = 0.0  # wall time, summed over tasks and operators
    cpu_seconds: float = 0.0  # CPU time, summed likewise
    backpressure_seconds: float = 0.0  # the longest any operator could not launch a task
    peak_task_bytes: int = 0  # the largest memory (USS) one task reached
    spilled_bytes: int = 0  # object store bytes spilled to disk
    accelerator_seconds: float = 0.0  # the accelerator operator's time in its function


@dataclass(kw_only=True)
class StageTiming(TaskStats):
    """Where one stage's time went: its wall time (without the stages nested in it), what
    it produced, what its Ray tasks did (``TaskStats``, summed over its executions) with
    the cluster's CPUs and GPUs then, and the driver's peak memory at its end."""

    stage: str
    started_at: datetime
    seconds: float = 0.0
    rows: int = 0
    bytes: int = 0
    cpus: float = 0.0
    gpus: float = 0.0
    driver_peak_bytes: int = 0

    def add(self, stats: TaskStats) -> None:
        """Add one execution's task stats (peak memory is a maximum, the rest sums)."""
        for f in fields(TaskStats):
            mine, theirs = getattr(self, f.name), getattr(stats, f.name)
            setattr(
                self, f.name, max(mine, theirs) if f.name == "peak_task_bytes" else mine + theirs
            )


@dataclass(frozen=True)
class Execution:
    """How a run reaches compute; jobs make one (``jobs.runtime.Job.execution``).

    ``start_ray`` starts or joins Ray, called only once a stage has work for it, so a
    run with nothing to do never pays for a cluster; ``progress`` is told when each
    stage starts, advances and ends; with ``small_in_process`` a stage with few rows
    runs in this process while Ray is not started (``pipelines.build.in_process``).
    """

    start_ray: Callable[[], None] | None = None
    progress: Listener | None = None
    small_in_process: bool = False


@dataclass
class BuildResult:
    """What one build did: counts per outcome and the table versions it committed."""

    run_id: str
    store_uri: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    view_counts: dict[str, int] = field(default_factory=dict)
    feature_counts: dict[str, int] = field(default_factory=dict)  # rows encoded per feature set
    removed: dict[str, int] = field(default_factory=dict)  # inputs gone, samples deleted
    versions: dict[str, int] = field(default_factory=dict)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    skipped_inputs: int = 0  # unchanged inputs a refresh did not read again
    already_done: bool = False  # the slot was committed by an earlier attempt
    stages: dict[str, StageTiming] = field(default_factory=dict)  # in the order they ran
    filter_plan: dict[str, Any] | None = None  # what `mmfp filter` evaluated (per filter)

    @property
    def inputs(self) -> int:
        return sum(self.counts.get(k, 0) for k in OUTCOMES)

    @property
    def changed(self) -> bool:
        return bool(self.versions)


@dataclass
class Run:
    """One run's state: spec, store, counts, commits, and the quarantine rows already stored.

    The run's ``_runs`` row is its first commit (written just before the first data
    commit, ``finished_at`` empty) and is replaced by the full record as its last, so
    every committed row traces to a run record, and a run that died shows as unfinished.
    """

    spec: PipelineSpec
    store: TableStore
    result: BuildResult
    commits: RunCommits
    known_quarantine: pa.Table  # quarantine_id of every row stored before the run
    kind: str = "build"
    execution: Execution = field(default_factory=Execution)
    _open_stages: list[StageTiming] = field(default_factory=list)
    _on_ray: ExitStack | None = None  # until Ray is first used: where its settings go

    @classmethod
    def start(
        cls,
        spec: PipelineSpec,
        *,
        run_id: str | None = None,
        kind: str = "build",
        slot: int | None = None,
        execution: Execution | None = None,
    ) -> Run:
        """Open the spec's store and pin the versions the run reads."""
        store = TableStore(spec.store.uri, storage_options=spec.store.storage_options)
        result = BuildResult(run_id=run_id or new_run_id(), store_uri=store.uri)
        commits = RunCommits(store, result.run_id, transaction=slot_transaction(spec, kind, slot))
        commits.pin(*BASE_TABLES)
        known = store.column_values("quarantine", "quarantine_id", commits.base["quarantine"])
        known = pa.table({"quarantine_id": known})
        return cls(spec, store, result, commits, known, kind, execution or Execution())

    def in_process(
        self, rows: int, *, model: bool = False, inputs: bool = False, unknown_count: bool = False
    ) -> bool:
        """True when a stage of ``rows`` rows runs in this process rather than on Ray: small
        runs allowed, Ray not started yet, not too many rows (``resources.in_process_inputs``
        for collect, which reads new ``inputs`` from their files, ``in_process_rows`` for a
        stage over stored rows; with ``unknown_count`` more rows than it knows of, WebDataset
        shards' members, so only without a limit), and a model only on a CPU-only box."""
        if not self.execution.small_in_process or ray_running():
            return False
        resources = self.spec.resources
        configured = resources.in_process_inputs if inputs else resources.in_process_rows
        limit = input_limit(configured, default_workers(0))
        if rows > limit or (unknown_count and limit < sys.maxsize):
            return False
        return not model or no_cuda()

    def stored_rows(self, table: str, columns: list[str], todo: pa.Table) -> Iterator[pa.Table]:
        """The stored rows a stage run here works on (``todo``'s sample ids), a block's
        worth (``resources.rows_per_block``) at a time."""
        return stored_rows(self.store, table, columns, todo, self.spec.resources.rows_per_block)

    def run_here(
        self,
        tables: Iterable[pa.Table],
        steps: Sequence[Step],
        sink: StoreSink,
        *,
        rows: int,
        batch_size: int | None = None,
        rows_per_file: int | None = None,
        serial_from: int | None = None,
    ) -> None:
        """Run a stage's steps over ``tables`` (``rows`` rows in all) in this process
        (``in_process`` said so), the per-batch ones in forked workers; the stage records
        how many processes ran them as its ``cpus``."""
        resources = self.spec.resources
        processes = run_steps(
            tables,
            steps,
            sink,
            batch_size or resources.batch_size,
            rows_per_file or resources.rows_per_block,
            workers=default_workers(resources.in_process_workers),
            serial_from=serial_from,
            done=lambda finished: report_done(finished / max(rows, 1)),
        )
        if self._open_stages:
            self._open_stages[-1].cpus = processes

    def ensure_ray(self) -> None:
        """Make sure Ray is up before a stage hands it work (``Execution.start_ray``),
        with the run's Ray Data settings (``pipelines.build.on_ray``) in force."""
        if not ray_running():
            if self.execution.start_ray is None:
                raise RuntimeError("Ray is not initialised: call ray.init() (jobs do it)")
            with self.stage("start ray"):  # its own row: not the first stage's cost
                self.execution.start_ray()
        if self._on_ray is not None:  # once per run
            from pipelines.build.on_ray import run_settings

            self._on_ray.enter_context(run_settings())
            self._on_ray = None

    @contextmanager
    def settings(self) -> Iterator[None]:
        """The span of the run: what ``ensure_ray`` sets in Ray Data is undone at its end."""
        with ExitStack() as stack:
            self._on_ray = stack
            try:
                yield
            finally:
                self._on_ray = None

    def slot_done(self) -> bool:
        """True when a finished run already committed this run's scheduled slot."""
        transaction = self.commits.transaction
        if transaction is None or not self.store.exists("_runs"):
            return False
        done = self.store.delta("_runs").transaction_version(transaction.app_id)
        return done is not None and done >= transaction.version

    @contextmanager
    def stage(self, name: str) -> Iterator[StageTiming]:
        """Time a stage of the run; a stage inside another is taken out of the outer's time."""
        timing = self.result.stages.setdefault(
            name, StageTiming(stage=name, started_at=datetime.now(UTC))
        )
        self._open_stages.append(timing)
        start = time.perf_counter()
        progress = StageProgress(name, quarantined=self._quarantined())
        listener = self.execution.progress
        try:
            if listener is None:
                yield timing
            else:
                listener(progress)
                with watching(progress, listener):
                    yield timing
        finally:
            seconds = time.perf_counter() - start
            self._open_stages.pop()
            timing.seconds += seconds
            timing.driver_peak_bytes = driver_peak_bytes()
            if self._open_stages:
                self._open_stages[-1].seconds -= seconds
            if listener is not None:
                progress.finished, progress.rows = True, timing.rows
                progress.quarantined = self._quarantined()
                listener(progress)

    def _quarantined(self) -> int:
        """Inputs and views this run sent to quarantine so far."""
        counts = self.result.counts
        return (
            counts["quarantined"]
            + counts["filtered"]
            + self.result.view_counts.get("quarantined", 0)
        )

    def measure(
        self, ds: ray.data.Dataset, accelerator: str | None = None, gpus: float = 0.0
    ) -> None:
        """Add the Ray tasks of an executed dataset to the stage that is running;
        ``accelerator`` names the operator that holds GPUs, if one does, and ``gpus`` how
        many its pool may hold at most (its busy fraction is measured against those)."""
        if not self._open_stages:
            return
        timing = self._open_stages[-1]
        timing.add(task_stats(ds, accelerator))
        import ray  # a dataset ran: Ray is up

        resources = ray.cluster_resources()
        timing.cpus = float(resources.get("CPU", 0))
        if accelerator:
            timing.gpus = min(gpus, float(resources.get("GPU", 0)))

    def commit(self, name: str) -> None:
        """Commit what the run has for ``name`` and record the version it made."""
        if not self.commits.has_pending(name):
            return
        if "_runs" not in self.result.versions:
            self._record()  # the run's record comes before its first data
        with self.stage(f"commit {name}") as timing:
            timing.bytes += self.commits.pending_bytes(name)
            version = self.commits.commit(name)
            timing.rows = self.commits.rows.get(name, 0)  # rows the table took from this run
        if version is not None:
            self.result.versions[name] = version

    def commit_rest(self) -> None:
        """Commit every table that still has files or removals pending."""
        for name in [*self.commits.pending, *self.commits.removals]:
            self.commit(name)

    def finish(self) -> BuildResult:
        """Stamp the end and, when the run changed the store, complete its ``_runs`` row."""
        result = self.result
        result.finished_at = datetime.now(UTC)
        if result.changed:
            self.commits.write("_stages", stage_rows(result))
            version = self.commits.commit("_stages")
            if version is not None:
                result.versions["_stages"] = version
            self.commits.remove_rows("_runs", "run_id", pa.array([result.run_id]))
            self._record()
        return result

    def _record(self) -> None:
        self.commits.write(
            "_runs", pa.Table.from_pylist([run_record(self.spec, self.result, self.kind)])
        )
        version = self.commits.commit("_runs")
        if version is not None:
            self.result.versions["_runs"] = version


def ray_running() -> bool:
    """Ray is up in this process; finding out never imports Ray."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def dependent_tables(store: TableStore) -> list[str]:
    """The tables whose rows belong to a sample: a sample that leaves goes from all of them."""
    feature_sets = [n for n in store.tables() if n.startswith("features/")]
    return ["samples", "views", *(["quality"] if store.exists("quality") else []), *feature_sets]


def stage_rows(result: BuildResult) -> pa.Table:
    """The run's stages as rows of ``_stages``."""
    rows = [{"run_id": result.run_id, **asdict(t)} for t in result.stages.values()]
    return pa.Table.from_pylist(rows, schema=STAGES)


def task_stats(ds: ray.data.Dataset, accelerator: str | None = None) -> TaskStats:
    """What the dataset's Ray tasks did, from Ray Data's execution stats and each
    operator's runtime metrics; zeros where a Ray version does not report them."""
    stats = TaskStats()
    try:
        summary = ds.get_stats_summary()  # Ray Data's stats as data (``ds.stats()`` is text)
    except Exception:  # noqa: BLE001 - the stats are a report, never a reason to fail a run
        return stats
    pending = [summary]
    while pending:
        node = pending.pop()
        pending.extend(node.parents)
        for op in node.operators_stats:
            stats.task_seconds += op.wall_time.sum if op.wall_time else 0.0
            stats.cpu_seconds += op.cpu_time.sum if op.cpu_time else 0.0
        metrics = node.extra_metrics or {}  # the operator's runtime metrics, at its end
        held = metrics.get("task_submission_backpressure_time") or 0.0
        stats.backpressure_seconds = max(stats.backpressure_seconds, held)
        uss = (metrics.get("max_uss_bytes") or {}).get("max") or 0
        stats.peak_task_bytes = max(stats.peak_task_bytes, int(uss))
        stats.spilled_bytes += int(metrics.get("obj_store_mem_spilled") or 0)
        names = [op.operator_name for op in node.operators_stats]
        if accelerator and any(n.endswith(f"({accelerator})") for n in names):
            stats.accelerator_seconds += metrics.get("function_body_time_s") or 0.0
    return stats


def driver_peak_bytes() -> int:
    """The peak resident memory of this (the driver's) process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    version = package_version("mmfp")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{sha}"


def slot_transaction(spec: PipelineSpec, kind: str, slot: int | None) -> Transaction | None:
    """The Delta app transaction of a scheduled slot, in every commit of the run: a retried
    or doubled job cannot commit it twice. Keyed by the spec's identity (its hash), so two
    specs that share a store (or a name) never suppress each other's slots."""
    return None if slot is None else Transaction(f"mmfp:{kind}:{spec.spec_hash()}", slot)


def run_record(spec: PipelineSpec, result: BuildResult, kind: str) -> dict[str, Any]:
    """The run's lineage row in ``_runs``."""
    return {
        "run_id": result.run_id,
        "kind": kind,
        "spec_name": spec.name,
        "spec_hash": spec.spec_hash(),
        "code_version": code_version(),
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "inputs": result.inputs,
        "samples_written": result.counts["samples"],
        "quarantined": result.counts["quarantined"] + result.counts["filtered"],
        "duplicates": result.counts["duplicates"],
        "already_stored": result.counts["already_stored"],
        "views_written": result.view_counts.get("views", 0),
        "versions": json.dumps(result.versions, sort_keys=True),
    }
