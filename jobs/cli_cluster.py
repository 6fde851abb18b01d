"""`mmfp submit`, `mmfp jobs ...` and `mmfp schedule ...`: the cluster half of the CLI.

``register(app)`` adds them to the main ``mmfp`` app (jobs/cli.py). Exit codes: 0 on
success, 1 when a job we waited for ended FAILED/STOPPED, 2 for a user error (bad
address, missing token, unknown job or schedule), 130 when interrupted.
``python -m jobs.cli_cluster ...`` runs these commands on their own.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from jobs import schedule as sched
from jobs import submit as jobsubmit
from jobs.errors import clean, user_errors
from jobs.options import JobApiAddressOpt, key_values
from jobs.report import console, table
from jobs.submit import Kind

F = TypeVar("F", bound=Callable[..., Any])
# ids stay copy-pasteable, times readable; the other columns fold
NO_WRAP = ("submission id", "name", "kind", "status", "started UTC", "next slot UTC")

jobs_app = typer.Typer(
    help="Jobs on a Ray cluster: list, status, logs, stop.", no_args_is_help=True
)
schedule_app = typer.Typer(
    help="Cron schedules that submit refresh jobs (run one `mmfp schedule run` per file).",
    no_args_is_help=True,
)

FileOpt = Annotated[
    Path | None,
    typer.Option(
        "--file",
        envvar="MMFP_SCHEDULES",
        help=f"Schedule file; history goes next to it. Default: ./{sched.DEFAULT_FILE}.",
    ),
]
JobId = Annotated[str, typer.Argument(help="Submission id (see `mmfp jobs list`).")]


def _quiet_ray() -> None:
    """Ray's job client logs every packaging step at INFO; a CLI user needs only our lines."""
    import ray.job_submission  # noqa: F401  (its modules set their own levels on import)

    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "'.git' is now ignored by default": we exclude it ourselves.
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def cli_errors(fn: F) -> F:
    """Failed job -> exit 1; Ctrl-C while following -> exit 130; mmfp errors -> exit 2."""

    def job_failures(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except jobsubmit.JobFailed as e:
            typer.secho(f"error: {clean(e)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from e

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_ray()
        try:
            return user_errors(job_failures)(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("interrupted (a submitted job keeps running: `mmfp jobs stop ID`)", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _when(ms: int | None, fmt: str = "%m-%d %H:%M:%S") -> str:
    return "" if not ms else datetime.fromtimestamp(ms / 1000, UTC).strftime(fmt)


def _took(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms or not end_ms:
        return ""
    secs = round((end_ms - start_ms) / 1000)
    return f"{secs}s" if secs < 60 else f"{secs // 60}m{secs % 60:02d}s"


def submit(
    kind: Annotated[Kind, typer.Argument(help="Which job: python -m jobs KIND ARGS.")],
    args: Annotated[
        list[str] | None, typer.Argument(help="Job arguments, e.g. the spec (put -- before -x).")
    ] = None,
    address: JobApiAddressOpt = None,
    submission_id: Annotated[
        str | None, typer.Option("--id", help="Submission id; Ray refuses a second job with it.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the logs; exit 1 unless it SUCCEEDED.")
    ] = False,
    num_cpus: Annotated[float | None, typer.Option(help="CPUs for the entrypoint.")] = None,
    num_gpus: Annotated[float | None, typer.Option(help="GPUs for the entrypoint.")] = None,
    memory: Annotated[int | None, typer.Option(help="Memory (bytes) for the entrypoint.")] = None,
    resources: Annotated[
        str | None, typer.Option(help="Custom entrypoint resources as JSON: '{\"TPU\": 1}'.")
    ] = None,
    pip: Annotated[
        list[str] | None, typer.Option("--pip", help="Extra pip requirement (repeatable).")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="KEY=VALUE for the job (repeatable).")
    ] = None,
    working_dir: Annotated[
        Path, typer.Option(help="Project directory shipped as the job's working_dir.")
    ] = jobsubmit.PROJECT_ROOT,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", help="Extra gitignore-style pattern not to ship (repeatable)."),
    ] = None,
    module: Annotated[str | None, typer.Option(help="Run python -m MODULE ARGS instead.")] = None,
) -> None:
    """Submit a job to a Ray cluster with this project as its working_dir."""
    try:
        extra = json.loads(resources) if resources else None
    except json.JSONDecodeError as e:
        raise jobsubmit.ClusterError(f"--resources is not JSON: {e}") from e
    sid = jobsubmit.submit(
        kind,
        args or [],
        address=address,
        submission_id=submission_id,
        module=module,
        working_dir=working_dir,
        excludes=[*jobsubmit.DEFAULT_EXCLUDES, *(exclude or [])],
        pip=pip,
        env_vars=key_values(env, "--env"),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        memory=memory,
        resources=extra,
        wait=wait,
    )
    if wait:
        typer.echo(f"job {sid} SUCCEEDED")
    else:
        typer.echo(f"submitted {sid}; follow it with `mmfp jobs logs {sid} --follow`")


@jobs_app.command("list")
@cli_errors
def jobs_list(address: JobApiAddressOpt = None) -> None:
    """Every job the cluster knows, oldest first (`mmfp jobs status ID` for details)."""
    rows = [
        [
            j.submission_id or j.job_id,
            (j.metadata or {}).get("mmfp.kind", ""),
            j.status,
            _when(j.start_time),
            _took(j.start_time, j.end_time),
        ]
        for j in jobsubmit.list_jobs(address=address)
    ]
    cols = ["submission id", "kind", "status", "started UTC", "took"]
    console.print(
        table(
            f"jobs on {jobsubmit.resolve_address(address)}", cols, rows, fold=True, no_wrap=NO_WRAP
        )
    )


@jobs_app.command("status")
@cli_errors
def jobs_status(submission_id: JobId, address: JobApiAddressOpt = None) -> None:
    """A job's status, message and times."""
    j = jobsubmit.job_info(submission_id, address=address)
    typer.echo(f"{submission_id}: {j.status}")
    for label, value in (
        ("message", jobsubmit.first_line(j.message)),
        ("entrypoint", j.entrypoint),
        ("started", _when(j.start_time, "%Y-%m-%d %H:%M:%S UTC")),
        ("ended", _when(j.end_time, "%Y-%m-%d %H:%M:%S UTC")),
    ):
        if value:
            typer.echo(f"  {label}: {clean(value)}")


@jobs_app.command("logs")
@cli_errors
def jobs_logs(
    submission_id: JobId,
    address: JobApiAddressOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream until the job ends.")] = (
        False
    ),
) -> None:
    """A job's driver output (stdout and stderr)."""
    if follow:
        j = jobsubmit.follow(submission_id, address=address)
        typer.echo(f"job {submission_id} {j.status}", err=True)
    else:
        typer.echo(jobsubmit.job_logs(submission_id, address=address), nl=False)


@jobs_app.command("stop")
@cli_errors
def jobs_stop(
    submission_id: JobId,
    address: JobApiAddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until it has stopped.")] = False,
) -> None:
    """Stop a job (SIGTERM to its driver, then SIGKILL after Ray's grace period)."""
    if not jobsubmit.stop(submission_id, address=address):
        j = jobsubmit.job_info(submission_id, address=address)
        typer.echo(f"{submission_id} had already ended: {j.status}")
        return
    if wait:
        j = jobsubmit.wait_for(submission_id, address=address, timeout=120)
        typer.echo(f"{submission_id}: {j.status}")
    else:
        typer.echo(f"stop requested for {submission_id}")


@schedule_app.command("add")
@cli_errors
def schedule_add(
    name: Annotated[str, typer.Argument(help="Schedule name (part of every job id).")],
    cron: Annotated[
        str, typer.Option(help="'m h dom mon dow', or 's m h dom mon dow' with seconds first.")
    ],
    spec: Annotated[Path, typer.Option(help="Pipeline spec to refresh.")],
    address: JobApiAddressOpt = None,
    entrypoint: Annotated[
        str, typer.Option(help="Module the job runs: python -m MODULE SPEC [--slot S].")
    ] = sched.DEFAULT_ENTRYPOINT,
    pass_slot: Annotated[
        bool, typer.Option(help="Append --slot EPOCH_SECONDS (jobs.refresh: once per slot).")
    ] = True,
    timezone: Annotated[str, typer.Option(help="Time zone of the cron fields.")] = "UTC",
    grace: Annotated[
        int, typer.Option(min=1, help="Seconds a missed slot may still run late.")
    ] = 300,
    replace: Annotated[bool, typer.Option(help="Overwrite a schedule of the same name.")] = False,
    file: FileOpt = None,
) -> None:
    """Add a schedule (a running `mmfp schedule run` picks it up within seconds)."""
    s = sched.add(
        name,
        cron,
        spec,
        address=address,
        entrypoint=entrypoint,
        pass_slot=pass_slot,
        timezone=timezone,
        misfire_grace_s=grace,
        replace=replace,
        path=file,
    )
    nxt = s.trigger().get_next_fire_time(None, datetime.now(UTC))
    typer.echo(f"schedule {name}: {s.cron} ({s.timezone}); next slot {nxt:%Y-%m-%d %H:%M:%S%z}")


@schedule_app.command("list")
@cli_errors
def schedule_list(file: FileOpt = None) -> None:
    """Schedules with their next slot."""
    now = datetime.now(UTC)
    rows = [
        [
            s.name,
            f"{s.cron} ({s.timezone})",
            f"{s.trigger().get_next_fire_time(None, now).astimezone(UTC):%m-%d %H:%M:%S}",
            f"{s.entrypoint} {s.spec}" + (" --slot" if s.pass_slot else ""),
            s.address or "$RAY_ADDRESS",
        ]
        for s in sched.load(file).values()
    ]
    cols = ["name", "cron", "next slot UTC", "runs", "address"]
    console.print(
        table(f"schedules in {sched.schedules_file(file)}", cols, rows, fold=True, no_wrap=NO_WRAP)
    )


@schedule_app.command("remove")
@cli_errors
def schedule_remove(
    name: Annotated[str, typer.Argument(help="Schedule name.")], file: FileOpt = None
) -> None:
    """Remove a schedule (jobs already submitted keep running)."""
    sched.remove(name, path=file)
    typer.echo(f"removed schedule {name}")


@schedule_app.command("history")
@cli_errors
def schedule_history(
    name: Annotated[str | None, typer.Argument(help="Only this schedule.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show the last N slots.")] = 20,
    status: Annotated[bool, typer.Option(help="Ask the cluster for each job's status.")] = True,
    file: FileOpt = None,
) -> None:
    """Fired slots: submission id, outcome and the job's status on the cluster."""
    fired = sched.history(name=name, limit=limit, path=file)
    statuses = sched.job_statuses(fired) if status else {}
    rows = [
        [
            f.submission_id,
            f.outcome,
            statuses.get(f.submission_id, "") if f.outcome != "failed" else f.error,
        ]
        for f in fired
    ]
    cols = ["submission id", "outcome", "job status / error"]  # the id names schedule and slot
    console.print(
        table(f"history in {sched.history_file(file)}", cols, rows, fold=True, no_wrap=NO_WRAP)
    )


@schedule_app.command("run")
@cli_errors
def schedule_run(
    file: FileOpt = None,
    poll: Annotated[float, typer.Option(min=0.1, help="Seconds between file re-reads.")] = 5.0,
) -> None:
    """Fire schedules until SIGTERM/Ctrl-C (run it as a service: deploy/mmfp-scheduler.service)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    typer.echo(f"scheduler on {sched.schedules_file(file)} (Ctrl-C to stop)")
    sched.run(file, poll_s=poll)


def register(app: typer.Typer) -> None:
    """Add `submit`, `jobs` and `schedule` to the mmfp app."""
    app.command("submit")(cli_errors(submit))
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(schedule_app, name="schedule")


if __name__ == "__main__":
    main = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
    register(main)
    main()
