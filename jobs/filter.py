"""``mmfp filter SPEC``: apply the spec's quality filters again to everything the store holds.

Kept samples that now fail a filter move to quarantine (``Filtered:<name>``),
inputs a filter refused that now pass are read again, and stored samples
without stats get them first. ``--dry-run`` prints, per filter, what would
move and changes nothing. Runs like a refresh (one commit per table, a
``_runs`` record of kind ``filter``), so it is also a job for a cluster.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from features.store import FeatureStore
from features.tables import TableStore
from jobs.errors import user_errors
from jobs.live import live_progress
from jobs.options import RayAddressOpt, SpecArg
from jobs.report import console, print_build, print_log_file, table
from jobs.runtime import new_job
from pipelines.build import build
from pipelines.build.refilter import FilterPlan, evaluate
from pipelines.build.run import BASE_TABLES
from pipelines.spec import PipelineSpec, load_spec


def dry_run(spec: PipelineSpec) -> FilterPlan:
    """The plan on the store's latest versions, with nothing written."""
    store = TableStore(spec.store.uri, storage_options=spec.store.storage_options)
    base = {name: store.version(name) for name in BASE_TABLES}
    return evaluate(store, spec, base, run_id="dry-run")[0]


def print_plan(plan: dict, *, applied: bool) -> None:
    rows = [[f["filter"], f["rule"], f["kept_failing"], f["refused_now"]] for f in plan["filters"]]
    console.print(
        table(
            "quality filters",
            ["filter", "keep when", "kept samples failing", "inputs it refuses now"],
            rows,
            right=["kept samples failing", "inputs it refuses now"],
        )
    )
    verb = ("moved", "came back", "got") if applied else ("would move", "would come back", "need")
    console.print(
        f"{plan['evaluated']} samples evaluated: {plan['move_out']} {verb[0]} to quarantine, "
        f"{plan['bring_back']} refused inputs {verb[1]}, "
        + (f"{plan['relabel']} refused by another filter now, " if plan["relabel"] else "")
        + (f"{plan['lost']} inputs whose sample is missing read again, " if plan["lost"] else "")
        + (
            f"{plan['orphaned']} inputs whose sample is missing and fails moved out, "
            if plan["orphaned"]
            else ""
        )
        + f"{plan['backfill']} stored samples {verb[2]} stats first"
    )


@user_errors
def filter_command(
    spec: SpecArg,
    dry_run_: Annotated[
        bool, typer.Option("--dry-run", help="Print what would move, per filter; change nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The plan as JSON.")] = False,
    address: RayAddressOpt = None,
) -> None:
    """Apply SPEC's quality filters again to the whole store: failing samples move to
    quarantine, refused inputs that now pass come back."""
    loaded = load_spec(str(spec))
    if dry_run_:
        plan = dry_run(loaded).as_dict()
        if as_json:
            print(json.dumps(plan, indent=2))
        else:
            print_plan(plan, applied=False)
        return
    job = new_job(address)
    with live_progress() as progress:
        result = build(
            loaded,
            run_id=job.run_id,
            kind="filter",
            incremental=True,
            refilter=True,
            execution=job.execution(progress),
        )
    if as_json:
        print(json.dumps(result.filter_plan, indent=2))
        return
    print_plan(result.filter_plan or {}, applied=True)
    store = FeatureStore(loaded.store.uri, storage_options=loaded.store.storage_options)
    print_build(result, store)
    print_log_file(job.log_file)


if __name__ == "__main__":
    typer.run(filter_command)
