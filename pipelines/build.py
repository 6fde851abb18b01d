"""Compose the stages for a spec into Ray Data plans and commit them to the store.

This is the only module that wires stages to Ray (datasets, actors, sinks) and
decides the order of commits: ``samples`` and ``views`` as their stages finish,
then ``quarantine`` and ``_inputs`` (which take rows from several stages) and
last the ``_runs`` record. Every table gets at most one commit per run.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from deltalake.transaction import AddAction, RemoveAction, Transaction
from ray.data import ActorPoolStrategy

from features.commit import filter_files, rewrite_without, write_file
from features.schema import FEATURES_PREFIX, INPUTS, conform
from features.sink import StoreSink
from features.store import FeatureStore
from pipelines.augment import VIEW_INPUT_COLUMNS, make_missing_views
from pipelines.dedup import IdRegistry, mark_duplicates
from pipelines.errors import SpecError
from pipelines.featurize import encode_feature_set
from pipelines.inputs import (
    LedgerState,
    Listing,
    changed_only,
    news_mask,
    removable_ids,
    removal_rows,
    removed_inputs,
)
from pipelines.label import Labeller, label_vocabulary
from pipelines.plan import collected_dataset, list_inputs
from pipelines.route import SampleRouter, ViewRouter
from pipelines.spec import PipelineSpec
from pipelines.split import split_batch

LABEL_VOCABULARY_KEY = "mmfp.label_vocabulary"
OUTCOMES = ("samples", "quarantined", "duplicates", "already_stored", "already_quarantined")
BASE_TABLES = ("samples", "quarantine", "views", "_inputs")


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

    @property
    def inputs(self) -> int:
        return sum(self.counts.get(k, 0) for k in OUTCOMES)

    @property
    def changed(self) -> bool:
        return bool(self.versions)


@dataclass
class Run:
    """One build's state: the store versions it read and the files it still has to commit."""

    spec: PipelineSpec
    store: FeatureStore
    result: BuildResult
    base: dict[str, int | None]
    known_quarantine: frozenset[str]
    pending: dict[str, list[AddAction]] = field(default_factory=dict)
    removals: dict[str, tuple[list[RemoveAction], list[AddAction]]] = field(default_factory=dict)

    def defer(self, name: str, actions: list[AddAction]) -> None:
        self.pending.setdefault(name, []).extend(actions)

    def commit_pending(self, name: str) -> None:
        if name in self.pending or name in self.removals:
            self.commit(name, self.pending.pop(name, []))

    def commit(self, name: str, actions: list[AddAction]) -> None:
        removes, rewritten = self.removals.pop(name, ([], []))
        version = self.store.commit(
            name,
            [*actions, *rewritten],
            run_id=self.result.run_id,
            base_version=self.base.get(name),
            removes=removes,
        )
        if version is not None:
            self.result.versions[name] = version


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


def sample_properties(spec: PipelineSpec) -> dict[str, str]:
    """Table metadata of ``samples``: the label vocabulary when the spec fixes one."""
    vocabulary = label_vocabulary(spec.label)
    return {} if vocabulary is None else {LABEL_VOCABULARY_KEY: json.dumps(vocabulary)}


def slot_transaction(spec: PipelineSpec, kind: str, slot: int | None) -> Transaction | None:
    """The Delta app transaction of a scheduled slot: a retried job cannot commit it twice."""
    return None if slot is None else Transaction(f"mmfp:{spec.name}:{kind}", slot)


