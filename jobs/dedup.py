"""``mmfp dedup SPEC``: mark the store's near duplicates with the spec's ``near_duplicates``.

Fingerprints and pair search run as Ray tasks (``pipelines.neardup``); the marks
replace the ``duplicates`` table in one commit (``--dry-run``: printed only).
The report counts pairs per method, marked samples per split, and the
cross-split pairs a train/test split would leak; ``--plot`` draws the largest
near-duplicate sets side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from features.duplicates import duplicate_rows, summarise, write_duplicates
from features.tables import TableStore
from jobs.errors import user_errors
from jobs.options import RayAddressOpt, SpecArg
from jobs.report import console, print_log_file
from jobs.report import table as grid
from jobs.runtime import new_job
from pipelines.errors import SpecError
from pipelines.neardup import find_near_duplicates
from pipelines.spec import load_spec


@user_errors
def dedup_command(
    spec: SpecArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be marked; write nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The report as JSON.")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Draw the largest near-duplicate sets as a PNG here.")
    ] = None,
    address: RayAddressOpt = None,
) -> None:
    """Find near-duplicate samples (image, audio, text fingerprints or a feature set's
    embeddings) and mark them in the duplicates table; nothing is deleted."""
    loaded = load_spec(str(spec))
    if loaded.near_duplicates is None:
        raise SpecError(
            "the spec has no `near_duplicates` section: add one, e.g.\n"
            "near_duplicates:\n  methods: [{method: image}, {method: audio}]"
        )
    job = new_job(address, prefix="dedup-")
    job.start_ray()
    store = TableStore(loaded.store.uri, storage_options=loaded.store.storage_options)
    with console.status("fingerprinting and searching"):
        found = find_near_duplicates(store, loaded.near_duplicates, loaded.decode)
    rows = duplicate_rows(
        store, found.marks, samples_version=found.samples_version, run_id=job.run_id
    )
    report = {
        **summarise(rows),
        "samples_version": found.samples_version,
        "pairs_by_method": found.pairs_by_method,
        "pairs": found.pairs.num_rows,
        "written_version": None,
    }
    if not dry_run:
        report["written_version"] = write_duplicates(
            store, rows, samples_version=found.samples_version, run_id=job.run_id
        )
    if plot is not None:
        from jobs.dedup_plot import plot_duplicate_sets

        report["plot"] = str(plot_duplicate_sets(store, rows, plot))
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print_report(report)
    print_log_file(job.log_file)


def print_report(report: dict) -> None:
    console.print(
        grid(
            f"near pairs (samples v{report['samples_version']})",
            ["method", "pairs"],
            [[m, n] for m, n in report["pairs_by_method"].items()],
        )
    )
    console.print(grid("marked duplicates", ["split", "samples"], list(report["by_split"].items())))
    leaks = report["cross_split"]
    if leaks:
        console.print(
            grid(
                "cross-split duplicates (leak without exclude_duplicates)",
                ["split <- kept in", "samples"],
                list(leaks.items()),
            )
        )
    else:
        console.print("no near duplicate crosses a split")
    where = (
        f"written as duplicates v{report['written_version']}"
        if report["written_version"] is not None
        else "dry run: nothing written"
    )
    console.print(f"{report['marked']} samples marked from {report['pairs']} pairs; {where}")
    if report.get("plot"):
        console.print(f"duplicate sets -> {report['plot']}")
