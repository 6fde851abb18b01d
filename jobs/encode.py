"""``mmfp encode SPEC --feature-set NAME``: one feature set alone, incremental.

Also ``python -m jobs encode`` or ``python -m jobs.encode``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from jobs.errors import user_errors
from jobs.live import live_progress
from jobs.options import RayAddressOpt
from jobs.report import console, print_log_file
from jobs.runtime import new_job
from pipelines.build import BuildResult, encode_only
from pipelines.spec import load_spec


def run_encode(
    spec_path: str, feature_set: str, *, reencode: bool = False, address: str | None = None
) -> BuildResult:
    spec = load_spec(spec_path)
    job = new_job(address)
    with live_progress() as progress:
        result = encode_only(
            spec,
            feature_set,
            reencode=reencode,
            run_id=job.run_id,
            execution=job.execution(progress),
        )
    rows = result.feature_counts.get(feature_set, 0)
    store = spec.store.uri
    if not result.changed:
        console.print(f"feature set {feature_set!r} is up to date in {store}: nothing to encode")
    else:
        console.print(
            f"feature set {feature_set!r}: {rows} rows encoded, committed {result.versions}"
        )
    print_log_file(job.log_file)
    return result


@user_errors
def encode_command(
    spec: Annotated[Path, typer.Argument(help="Pipeline spec (YAML) with an `encode` section.")],
    feature_set: Annotated[str, typer.Option(help="Name of the feature set to (re)compute.")],
    reencode: Annotated[
        bool,
        typer.Option(help="Replace the feature set's rows (a new version) after a config change."),
    ] = False,
    address: RayAddressOpt = None,
) -> None:
    """Encode the samples and views a feature set lacks (incremental), or all with --reencode."""
    run_encode(str(spec), feature_set, reencode=reencode, address=address)


if __name__ == "__main__":
    typer.run(encode_command)