def build(
    spec: PipelineSpec,
    *,
    run_id: str | None = None,
    kind: str = "build",
    incremental: bool = False,
    slot: int | None = None,
) -> BuildResult:
    """Collect, label, split, deduplicate and augment the sources of ``spec`` into its store.

    ``incremental`` (a refresh) reads only inputs whose fingerprint changed since
    the ledger last saw them and applies ``refresh.on_removed`` to inputs that
    disappeared. ``slot`` (e.g. a schedule's slot time in epoch seconds) makes
    the run exactly-once: a second run for a slot already recorded does nothing.
    One Delta commit per table that received rows; nothing at all when there is
    nothing new. Ray must be initialised (jobs do it).
    """
    store = FeatureStore(spec.store.uri, storage_options=spec.store.storage_options)
    result = BuildResult(run_id=run_id or new_run_id(), store_uri=store.uri)
    transaction = slot_transaction(spec, kind, slot)
    if transaction and store.exists("_runs"):
        done = store.delta("_runs").transaction_version(transaction.app_id)
        if done is not None and done >= transaction.version:
            result.already_done = True
            return result
    if spec.label:
        Labeller(spec.label).check()  # a bad function path fails here, before Ray work
    base = {name: store.version(name) for name in BASE_TABLES}
    known = frozenset(
        store.column_values("quarantine", "quarantine_id", base["quarantine"]).to_pylist()
    )
    run = Run(spec, store, result, base, known)
    listing = list_inputs(spec)
    state = LedgerState.read(store, base["_inputs"])
    # Ray Data's per-operator reservation idles one of few CPUs for ~1 s per stage start;
    # a build's stages are short, so it runs with the reservation off (restored after)
    context = ray.data.DataContext.get_current()
    reserved, context.op_resource_reservation_enabled = (
        context.op_resource_reservation_enabled,
        False,
    )
    try:
        _run_stages(run, listing, state, incremental=incremental)
    finally:
        context.op_resource_reservation_enabled = reserved
    result.finished_at = datetime.now(UTC)
    if result.changed:
        record_run(store, spec, result, kind=kind, transaction=transaction)
    return result


def _run_stages(run: Run, listing: Listing, state: LedgerState, *, incremental: bool) -> None:
    """Collect, augment and encode in order, committing each table once."""
    spec, result = run.spec, run.result
    if incremental:
        plan_removals(run, listing, state)
        todo = changed_only(listing, state)
        result.skipped_inputs = listing.refs.num_rows - todo.refs.num_rows
    else:
        todo = listing
    collect_samples(run, todo, state)
    if spec.augment:
        augment_samples(run)
    run.commit_pending("views")  # encoding reads the views this run made
    for feature_set in spec.encode.feature_sets if spec.encode else []:
        encode_feature_set(run, feature_set)
    for name in [*run.removals, "quarantine", "_inputs"]:  # what no stage committed yet
        run.commit_pending(name)


def encode_only(spec: PipelineSpec, name: str, *, reencode: bool = False) -> BuildResult:
    """Run one feature set of the spec's ``encode`` section alone (``mmfp encode``)."""
    if spec.encode is None:
        raise SpecError("the spec has no `encode` section to run")
    feature_set = spec.encode.get(name)
    store = FeatureStore(spec.store.uri, storage_options=spec.store.storage_options)
    if not store.exists("samples"):
        raise SpecError(f"no samples in {store.uri} yet: run `mmfp build` first")
    result = BuildResult(run_id=new_run_id(), store_uri=store.uri)
    base = {n: store.version(n) for n in BASE_TABLES}
    run = Run(spec, store, result, base, frozenset())
    encode_feature_set(run, feature_set, reencode=reencode)
    result.finished_at = datetime.now(UTC)
    if result.changed:
        record_run(store, spec, result, kind="encode")
    return result


def plan_removals(run: Run, listing: Listing, state: LedgerState) -> None:
    """Record inputs that disappeared; with ``on_removed: delete`` prepare their rows' removal."""
    gone = removed_inputs(listing, state)
    if not gone:
        return
    store, run_id = run.store, run.result.run_id
    ledger = conform(removal_rows(gone, run_id), INPUTS)
    run.defer(
        "_inputs", [write_file(store.table_uri("_inputs"), store.storage_options, ledger, run_id)]
    )
    ids = removable_ids(gone, state) if run.spec.refresh.on_removed == "delete" else set()
    feature_tables = [n for n in store.tables() if n.startswith(FEATURES_PREFIX)]
    for name in ("samples", "views", *feature_tables):
        if ids and store.exists(name):
            dt = store.delta(name)
            run.removals[name] = rewrite_without(
                dt, store.storage_options, "sample_id", ids, run_id
            )
    run.result.removed = {"inputs": len(gone), "samples": len(ids)}


