"""Scheduled refreshes: cron parsing, the schedule file, once-per-slot firing, and
`mmfp schedule run` submitting to a real two-node token-auth cluster across restarts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs import schedule as sched
from jobs import submit as jobsubmit
from jobs.demo.corpus import write_directory_source
from pipelines.errors import MmfpError
from pipelines.spec import write_spec
from tests.cluster_fixtures import ROOT, LocalCluster, cluster_env, ray_cluster
from tests.helpers import make_spec

__all__ = ["cluster_env", "ray_cluster"]  # fixtures, imported for this module

STUB = "tests.cluster_fixtures"  # a stand-in refresh entrypoint that only validates SPEC
WED = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)  # a Wednesday


def fire_times(trigger, start: datetime, n: int) -> list[datetime]:
    out, t = [], trigger.get_next_fire_time(None, start)
    for _ in range(n):
        out.append(t)
        t = trigger.get_next_fire_time(t, t)
    return out


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sched")
    write_directory_source(root / "photos", n_per_class=1)
    source = {"kind": "directory", "name": "photos", "uri": str(root / "photos")}
    path = root / "spec.yaml"
    write_spec(make_spec(root / "store", [{**source, "class_folders": True}]), path)
    return path


# ---- cron -------------------------------------------------------------------------------


def test_seconds_and_five_field_crons():
    every3 = fire_times(sched.parse_cron("*/3 * * * * *"), WED + timedelta(seconds=1), 3)
    assert [t.second for t in every3] == [3, 6, 9]
    nightly = sched.parse_cron("15 1 * * *").get_next_fire_time(None, WED)
    assert nightly == datetime(2026, 11, 26, 1, 15, tzinfo=UTC)


@pytest.mark.parametrize(
    ("dow", "days"),
    [
        ("1-5", {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday"}),
        ("0", {"Sunday"}),
        ("7", {"Sunday"}),
        ("fri-sun", {"Friday", "Saturday", "Sunday"}),
        ("*/3", {"Sunday", "Wednesday", "Saturday"}),
    ],
)
def test_day_of_week_means_what_crontab_means(dow, days):
    """APScheduler 3 counts Monday as 0; the schedule takes crontab's Sunday = 0 (and 7)."""
    trigger = sched.parse_cron(f"0 9 * * {dow}")
    assert {t.strftime("%A") for t in fire_times(trigger, WED, 14)} == days


@pytest.mark.parametrize(
    ("cron", "tz", "message"),
    [
        ("* * * *", "UTC", "has 4 fields"),
        ("61 * * * *", "UTC", "invalid cron"),
        ("0 9 1 * 1", "UTC", "restricts both"),
        ("0 9 * * *", "Mars/Olympus", "invalid cron"),
    ],
)
def test_bad_crons_are_schedule_errors(cron, tz, message):
    with pytest.raises(sched.ScheduleError, match=message):
        sched.parse_cron(cron, tz)


def test_slots_and_their_ids():
    trigger = sched.parse_cron("*/3 * * * * *")
    slot = sched.latest_slot(trigger, WED + timedelta(seconds=4.5), lookback_s=10)
    assert slot == WED + timedelta(seconds=3)
    assert sched.slot_id("nightly", slot) == "refresh-nightly-20261125T120003Z"
    berlin = sched.parse_cron("30 2 * * *", "Europe/Berlin")
    slot = sched.latest_slot(berlin, WED, lookback_s=86400)
    assert sched.slot_id("n", slot) == "refresh-n-20261125T013000Z"  # 02:30 CET in UTC
    assert sched.latest_slot(trigger, WED + timedelta(seconds=1), lookback_s=0.5) is None


# ---- the schedule file --------------------------------------------------------------------


def test_add_list_remove(tmp_path, spec):
    f = tmp_path / "s.json"
    s = sched.add("nightly", "15 1 * * *", spec, address="http://head:8265", path=f)
    assert s.spec == str(spec.resolve())
    assert s.entrypoint == "jobs.refresh"
    assert list(sched.load(f)) == ["nightly"]
    with pytest.raises(sched.ScheduleError, match="exists"):
        sched.add("nightly", "0 2 * * *", spec, path=f)
    sched.add("nightly", "0 2 * * *", spec, path=f, replace=True)
    assert sched.load(f)["nightly"].cron == "0 2 * * *"
    with pytest.raises(sched.ScheduleError, match="must match"):
        sched.add("no spaces", "0 2 * * *", spec, path=f)
    with pytest.raises(jobsubmit.ClusterError, match="not a dotted module"):
        sched.add("x", "0 2 * * *", spec, entrypoint="rm -rf /", path=f)
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: []\n")
    with pytest.raises(MmfpError, match="invalid spec"):
        sched.add("x", "0 2 * * *", bad, path=f)
    with pytest.raises(sched.ScheduleError, match=r"no schedule 'x' .*schedules: nightly"):
        sched.remove("x", path=f)
    sched.remove("nightly", path=f)
    assert sched.load(f) == {}
    f.write_text("{not json")
    with pytest.raises(sched.ScheduleError, match="not a valid schedule file"):
        sched.load(f)


