"""Scheduled refreshes: cron schedules that submit ``python -m jobs.refresh SPEC`` to a cluster.

State lives in one JSON file per scheduler (``--file``, ``$MMFP_SCHEDULES``, default
``./mmfp-schedules.json``), not in the store: a store may be an object-storage prefix
many readers share, while the schedule belongs to the one host that runs ``mmfp schedule
run``. Next to it: ``<stem>.history.jsonl`` (one line per fired slot, append-only) and two
lock files (edits; the single running scheduler).

Every slot gets the submission id ``refresh-<name>-<slot UTC, 20261125T011500Z>``. A slot
fires at most once: the history is checked before submitting, and if a crash lost the
history line, Ray refuses the duplicate id and the slot is recorded as already submitted.
A restarted scheduler catches up only the latest missed slot within ``misfire_grace_s``.

Cron: 5 fields (``m h dom mon dow``, day-of-week as in crontab: 0 or 7 = Sunday) or 6 with
seconds first (``*/3 * * * * *``), evaluated in the schedule's time zone (UTC default).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs import submit as jobsubmit
from pipelines.errors import MmfpError
from pipelines.spec import load_spec

if TYPE_CHECKING:  # APScheduler loads when a schedule is parsed or run, not with the CLI
    from apscheduler.triggers.cron import CronTrigger

log = logging.getLogger("mmfp.schedule")

DEFAULT_FILE = "mmfp-schedules.json"
DEFAULT_ENTRYPOINT = "jobs.refresh"
_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
Outcome = Literal["submitted", "already-submitted", "failed"]


class ScheduleError(MmfpError):
    """A schedule, its cron expression or its schedule file is invalid."""


class Schedule(BaseModel):
    """One cron schedule: which spec to refresh, where, and how late a slot may still run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=f"^{_NAME}$")
    cron: str
    spec: str  # absolute path on the scheduler host; shipped relative when inside the project
    address: str | None = None  # None: the scheduler's RAY_ADDRESS when a slot fires
    entrypoint: str = DEFAULT_ENTRYPOINT  # module run as `python -m MODULE SPEC [--slot S]`
    # Append `--slot <epoch seconds>`: jobs.refresh then commits a slot at most once, even
    # when Ray retries the job. Off for entrypoints without that option.
    pass_slot: bool = True
    timezone: str = "UTC"
    misfire_grace_s: int = Field(300, gt=0)  # a slot later than this is skipped, not run
    created_at: datetime

    def trigger(self) -> CronTrigger:
        return parse_cron(self.cron, self.timezone)


class Fired(BaseModel):
    """One line of the history file: a slot and what its submission did."""

    model_config = ConfigDict(extra="ignore")

    schedule: str
    slot: datetime
    submission_id: str
    address: str | None
    outcome: Outcome
    error: str | None = None
    recorded_at: datetime


# ---- cron -------------------------------------------------------------------------------


def _day(token: str) -> int:
    if token.isdigit() and int(token) <= 7:
        return int(token)
    if token[:3] in _DAYS:
        return _DAYS.index(token[:3])
    raise ValueError(f"bad day of week {token!r} (0-7 or sun..sat)")


def crontab_days(field: str) -> str:
    """A crontab day-of-week field (0/7 = Sunday) as APScheduler 3 names (0 = Monday there)."""
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for part in field.lower().split(","):
        span, _, step_s = part.partition("/")
        step = int(step_s) if step_s else 1
        if span == "*":
            lo, hi = 0, 6
        elif "-" in span:
            lo, hi = (_day(t) for t in span.split("-", 1))
            hi = 7 if hi == 0 and lo > 0 else hi  # fri-sun
        else:
            lo = _day(span)
            hi = 6 if step_s else lo
        if hi < lo or step < 1:
            raise ValueError(f"bad day-of-week range {part!r}")
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return "*" if len(days) == 7 else ",".join(_DAYS[d] for d in sorted(days))


