"""Compose the stages for a spec into Ray Data plans and commit them to the store.

The only place that wires stages to Ray: ``run`` (the run's state and
commits), ``samples`` (collect, label, split, dedup), ``views`` (augment) and
``feature_sets`` (encode) each plan one table. Commits go in this order:
``samples`` and ``views`` as their stages finish (later stages read them),
each feature set, then ``quarantine`` and ``_inputs`` (which take rows from
several stages) and last the ``_runs`` record. Every table gets at most one
commit per run.
"""

from __future__ import annotations

import ray.data

from pipelines.build.feature_sets import encode_feature_set
from pipelines.build.run import BuildResult, Run, slot_transaction
from pipelines.build.samples import collect_samples
from pipelines.build.views import augment_samples
from pipelines.errors import SpecError
from pipelines.label import Labeller
from pipelines.ledger import plan_inputs, read_state
from pipelines.listing import list_inputs
from pipelines.spec import PipelineSpec

__all__ = ["BuildResult", "build", "encode_only"]


def build(
    spec: PipelineSpec,
    *,
    run_id: str | None = None,
    kind: str = "build",
    incremental: bool = False,
    slot: int | None = None,
) -> BuildResult:
    """Collect, label, split, deduplicate, augment and encode the sources of ``spec``.

    ``incremental`` (a refresh) reads only inputs whose fingerprint changed since
    the ledger last saw them and applies ``refresh.on_removed`` to inputs that
    disappeared. ``slot`` (e.g. a schedule's slot time in epoch seconds) makes
    the run exactly-once: a second run for a slot already recorded does nothing.
    One Delta commit per table that received rows; nothing at all when there is
    nothing new. Ray must be initialised (jobs do it).
    """
    run = Run.start(spec, run_id=run_id)
    transaction = slot_transaction(spec, kind, slot)
    if transaction and run.store.exists("_runs"):
        done = run.store.delta("_runs").transaction_version(transaction.app_id)
        if done is not None and done >= transaction.version:
            run.result.already_done = True
            return run.result
    if spec.label:
        Labeller(spec.label).check()  # a bad function path fails here, before Ray work
    # Ray Data's per-operator reservation idles one of few CPUs for ~1 s per stage start;
    # a build's stages are short, so it runs with the reservation off (restored after)
    context = ray.data.DataContext.get_current()
    reserved, context.op_resource_reservation_enabled = (
        context.op_resource_reservation_enabled,
        False,
    )
    try:
        _run_stages(run, incremental=incremental)
    finally:
        context.op_resource_reservation_enabled = reserved
    return run.finish(kind=kind, transaction=transaction)


def _run_stages(run: Run, *, incremental: bool) -> None:
    """Plan the inputs, then collect, augment and encode in order, committing each table once."""
    spec, store, result = run.spec, run.store, run.result
    plan = plan_inputs(
        list_inputs(spec),
        read_state(store, run.commits.base["_inputs"]),
        incremental=incremental,
        delete_removed=spec.refresh.on_removed == "delete",
        run_id=result.run_id,
    )
    result.skipped_inputs = plan.skipped
    if plan.removed.num_rows:
        run.commits.write("_inputs", plan.removed)
        feature_sets = [n for n in store.tables() if n.startswith("features/")]
        for name in ("samples", "views", *feature_sets):
            run.commits.remove_rows(name, "sample_id", plan.delete_ids)
        result.removed = {"inputs": plan.removed.num_rows, "samples": len(plan.delete_ids)}
    collect_samples(run, plan)
    if spec.augment:
        augment_samples(run)
    run.commit("views")  # encoding reads the views this run made
    for feature_set in spec.encode.feature_sets if spec.encode else []:
        encode_feature_set(run, feature_set)
    run.commit_rest()  # quarantine, the ledger, removals from feature sets no spec encodes


def encode_only(spec: PipelineSpec, name: str, *, reencode: bool = False) -> BuildResult:
    """Run one feature set of the spec's ``encode`` section alone (``mmfp encode``)."""
    if spec.encode is None:
        raise SpecError("the spec has no `encode` section to run")
    feature_set = spec.encode.get(name)
    run = Run.start(spec)
    if not run.store.exists("samples"):
        raise SpecError(f"no samples in {run.store.uri} yet: run `mmfp build` first")
    encode_feature_set(run, feature_set, reencode=reencode)
    run.commit_rest()
    return run.finish(kind="encode")