def test_cli_add_list_history_remove(tmp_path, spec, monkeypatch):
    import typer

    from jobs.cli_cluster import register

    app = typer.Typer()
    register(app)
    monkeypatch.setenv("MMFP_SCHEDULES", str(tmp_path / "cli.json"))
    runner = CliRunner()
    add = ["schedule", "add", "nightly", "--cron", "15 1 * * *", "--spec", str(spec)]
    result = runner.invoke(app, add)
    assert result.exit_code == 0, result.output
    assert "next slot" in result.output
    assert runner.invoke(app, add).exit_code == 2  # exists: one line, exit 2
    listing = runner.invoke(app, ["schedule", "list"])
    assert "nightly" in listing.output
    assert "15 1 * * *" in listing.output
    assert runner.invoke(app, ["schedule", "history"]).exit_code == 0
    assert runner.invoke(app, ["schedule", "remove", "nightly"]).exit_code == 0
    assert runner.invoke(app, ["schedule", "remove", "nightly"]).exit_code == 2


def test_one_scheduler_per_file(tmp_path):
    f = tmp_path / "s.json"
    held = sched._locked(f.with_name(f"{f.name}.run.lock"))  # another `schedule run`
    with held, pytest.raises(sched.ScheduleError, match="another `mmfp schedule run` holds"):
        sched.Runner(f).run(threading.Event())


# ---- firing -----------------------------------------------------------------------------


class FakeSubmitter:
    def __init__(self, error: Exception | None = None) -> None:
        self.calls: list[dict] = []
        self.error = error

    def __call__(self, kind, args, **kwargs):
        self.calls.append({"kind": kind, "args": args, **kwargs})
        if self.error:
            raise self.error
        return kwargs["submission_id"]


def test_a_slot_fires_once_and_failures_are_retried(tmp_path, spec):
    f = tmp_path / "s.json"
    s = sched.add("every3", "*/3 * * * * *", spec, address="http://h:8265", path=f)
    submitter = FakeSubmitter()
    runner = sched.Runner(f, submitter=submitter)
    now = WED + timedelta(seconds=4)
    record = runner.fire(s, now=now)
    assert record.outcome == "submitted"
    assert record.submission_id == "refresh-every3-20261125T120003Z"
    call = submitter.calls[0]
    slot_seconds = str(int((WED + timedelta(seconds=3)).timestamp()))
    assert call["args"] == [s.spec, "--slot", slot_seconds]  # jobs.refresh: once per slot
    assert (call["kind"], call["module"]) == ("refresh", "jobs.refresh")
    assert call["metadata"]["mmfp.schedule"] == "every3"
    assert runner.fire(s, now=now) is None  # same slot: history says it was submitted
    assert runner.skipped == [record.submission_id]
    assert len(submitter.calls) == 1
    # a restarted runner reads the same history
    assert sched.Runner(f, submitter=submitter).fire(s, now=now) is None

    down = sched.Runner(f, submitter=FakeSubmitter(jobsubmit.ClusterError("cannot reach")))
    failed = down.fire(s, now=now + timedelta(seconds=3))
    assert (failed.outcome, failed.error) == ("failed", "cannot reach")
    dup = sched.Runner(f, submitter=FakeSubmitter(jobsubmit.JobExists("exists")))
    again = dup.fire(s, now=now + timedelta(seconds=3))  # a failed slot may be tried again
    assert again.outcome == "already-submitted"
    outcomes = [(h.submission_id[-7:], h.outcome) for h in sched.history(path=f)]
    assert outcomes == [
        ("120003Z", "submitted"),
        ("120006Z", "failed"),
        ("120006Z", "already-submitted"),
    ]