def parse_cron(expr: str, timezone: str = "UTC") -> CronTrigger:
    """``m h dom mon dow`` or ``s m h dom mon dow`` -> an APScheduler CronTrigger."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ScheduleError(
            f"cron {expr!r} has {len(fields)} fields; expected 5 (m h dom mon dow) "
            "or 6 with seconds first (s m h dom mon dow)"
        )
    second, minute, hour, day, month, dow = fields if len(fields) == 6 else ["0", *fields]
    day = "*" if day == "?" else day  # Quartz-style "no specific value"
    if day not in ("*", "?") and dow not in ("*", "?"):
        raise ScheduleError(
            f"cron {expr!r} restricts both day of month and day of week; cron ORs them, "
            "APScheduler ANDs them: restrict one"
        )
    try:
        return CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=crontab_days(dow),
            timezone=ZoneInfo(timezone),
        )
    except (ValueError, ZoneInfoNotFoundError) as e:
        raise ScheduleError(f"invalid cron {expr!r} (timezone {timezone}): {e}") from e


def latest_slot(trigger: CronTrigger, now: datetime, lookback_s: float) -> datetime | None:
    """The last fire time at or before ``now`` (looking back ``lookback_s``), else None."""
    t = trigger.get_next_fire_time(None, now - timedelta(seconds=lookback_s))
    last = None
    while t is not None and t <= now:
        last = t
        t = trigger.get_next_fire_time(t, t)
    return last


def slot_id(name: str, slot: datetime) -> str:
    return f"refresh-{name}-{slot.astimezone(UTC):%Y%m%dT%H%M%SZ}"


# ---- files ------------------------------------------------------------------------------


def schedules_file(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("MMFP_SCHEDULES") or DEFAULT_FILE).expanduser()


def history_file(path: str | Path | None = None) -> Path:
    f = schedules_file(path)
    return f.with_name(f"{f.stem}.history.jsonl")


@contextlib.contextmanager
def _locked(lock_path: Path, *, wait: bool = True) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as e:
            raise ScheduleError(
                f"another `mmfp schedule run` holds {lock_path}; run one scheduler per file"
            ) from e
        yield


def load(path: str | Path | None = None) -> dict[str, Schedule]:
    """All schedules in the file (none when it does not exist yet)."""
    f = schedules_file(path)
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
        return {n: Schedule.model_validate(s) for n, s in raw["schedules"].items()}
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as e:
        raise ScheduleError(f"{f} is not a valid schedule file: {e}") from e


def _save(f: Path, schedules: dict[str, Schedule]) -> None:
    data = {"schedules": {n: s.model_dump(mode="json") for n, s in sorted(schedules.items())}}
    tmp = f.with_name(f".{f.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, f)  # readers (a running scheduler) never see half a file


def add(
    name: str,
    cron: str,
    spec: str | Path,
    *,
    address: str | None = None,
    entrypoint: str = DEFAULT_ENTRYPOINT,
    pass_slot: bool = True,
    timezone: str = "UTC",
    misfire_grace_s: int = 300,
    replace: bool = False,
    path: str | Path | None = None,
) -> Schedule:
    """Validate (cron, spec, entrypoint) and store a schedule; a running scheduler picks it up."""
    if not re.fullmatch(_NAME, name):
        raise ScheduleError(f"schedule name {name!r} must match {_NAME} (it goes into job ids)")
    load_spec(spec)  # a broken spec fails now, not at 01:15 tonight
    jobsubmit.entrypoint(entrypoint, [])
    try:
        schedule = Schedule(
            name=name,
            cron=" ".join(cron.split()),
            spec=str(Path(spec).resolve()),
            address=address,
            entrypoint=entrypoint,
            pass_slot=pass_slot,
            timezone=timezone,
            misfire_grace_s=misfire_grace_s,
            created_at=datetime.now(UTC),
        )
    except ValidationError as e:
        raise ScheduleError(f"invalid schedule {name!r}: {e}") from e
    schedule.trigger()
    f = schedules_file(path)
    with _locked(f.with_name(f"{f.name}.lock")):
        schedules = load(f)
        if name in schedules and not replace:
            raise ScheduleError(f"schedule {name!r} exists in {f} (use --replace)")
        schedules[name] = schedule
        _save(f, schedules)
    return schedule


def remove(name: str, *, path: str | Path | None = None) -> None:
    f = schedules_file(path)
    with _locked(f.with_name(f"{f.name}.lock")):
        schedules = load(f)
        if name not in schedules:
            known = ", ".join(schedules) or "none"
            raise ScheduleError(f"no schedule {name!r} in {f} (schedules: {known})")
        del schedules[name]
        _save(f, schedules)


def history(
    *, name: str | None = None, limit: int | None = None, path: str | Path | None = None
) -> list[Fired]:
    """Fired slots, oldest first (the last ``limit``)."""
    try:
        lines = history_file(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    fired = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            fired.append(Fired.model_validate_json(line))
        except ValidationError:  # e.g. a line cut short by a crash: skip it, say so
            log.warning("%s:%d is not a history record; skipped", history_file(path), n)
    fired = [f for f in fired if name is None or f.schedule == name]
    return fired[-limit:] if limit else fired


def job_statuses(fired: list[Fired]) -> dict[str, str]:
    """submission id -> the job's status on its cluster (one listing per cluster)."""
    out: dict[str, str] = {}
    for address in {f.address for f in fired if f.outcome != "failed" and f.address}:
        try:
            jobs = {j.submission_id: str(j.status) for j in jobsubmit.list_jobs(address=address)}
        except MmfpError as e:
            jobs = {}
            log.warning("%s", e)
        for f in fired:
            if f.address == address and f.outcome != "failed":
                out[f.submission_id] = jobs.get(f.submission_id, "UNKNOWN")
    return out


