"""Start or join Ray the way every mmfp job does, with Ray's log lines in the run's log file."""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.options import env_flag
from pipelines.build.run import Execution
from pipelines.progress import Listener

# the loggers whose lines are Ray's, not mmfp's: they go to the run's log file
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
_HANDLER_NAME = "mmfp-run-log"
_routed_to: list[Path] = []  # the file this process's Ray logs go to, once routed
RUN_LOG_NAME = re.compile(r"\d{8}T\d{6}-[0-9a-f]{6}\.log$")  # ends in a run id
KEEP_LOGS = 200
RAY_PLANS = ("features.ray_sink", "pipelines.build.on_ray")  # what a stage on Ray imports


def verbose() -> bool:
    """``--verbose`` / ``MMFP_VERBOSE=1``: Ray's log lines stay on the terminal."""
    return env_flag("MMFP_VERBOSE")


def current_log() -> Path | None:
    """The log file this process's Ray lines go to, if they were routed."""
    return _routed_to[-1] if _routed_to else None


def run_log(name: str) -> Path:
    """Where a run's log file goes: ``$MMFP_LOG_DIR/NAME.log`` (default ``~/.cache/mmfp/logs``)."""
    folder = os.environ.get("MMFP_LOG_DIR") or Path.home() / ".cache" / "mmfp" / "logs"
    return Path(folder) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"


@dataclass
class Job:
    """One CLI job: its run id, its log file, and how to start (or join) Ray for it."""

    run_id: str
    log_file: Path
    address: str | None

    def start_ray(self) -> None:
        """Start or join Ray with its log lines in the job's log file (idempotent)."""
        init_ray(self.address, log_file=self.log_file)

    def execution(self, progress: Listener | None = None) -> Execution:
        """How the job's run reaches compute: Ray started on first need; without a cluster
        address (a private local Ray) small stages stay in this process."""
        local = cluster_address(self.address) is None
        if not local:
            # a cluster job loads its Ray plans now, not mid-run: another job's setup can
            # unpack the same working_dir again under a running one (ray-project/ray#49254)
            for module in RAY_PLANS:
                importlib.import_module(module)
        return Execution(self.start_ray, progress, small_in_process=local)


def new_job(address: str | None, *, prefix: str = "") -> Job:
    """A new run id and its log file; Ray starts when ``Job.start_ray`` is first called
    (builds call it only when a stage has work: a no-op refresh never starts Ray)."""
    from pipelines.build import new_run_id

    run_id = new_run_id()
    log_file = run_log(prefix + run_id)
    prune_logs(log_file.parent)
    return Job(run_id, log_file, address)


def start_job(address: str | None, *, prefix: str = "") -> tuple[str, Path]:
    """A new run id and its log file, with Ray started (or joined) logging there."""
    job = new_job(address, prefix=prefix)
    job.start_ray()
    return job.run_id, job.log_file


def prune_logs(folder: Path, keep: int = KEEP_LOGS) -> None:
    """Keep the newest ``keep`` run logs in ``folder`` (only files named like run logs)."""
    if not folder.is_dir():
        return
    logs = sorted(
        (p for p in folder.glob("*.log") if RUN_LOG_NAME.search(p.name)),
        key=lambda p: RUN_LOG_NAME.search(p.name).group(0),
    )
    for old in logs[: max(0, len(logs) - keep)]:
        old.unlink(missing_ok=True)


def cluster_address(address: str | None) -> str | None:
    """The cluster a job joins: ``--address``, else ``RAY_ADDRESS``; None: a private local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    log_file: Path | None = None,
    **kwargs: Any,
) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``; otherwise start a private local Ray.

    ``address="local"`` is explicit on purpose: a bare ``ray.init()`` joins any
    cluster a past ``ray start`` left on this machine. With ``log_file`` (and not
    verbose), Ray's log lines and Ray Data's progress logging go to that file, so
    the terminal shows mmfp's own output; progress bars stay in a terminal.
    """
    import ray  # here: a command that never starts Ray never imports it

    routed = log_file is not None and not verbose()
    if ray.is_initialized():
        if routed:
            route_ray_logs(log_file)
        return
    address = cluster_address(address)
    if address:
        options: dict[str, Any] = {"address": address}
    else:
        options = {
            "address": "local",
            "num_cpus": num_cpus,
            "include_dashboard": False,
            "logging_level": "WARNING",
            "log_to_driver": False,
        }
    if not address:
        # Ray's own exit hook sleeps 0.5 s for worker output a local run never prints
        # (log_to_driver is off); this hook runs first and makes that one a no-op
        atexit.register(ray.shutdown)
    if not routed:
        ray.init(**options, **kwargs)
        return
    # ray.init clears the "ray" logger's handlers when it does not configure logging;
    # what it logs before they are back goes to Python's last resort: the file too
    init_lines = _file_handler(log_file)
    last_resort, logging.lastResort = logging.lastResort, init_lines
    try:
        ray.init(**options, configure_logging=False, **kwargs)
    finally:
        logging.lastResort = last_resort
        init_lines.close()
    route_ray_logs(log_file)


def route_ray_logs(log_file: Path) -> None:
    """Replace the terminal handlers of Ray's loggers with one file handler (idempotent)."""
    handler = _file_handler(log_file)
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if old.get_name() == _HANDLER_NAME or _to_terminal(old):
                logger.removeHandler(old)
                if old.get_name() == _HANDLER_NAME:
                    old.close()
        logger.addHandler(handler)
        logger.propagate = False
    _routed_to[:] = [log_file]
    from ray.data import DataContext

    # mmfp's own live display (jobs.live) shows progress; Ray Data's bars would print
    # between its lines on a terminal and line by line into a file
    DataContext.get_current().enable_progress_bars = False


def _file_handler(log_file: Path) -> logging.FileHandler:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d %(message)s")
    )
    return handler


def _to_terminal(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    # the real streams too: a live display (rich) swaps sys.stderr for a proxy meanwhile
    terminals = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    return not isinstance(handler, logging.FileHandler) and stream in terminals
