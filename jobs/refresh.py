"""``mmfp refresh SPEC``: the incremental refresh job (scheduled or by hand).

Only inputs whose fingerprint changed are read; removed inputs follow the
spec's ``refresh.on_removed``. ``--slot`` (a schedule's slot time) makes the
refresh exactly-once for that slot, even when the job is retried. Schedules
run it as ``python -m jobs.refresh SPEC --slot S`` (``python -m jobs refresh`` too).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from features.store import FeatureStore
from jobs.errors import user_errors
from jobs.live import live_progress
from jobs.options import RayAddressOpt, SpecArg
from jobs.report import console, print_build, print_log_file
from jobs.runtime import new_job
from pipelines.build import BuildResult, build
from pipelines.errors import SpecError
from pipelines.spec import load_spec


def parse_slot(slot: str | None) -> int | None:
    """A slot as epoch seconds: an integer, or an ISO-8601 time (``20261125T011500Z`` too)."""
    if slot is None:
        return None
    if slot.isdigit():
        return int(slot)
    try:  # the scheduler's slot ids: 20261125T011500Z, always UTC
        return int(datetime.strptime(slot, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp())
    except ValueError:
        pass
    try:
        return int(datetime.fromisoformat(slot).timestamp())
    except ValueError as e:
        raise SpecError(f"--slot {slot!r} is not epoch seconds or an ISO-8601 time") from e


def run_refresh(
    spec_path: str, *, address: str | None = None, slot: str | None = None
) -> BuildResult:
    spec = load_spec(spec_path)
    slot_seconds = parse_slot(slot)
    job = new_job(address)
    with live_progress() as progress:
        result = build(
            spec,
            run_id=job.run_id,
            kind="refresh",
            incremental=True,
            slot=slot_seconds,
            execution=job.execution(progress),
        )
    if result.already_done:
        console.print(f"slot {slot} was already committed by an earlier attempt: nothing to do")
        return result
    store = FeatureStore(spec.store.uri, storage_options=spec.store.storage_options)
    console.print(f"refresh: {result.skipped_inputs} unchanged inputs skipped")
    if result.removed:
        console.print(
            f"removed inputs: {result.removed['inputs']} "
            f"({result.removed['samples']} samples deleted, policy {spec.refresh.on_removed})"
        )
    print_build(result, store)
    print_log_file(job.log_file)
    return result


@user_errors
def refresh_command(
    spec: SpecArg,
    slot: Annotated[
        str | None,
        typer.Option(help="Schedule slot (epoch seconds or ISO time): commit it at most once."),
    ] = None,
    address: RayAddressOpt = None,
) -> None:
    """Process only new or changed inputs of SPEC; removed inputs follow refresh.on_removed."""
    run_refresh(str(spec), address=address, slot=slot)


if __name__ == "__main__":
    typer.run(refresh_command)
