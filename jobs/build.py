"""``mmfp build SPEC``: the build job (also ``python -m jobs build`` / ``python -m jobs.build``)."""

from __future__ import annotations

import typer

from features.store import FeatureStore
from jobs.errors import user_errors
from jobs.live import live_progress
from jobs.options import RayAddressOpt, SpecArg
from jobs.report import print_build, print_log_file
from jobs.runtime import new_job
from pipelines.build import BuildResult, build
from pipelines.spec import load_spec


def run_build(spec_path: str, *, address: str | None = None) -> BuildResult:
    spec = load_spec(spec_path)  # validated before Ray starts
    job = new_job(address)
    with live_progress() as progress:
        result = build(
            spec,
            run_id=job.run_id,
            execution=job.execution(progress),
        )
    print_build(result, FeatureStore(spec.store.uri, storage_options=spec.store.storage_options))
    print_log_file(job.log_file)
    return result


@user_errors
def build_command(spec: SpecArg, address: RayAddressOpt = None) -> None:
    """Collect, label, split, augment and encode every source of SPEC (one commit per table)."""
    run_build(str(spec), address=address)


if __name__ == "__main__":
    typer.run(build_command)