def test_the_same_slot_on_a_real_cluster(cluster_env: LocalCluster, tmp_path, spec):
    """History stops the second submission; without history Ray refuses the duplicate id."""
    f = tmp_path / "s.json"
    s = sched.add(
        "real", "*/3 * * * * *", spec, address=cluster_env.address, entrypoint=STUB, path=f
    )
    now = datetime.now(UTC)
    first = sched.Runner(f).fire(s, now=now)
    assert first.outcome == "submitted"
    assert sched.Runner(f).fire(s, now=now) is None
    sched.history_file(f).unlink()  # as if the history line were lost in a crash
    assert sched.Runner(f).fire(s, now=now).outcome == "already-submitted"
    ids = [j.submission_id for j in jobsubmit.list_jobs()]
    assert ids.count(first.submission_id) == 1
    job = jobsubmit.wait_for(first.submission_id, timeout=120)
    assert job.status == "SUCCEEDED", job.message
    slot_seconds = int(first.slot.timestamp())
    assert f"--slot {slot_seconds}" in jobsubmit.job_logs(first.submission_id)


def test_a_restart_within_a_slot_does_not_fire_it_again(cluster_env, tmp_path, spec):
    """Both runners catch up the latest slot at start; the second finds it fired."""
    f = tmp_path / "s.json"
    sched.add("minutely", "* * * * *", spec, address=cluster_env.address, entrypoint=STUB, path=f)
    data = json.loads(f.read_text())  # pretend it was added an hour ago
    data["schedules"]["minutely"]["created_at"] = "2026-01-01T00:00:00Z"
    f.write_text(json.dumps(data))

    def run_until(runner: sched.Runner, done) -> None:
        stop = threading.Event()
        thread = threading.Thread(target=runner.run, args=(stop,))
        thread.start()
        deadline = time.monotonic() + 30
        while not done() and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        thread.join(timeout=30)

    a = sched.Runner(f, poll_s=0.2)
    run_until(a, lambda: a.fired)
    by_a = [r.submission_id for r in a.fired]
    # a minute boundary during A's catch-up submission fires the new slot too: each once
    assert [r.outcome for r in a.fired] == ["submitted"] * len(set(by_a))
    b = sched.Runner(f, poll_s=0.2)
    slot_now = sched.latest_slot(sched.load(f)["minutely"].trigger(), datetime.now(UTC), 120)
    run_until(b, lambda: b.fired or b.skipped)
    if sched.slot_id("minutely", slot_now) in by_a:
        assert (b.skipped, b.fired) == ([sched.slot_id("minutely", slot_now)], [])
    else:  # a minute boundary fell between the two runs: B fires the new slot only
        assert {r.submission_id for r in b.fired}.isdisjoint(by_a)


def test_schedule_run_fires_each_slot_once_across_restarts(cluster_env, tmp_path, spec):
    """`mmfp schedule run` with a 3-second cron: distinct slot ids, no slot twice after a
    restart, every id one Ray job, and the refresh jobs (jobs.refresh --slot) succeed."""
    f = tmp_path / "sched.json"
    env = {**cluster_env.env, "MMFP_SCHEDULES": str(f)}
    cli = [sys.executable, "-m", "jobs.cli_cluster", "schedule"]
    add = [*cli, "add", "every3", "--cron", "*/3 * * * * *", "--spec", str(spec), "--grace", "10"]
    subprocess.run(add, cwd=ROOT, env=env, check=True, capture_output=True, timeout=60)

    def run_until_fired(n: int) -> list[sched.Fired]:
        before = len(sched.history(path=f))
        proc = subprocess.Popen([*cli, "run", "--poll", "0.5"], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 40
        while len(sched.history(path=f)) < before + n and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        return sched.history(path=f)[before:]

    first = run_until_fired(2)
    second = run_until_fired(1)
    fired = first + second
    assert len(fired) >= 3
    assert all(f.outcome == "submitted" for f in fired), fired
    ids = [f.submission_id for f in fired]
    assert len(set(ids)) == len(ids)
    assert all(f.slot.second % 3 == 0 for f in fired)
    assert [f.slot for f in fired] == sorted({f.slot for f in fired})
    assert ids[0] == f"refresh-every3-{fired[0].slot:%Y%m%dT%H%M%SZ}"
    jobs = {j.submission_id: j for j in jobsubmit.list_jobs()}
    assert all(i in jobs for i in ids)

    history = subprocess.run([*cli, "history"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert history.returncode == 0, history.stderr
    assert ids[0] in history.stdout
    assert any(s in history.stdout for s in ("PENDING", "RUNNING", "SUCCEEDED"))
    done = jobsubmit.wait_for(ids[0], timeout=150)
    assert done.status == "SUCCEEDED", done.message