# ---- the scheduler ----------------------------------------------------------------------

Submitter = Callable[..., str]


class Runner:
    """Fires every schedule of one file; the file is re-read every ``poll_s`` seconds."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        poll_s: float = 5.0,
        submitter: Submitter = jobsubmit.submit,
    ) -> None:
        self.path = schedules_file(path)
        self.history_path = history_file(self.path)
        self.poll_s = poll_s
        self.submitter = submitter
        self.fired: list[Fired] = []  # this run's submissions, for callers and tests
        self.skipped: list[str] = []  # slot ids found already fired
        self._active: dict[str, Schedule] = {}
        self._history_lock = threading.Lock()
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        self._scheduler = BackgroundScheduler(
            timezone=UTC,
            executors={"default": ThreadPoolExecutor(max_workers=4)},
            job_defaults={"coalesce": True, "max_instances": 1},
        )

    # -- one slot --

    def fired_ids(self) -> set[str]:
        return {
            f.submission_id
            for f in history(path=self.path)
            if f.outcome in ("submitted", "already-submitted")
        }

    def fire(self, schedule: Schedule, now: datetime | None = None) -> Fired | None:
        """Submit the latest slot at or before ``now`` unless it was submitted before."""
        now = now or datetime.now(UTC)
        slot = latest_slot(schedule.trigger(), now, schedule.misfire_grace_s + 1)
        if slot is None:
            return None
        sid = slot_id(schedule.name, slot)
        with self._history_lock:
            if sid in self.fired_ids():
                log.info("%s: already submitted, skipping", sid)
                self.skipped.append(sid)
                return None
        address, error, outcome = schedule.address, None, "submitted"
        try:
            address = jobsubmit.resolve_address(schedule.address)
            args = [schedule.spec]
            if schedule.pass_slot:
                args += ["--slot", str(int(slot.timestamp()))]
            self.submitter(
                "refresh",
                args,
                address=address,
                submission_id=sid,
                module=schedule.entrypoint,
                metadata={"mmfp.schedule": schedule.name, "mmfp.slot": slot.isoformat()},
            )
        except jobsubmit.JobExists:
            outcome = "already-submitted"
        except MmfpError as e:
            outcome, error = "failed", str(e)
        record = Fired(
            schedule=schedule.name,
            slot=slot.astimezone(UTC),
            submission_id=sid,
            address=address,
            outcome=outcome,
            error=error,
            recorded_at=datetime.now(UTC),
        )
        with self._history_lock:
            self.history_path.parent.mkdir(parents=True, exist_ok=True)
            with self.history_path.open("a", encoding="utf-8") as fh:
                fh.write(record.model_dump_json() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.fired.append(record)
        log.info("%s: %s%s", sid, outcome, f" ({error})" if error else "")
        return record

    # -- the loop --

    def sync(self, *, catch_up: bool = False) -> None:
        """Make the scheduler's jobs match the file; with ``catch_up``, run missed slots."""
        try:
            schedules = load(self.path)
        except ScheduleError as e:
            log.error("%s; keeping the schedules already loaded", e)
            return
        for name in set(self._active) - set(schedules):
            self._scheduler.remove_job(name)
            del self._active[name]
            log.info("schedule %s removed", name)
        now = datetime.now(UTC)
        for name, s in schedules.items():
            if self._active.get(name) == s:
                continue
            trigger = s.trigger()
            options: dict[str, Any] = {}
            if catch_up:
                start = max(now - timedelta(seconds=s.misfire_grace_s), s.created_at)
                first = trigger.get_next_fire_time(None, start)
                if first is not None and first <= now:
                    options["next_run_time"] = first  # due now: runs the latest missed slot
            self._scheduler.add_job(
                self.fire,
                trigger,
                args=[s],
                id=name,
                name=name,
                replace_existing=True,
                misfire_grace_time=s.misfire_grace_s,
                **options,
            )
            self._active[name] = s
            log.info("schedule %s: %r %s -> %s", name, s.cron, s.timezone, s.spec)

    def run(self, stop: threading.Event) -> None:
        """Fire schedules until ``stop`` is set; one runner per schedule file."""
        with _locked(self.path.with_name(f"{self.path.name}.run.lock"), wait=False):
            self._scheduler.start()
            try:
                self.sync(catch_up=True)
                while not stop.wait(self.poll_s):
                    self.sync()
            finally:
                self._scheduler.shutdown(wait=True)


def run(path: str | Path | None = None, *, poll_s: float = 5.0) -> None:
    """Block and fire schedules until SIGTERM or Ctrl-C (what `mmfp schedule run` does)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    Runner(path, poll_s=poll_s).run(stop)
