"""The ``mmfp`` command line (typer). Thin: parse, call the library, print a summary.

Each job module defines its own command (``jobs.build``, ``jobs.refresh``,
``jobs.encode``, ``jobs.cli_train``, ``jobs.cli_query``, ``jobs.cli_cluster``)
so it also runs alone as ``python -m jobs.<module>``; this module gathers them
into one app, which ``python -m jobs`` and the ``mmfp`` script run. User
mistakes (a bad spec, an unknown table or version) print one line and exit
with code 2; nothing prints a traceback for them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from jobs.build import build_command
from jobs.cli_cluster import register as register_cluster
from jobs.cli_export import export_command
from jobs.cli_query import register as register_query
from jobs.cli_runs import register as register_runs
from jobs.cli_serve import serve_command
from jobs.cli_train import evaluate, train, tune
from jobs.dedup import dedup_command
from jobs.encode import encode_command
from jobs.errors import open_store, user_errors
from jobs.filter import filter_command
from jobs.options import DEFAULT_STORE, RayAddressOpt, StoreOpt, TableArg
from jobs.refresh import refresh_command
from jobs.report import print_describe, print_history, print_tables

app = typer.Typer(
    help="mmfp: a multimodal feature platform on Ray and Delta Lake.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(
    help="Look at a feature store: tables, schemas, versions.", no_args_is_help=True
)
app.add_typer(store_app, name="store")


@app.callback()
def main(
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the traceback of an unexpected error.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", help="Show Ray's log lines here too (default: only in the run's log file)."
        ),
    ] = False,
) -> None:
    """mmfp: a multimodal feature platform on Ray and Delta Lake."""
    if debug:
        os.environ["MMFP_DEBUG"] = "1"  # read by jobs.errors.user_errors
    if verbose:
        os.environ["MMFP_VERBOSE"] = "1"  # read by jobs.runtime.init_ray


@app.command()
@user_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the corpus, spec and store go.")] = Path(
        "mmfp-demo"
    ),
    n_per_class: Annotated[int, typer.Option(min=1, help="Samples per class and source.")] = 20,
    fresh: Annotated[bool, typer.Option(help="Delete WORKDIR first.")] = False,
    train: Annotated[bool, typer.Option(help="End with pretraining and test recall.")] = True,
    address: RayAddressOpt = None,
) -> None:
    """Generate a small text/image/audio corpus (with broken files) and build it into a store."""
    from jobs.demo.run import run_demo

    run_demo(workdir, n_per_class=n_per_class, fresh=fresh, train=train, address=address)


@store_app.command("ls")
@user_errors
def store_ls(store: StoreOpt = DEFAULT_STORE) -> None:
    """Tables with rows, files, size and latest version."""
    print_tables(open_store(store))


@store_app.command("describe")
@user_errors
def store_describe(table: TableArg, store: StoreOpt = DEFAULT_STORE) -> None:
    """Schema, size, split counts and the runs that wrote a table."""
    print_describe(open_store(store), table)


@store_app.command("history")
@user_errors
def store_history(table: TableArg, store: StoreOpt = DEFAULT_STORE) -> None:
    """Every version of a table: time, operation, rows added, run."""
    print_history(open_store(store), table)


app.command("build")(build_command)
app.command("refresh")(refresh_command)
app.command("filter")(filter_command)
app.command("dedup")(dedup_command)
app.command("encode")(encode_command)
app.command("train")(train)
app.command("evaluate")(evaluate)
app.command("tune")(tune)
app.command("serve")(serve_command)
app.command("export")(export_command)
register_cluster(app)  # submit, jobs, schedule
register_query(app, store_app)  # query, search, store diff/vacuum/optimize/stats/index/lineage
register_runs(app)  # runs ls / show
