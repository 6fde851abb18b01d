"""``mmfp dedup SPEC``: mark the store's near duplicates with the spec's ``near_duplicates``.

Fingerprints and pair search run as Ray tasks (``pipelines.neardup``); the marks
replace the ``duplicates`` table in one commit (``--dry-run``: printed only).
Near-duplicate sets that span splits are joined into one split with their
groups (``pipelines.same_split``; ``same_split: false`` only reports them).
The report counts pairs per method, marked samples per split, the samples
moved, and the cross-split pairs still left (groups pinned apart); ``--plot``
draws the largest near-duplicate sets side by side.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer

from features.duplicates import duplicate_rows, leakage, summarise, write_duplicates
from features.split_moves import move_samples, record_moves
from features.tables import TableStore
from jobs.errors import user_errors
from jobs.options import RayAddressOpt, SpecArg
from jobs.report import console, print_log_file
from jobs.report import table as grid
from jobs.runtime import new_job
from pipelines.errors import SpecError
from pipelines.neardup import find_near_duplicates
from pipelines.same_split import join_near_sets, largest_joined
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
    near = loaded.near_duplicates
    samples = store.to_arrow(
        "samples", found.samples_version, columns=["sample_id", "group_id", "split"]
    )
    joined = join_near_sets(
        samples,
        found.pairs if near.same_split else found.pairs.slice(0, 0),
        by=loaded.split.by,
        pinned=loaded.split.groups,
        max_set=largest_joined(near.same_split_max, samples.num_rows),
    )
    marks = functools.partial(
        duplicate_rows, found.marks, samples_version=found.samples_version, run_id=job.run_id
    )
    split = dict(zip(*(samples.column(c).to_pylist() for c in ("sample_id", "split")), strict=True))
    rows = marks(split | joined.moved_to())
    report = {
        **summarise(rows),
        "cross_split_found": leakage(marks(split)),
        "samples_version": found.samples_version,
        "pairs_by_method": found.pairs_by_method,
        "pairs": found.pairs.num_rows,
        "moved": joined.counts(),
        "joined_sets": joined.joined,
        "split_conflicts": joined.conflicts,
        "too_large_to_join": joined.too_large,
        "written_version": None,
        "moved_versions": {},
    }
    if not dry_run:
        if near.same_split:  # also finishes the moves of a killed dedup
            record_moves(store, joined.groups, job.run_id)
            report["moved_versions"] = move_samples(store, joined.moves, job.run_id)
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
    if report["moved"]:
        moved = sum(report["moved"].values())
        crossed = sum(report["cross_split_found"].values())
        console.print(
            grid(
                f"moved so near duplicates share a split ({crossed} marked samples crossed "
                f"splits; {report['joined_sets']} sets joined)",
                ["from -> to", "samples"],
                [[k.replace("->", " -> "), n] for k, n in report["moved"].items()],
            )
        )
        if report["written_version"] is None:
            console.print(f"dry run: {moved} samples would move")
    if report["split_conflicts"]:
        console.print(
            f"{report['split_conflicts']} near-duplicate sets hold groups pinned to different "
            "splits (`split.groups`): left where they are"
        )
    if report["too_large_to_join"]:
        console.print(
            f"{report['too_large_to_join']} near-duplicate sets with their groups are larger "
            "than `same_split_max`: left where they are"
        )
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
        after = "once moved, " if report["moved"] else ""
        console.print(f"{after}no near duplicate crosses a split")
    where = (
        f"written as duplicates v{report['written_version']}"
        if report["written_version"] is not None
        else "dry run: nothing written"
    )
    console.print(f"{report['marked']} samples marked from {report['pairs']} pairs; {where}")
    if report.get("plot"):
        console.print(f"duplicate sets -> {report['plot']}")
