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

import pyarrow as pa

from features.commit import SlotCommitted
from features.keys import anti_join
from features.leases import Lease
from pipelines.build.feature_sets import encode_feature_set
from pipelines.build.refilter import refilter_stage
from pipelines.build.run import BuildResult, Execution, Run, dependent_tables, new_run_id
from pipelines.build.samples import collect_samples
from pipelines.build.views import augment_samples
from pipelines.encode import FeatureSetSpec
from pipelines.errors import SpecError
from pipelines.label import Labeller
from pipelines.ledger import plan_inputs, read_state
from pipelines.listing import list_inputs
from pipelines.spec import PipelineSpec
from pipelines.split import check_split_unchanged

__all__ = ["BuildResult", "Execution", "build", "encode_only", "new_run_id"]


def build(
    spec: PipelineSpec,
    *,
    run_id: str | None = None,
    kind: str = "build",
    incremental: bool = False,
    slot: int | None = None,
    execution: Execution | None = None,
    refilter: bool = False,
) -> BuildResult:
    """Collect, label, split, deduplicate, augment and encode the sources of ``spec``.

    ``incremental`` (a refresh) reads only inputs whose fingerprint changed since
    the ledger last saw them and applies ``refresh.on_removed`` to inputs that
    disappeared. ``slot`` (e.g. a schedule's slot time in epoch seconds) makes
    the run exactly-once: every commit carries it, and a run that finds it
    already committed stops (``already_done``). One Delta commit per table that
    received rows; nothing at all when there is nothing new. Ray must be
    initialised, unless ``execution`` says how to start it (jobs pass one: Ray
    starts when a stage first has work for it, progress goes to a live display,
    and small stages may stay in this process). ``refilter`` (``mmfp filter``)
    first applies the spec's quality filters again to what the store holds
    (``pipelines.build.refilter``) and reads again the inputs they now let in.
    """
    run = Run.start(spec, run_id=run_id, kind=kind, slot=slot, execution=execution)
    if run.slot_done():
        run.result.already_done = True
        return run.result
    if spec.label:
        Labeller(spec.label).check()  # a bad function path fails here, before Ray work
    if run.store.exists("samples"):
        check_split_unchanged(run.store.properties("samples"), spec.split)
    try:
        with run.settings(), Lease(run.store, run.result.run_id):
            _run_stages(run, incremental=incremental, refilter=refilter)  # (vacuum spares it)
            return run.finish()
    except SlotCommitted:
        run.result.already_done = True  # another run of this slot committed first
        return run.result


def _run_stages(run: Run, *, incremental: bool, refilter: bool = False) -> None:
    """Plan the inputs, then collect, augment and encode in order, committing each table once."""
    spec, store, result = run.spec, run.store, run.result
    retry = None
    if refilter:
        with run.stage("filter") as timing:
            retry = refilter_stage(run)
            timing.rows = (result.filter_plan or {}).get("evaluated", 0)
    with run.stage("plan") as timing:  # listing and the ledger, on the driver
        plan = plan_inputs(
            list_inputs(spec),
            read_state(store, run.commits.base["_inputs"]),
            incremental=incremental,
            delete_removed=spec.refresh.on_removed == "delete",
            run_id=result.run_id,
            retry=retry,
        )
        timing.rows = plan.todo.refs.num_rows + sum(map(len, plan.todo.shards.values()))
    result.skipped_inputs = plan.skipped
    run.commits.write("_inputs", plan.removed)
    with run.stage("collect") as timing:
        kept = collect_samples(run, plan)
        timing.rows = result.inputs
    # a sample goes only when no current input produces it (a renamed file keeps it)
    delete = anti_join(
        pa.table({"sample_id": plan.delete_ids}), pa.table({"sample_id": kept}), ["sample_id"]
    )
    if plan.removed.num_rows:
        for name in dependent_tables(store):
            run.commits.remove_rows(name, "sample_id", delete.column("sample_id"))
        result.removed = {"inputs": plan.removed.num_rows, "samples": delete.num_rows}
    run.commit("samples")
    result.counts["samples"] = run.commits.rows.get("samples", 0)
    result.counts["already_stored"] += run.commits.dropped.get("samples", 0)
    if spec.augment:
        with run.stage("augment") as timing:
            augment_samples(run)
            timing.rows = sum(result.view_counts.values())
    run.commit("views")  # encoding reads the views this run made
    if "views" in result.view_counts:
        result.view_counts["views"] = run.commits.rows.get("views", 0)
    for feature_set in spec.encode.feature_sets if spec.encode else []:
        _encode(run, feature_set)
    run.commit_rest()  # quarantine, the ledger, removals from feature sets no spec encodes


def encode_only(
    spec: PipelineSpec,
    name: str,
    *,
    reencode: bool = False,
    run_id: str | None = None,
    execution: Execution | None = None,
) -> BuildResult:
    """Run one feature set of the spec's ``encode`` section alone (``mmfp encode``)."""
    if spec.encode is None:
        raise SpecError("the spec has no `encode` section to run")
    feature_set = spec.encode.get(name)
    run = Run.start(spec, run_id=run_id, kind="encode", execution=execution)
    if not run.store.exists("samples"):
        raise SpecError(f"no samples in {run.store.uri} yet: run `mmfp build` first")
    with run.settings(), Lease(run.store, run.result.run_id):
        _encode(run, feature_set, reencode=reencode)
        run.commit_rest()
        return run.finish()


def _encode(run: Run, feature_set: FeatureSetSpec, *, reencode: bool = False) -> None:
    with run.stage(f"encode {feature_set.name}") as timing:
        encode_feature_set(run, feature_set, reencode=reencode)
        timing.rows = run.result.feature_counts.get(feature_set.name, 0)
