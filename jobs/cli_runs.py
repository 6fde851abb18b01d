"""``mmfp runs ls`` and ``mmfp runs show RUN``: a store's runs and where their time went."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from features.runs import recent_runs, run_stages
from jobs.errors import open_store, user_errors
from jobs.options import DEFAULT_STORE, StoreOpt
from jobs.report import console, print_runs, print_stages

runs_app = typer.Typer(help="A store's runs and where their time went.", no_args_is_help=True)


@runs_app.command("ls")
@user_errors
def runs_ls(
    store: StoreOpt = DEFAULT_STORE,
    limit: Annotated[int, typer.Option(min=1, help="How many runs, newest first.")] = 20,
) -> None:
    """The newest runs: kind, start, duration, inputs, samples written, quarantined."""
    found = recent_runs(open_store(store), limit)
    if found.num_rows == 0:
        console.print("no runs recorded yet")
        return
    print_runs(found)


@runs_app.command("show")
@user_errors
def runs_show(
    run_id: Annotated[str, typer.Argument(help="A run id, as `mmfp runs ls` prints it.")],
    store: StoreOpt = DEFAULT_STORE,
    plot: Annotated[
        Path | None,
        typer.Option(help="Also write the stages as a timeline and their rows/s to this PNG."),
    ] = None,
) -> None:
    """Each stage of a run (time, share, rows/s, CPU busy) and the bottleneck, with why."""
    stages = run_stages(open_store(store), run_id)
    print_stages(run_id, stages)
    if plot is not None:
        from jobs.timeline import plot_timeline  # matplotlib only when asked

        console.print(f"timeline: {plot_timeline(run_id, stages, plot)}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.add_typer(runs_app, name="runs")