def collect_samples(run: Run, listing: Listing, state: LedgerState) -> None:
    """Listed inputs -> ``samples`` (committed now); quarantine and ledger rows are deferred."""
    spec, store, result = run.spec, run.store, run.result
    if not listing.refs.num_rows and not any(listing.shards.values()):
        if "samples" in run.removals:
            run.commit("samples", [])
        return
    registry = IdRegistry.remote(store, run.base["samples"])
    ds = collected_dataset(spec, listing)
    if spec.label and Labeller(spec.label).needs_model:  # zero-shot: the model loads once
        ds = ds.map_batches(
            Labeller,
            fn_constructor_args=(spec.label,),
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=1),
        )
    elif spec.label:
        ds = ds.map_batches(Labeller(spec.label), batch_format="pyarrow")
    ds = ds.map_batches(
        split_batch,
        batch_format="pyarrow",
        fn_kwargs={"seed": spec.split.seed, "ratios": spec.split.ratios, "by": spec.split.by},
    )
    ds = ds.map_batches(mark_duplicates, batch_format="pyarrow", fn_kwargs={"registry": registry})
    sink = StoreSink(
        store,
        SampleRouter(result.run_id, run.known_quarantine),
        run_id=result.run_id,
        tables=["samples", "quarantine", "_inputs"],
        properties={"samples": sample_properties(spec)},
        deferred=("samples", "quarantine", "_inputs"),
    )
    ds.write_datasink(sink)
    ray.kill(registry)
    result.counts.update({k: sink.counts.get(k, 0) for k in OUTCOMES})
    run.commit("samples", sink.pending.get("samples", []))
    run.defer("quarantine", sink.pending.get("quarantine", []))
    # a rebuild sees every input again: keep only ledger rows that tell something new
    ledger = filter_files(
        store.table_uri("_inputs"),
        store.storage_options,
        sink.pending.get("_inputs", []),
        lambda rows: news_mask(rows, state),
        result.run_id,
    )
    run.defer("_inputs", ledger)


def augment_samples(run: Run) -> None:
    """Train samples without their views at this seed -> ``views`` rows (deferred).

    Reads ``samples`` at its committed version, so views also catch up on samples
    stored by earlier runs (e.g. after ``augment`` is added to a spec).
    """
    spec, store, result = run.spec, run.store, run.result
    augment = spec.augment
    assert augment is not None
    existing: frozenset[tuple[str, int]] = frozenset()
    if run.base["views"] is not None:
        rows = store.to_arrow("views", run.base["views"], columns=["sample_id", "view", "seed"])
        rows = rows.filter(pc.equal(rows.column("seed"), augment.seed))
        existing = frozenset(
            zip(rows.column("sample_id").to_pylist(), rows.column("view").to_pylist(), strict=True)
        )
    train = store.to_arrow("samples", columns=["sample_id", "split"])
    train_ids = train.filter(pc.equal(train.column("split"), "train")).column("sample_id")
    if all((sid, augment.views_per_sample - 1) in existing for sid in train_ids.to_pylist()):
        return  # every train sample has all its views: skip reading media at all
    ds = store.table("samples", columns=list(VIEW_INPUT_COLUMNS))
    ds = ds.map_batches(
        make_missing_views,
        batch_format="pyarrow",
        batch_size=spec.resources.batch_size,
        fn_kwargs={"spec": augment, "run_id": result.run_id, "existing": existing},
    )
    sink = StoreSink(
        store,
        ViewRouter(result.run_id, run.known_quarantine),
        run_id=result.run_id,
        tables=["views", "quarantine"],
        deferred=("views", "quarantine"),
    )
    ds.write_datasink(sink)
    result.view_counts = dict(sink.counts)
    result.view_counts.setdefault("views", 0)
    run.defer("views", sink.pending.get("views", []))
    run.defer("quarantine", sink.pending.get("quarantine", []))


def record_run(
    store: FeatureStore,
    spec: PipelineSpec,
    result: BuildResult,
    *,
    kind: str,
    transaction: Transaction | None = None,
) -> None:
    """Append the run's lineage row to ``_runs``: the last commit of a run."""
    row: dict[str, Any] = {
        "run_id": result.run_id,
        "kind": kind,
        "spec_name": spec.name,
        "spec_hash": spec.spec_hash(),
        "code_version": code_version(),
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "inputs": result.inputs,
        "samples_written": result.counts["samples"],
        "quarantined": result.counts["quarantined"],
        "duplicates": result.counts["duplicates"],
        "already_stored": result.counts["already_stored"],
        "views_written": result.view_counts.get("views", 0),
        "versions": json.dumps(result.versions, sort_keys=True),
    }
    version = store.append(
        "_runs", pa.Table.from_pylist([row]), run_id=result.run_id, transaction=transaction
    )
    if version is not None:
        result.versions["_runs"] = version
