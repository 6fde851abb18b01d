"""The ``mmfp`` command line (typer). Thin: parse, call the library, print a summary.

User mistakes (a bad spec, an unknown table or version) print one line and exit
with code 2; nothing prints a traceback for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.cli_cluster import register as register_cluster
from jobs.cli_query import register as register_query
from jobs.cli_train import evaluate, train
from jobs.errors import open_store, user_errors

app = typer.Typer(
    help="mmfp: a multimodal feature platform on Ray and Delta Lake.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
store_app = typer.Typer(
    help="Look at a feature store: tables, schemas, versions.", no_args_is_help=True
)
app.add_typer(store_app, name="store")

AddressOpt = Annotated[
    str | None,
    typer.Option(
        help="Ray cluster address; default: $RAY_ADDRESS, else a local Ray on this machine."
    ),
]
StoreOpt = Annotated[
    str,
    typer.Option("--store", envvar="MMFP_STORE", help="Store path or URI (s3://bucket/prefix)."),
]


@app.command()
@user_errors
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the corpus, spec and store go.")] = Path(
        "mmfp-demo"
    ),
    n_per_class: Annotated[int, typer.Option(min=1, help="Samples per class and source.")] = 20,
    fresh: Annotated[bool, typer.Option(help="Delete WORKDIR first.")] = False,
    train: Annotated[bool, typer.Option(help="End with pretraining and test recall.")] = True,
    address: AddressOpt = None,
) -> None:
    """Generate a small text/image/audio corpus (with broken files) and build it into a store."""
    from jobs.demo import run_demo

    run_demo(workdir, n_per_class=n_per_class, fresh=fresh, train=train, address=address)


@app.command()
@user_errors
def build(
    spec: Annotated[Path, typer.Argument(help="Pipeline spec (YAML).")],
    address: AddressOpt = None,
) -> None:
    """Collect, label, split, augment and encode every source of SPEC (one commit per table)."""
    from jobs.build import run_build

    run_build(str(spec), address=address)


@app.command()
@user_errors
def refresh(
    spec: Annotated[Path, typer.Argument(help="Pipeline spec (YAML).")],
    slot: Annotated[
        str | None,
        typer.Option(help="Schedule slot (epoch seconds or ISO time): commit it at most once."),
    ] = None,
    address: AddressOpt = None,
) -> None:
    """Process only new or changed inputs of SPEC; removed inputs follow refresh.on_removed."""
    from jobs.refresh import run_refresh

    run_refresh(str(spec), address=address, slot=slot)


@app.command()
@user_errors
def encode(
    spec: Annotated[Path, typer.Argument(help="Pipeline spec (YAML) with an `encode` section.")],
    feature_set: Annotated[str, typer.Option(help="Name of the feature set to (re)compute.")],
    reencode: Annotated[
        bool,
        typer.Option(help="Replace the feature set's rows (a new version) after a config change."),
    ] = False,
    address: AddressOpt = None,
) -> None:
    """Encode the samples and views a feature set lacks (incremental), or all with --reencode."""
    from jobs.encode import run_encode

    run_encode(str(spec), feature_set, reencode=reencode, address=address)


@store_app.command("ls")
@user_errors
def store_ls(store: StoreOpt = "mmfp-store") -> None:
    """Tables with rows, files, size and latest version."""
    from jobs.report import print_tables

    print_tables(open_store(store))


@store_app.command("describe")
@user_errors
def store_describe(
    table: Annotated[str, typer.Argument(help="Table name, e.g. samples.")],
    store: StoreOpt = "mmfp-store",
) -> None:
    """Schema, size, split counts and the runs that wrote a table."""
    from jobs.report import print_describe

    print_describe(open_store(store), table)


@store_app.command("history")
@user_errors
def store_history(
    table: Annotated[str, typer.Argument(help="Table name, e.g. samples.")],
    store: StoreOpt = "mmfp-store",
) -> None:
    """Every version of a table: time, operation, rows added, run."""
    from jobs.report import print_history

    print_history(open_store(store), table)


register_cluster(app)  # submit, jobs, schedule
app.command("train")(train)
app.command("evaluate")(evaluate)
register_query(app, store_app)  # query, search, store diff/vacuum/optimize/stats/index/lineage


if __name__ == "__main__":
    app()
