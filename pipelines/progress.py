"""A run's progress as events, for whoever shows it (``jobs.live``); the library never prints.

``Run.stage`` reports each stage's start and end; while a stage's Ray Data
execution runs, ``pipelines.build.on_ray.ExecutionProgress`` (a Ray Data
execution callback, called on the driver at every scheduling step) reports the
share of its tasks finished (``report_done``), the same measure as Ray Data's
own dataset progress bar. This module does not import Ray: a run that stays in
the CLI process never does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StageProgress:
    stage: str
    started: float = field(default_factory=time.monotonic)
    done: float | None = None  # share of the stage's Ray tasks finished; None: not known
    finished: bool = False
    rows: int = 0  # at the end: rows the stage produced
    quarantined: int = 0  # the run's quarantined inputs so far

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    @property
    def eta(self) -> float | None:
        """Seconds left, from the share done so far (None before any task finished)."""
        if self.finished or not self.done:
            return None
        return self.seconds * (1 - self.done) / self.done


Listener = Callable[[StageProgress], None]
EVERY = 0.5  # seconds between two in-stage events

_watching: list[tuple[StageProgress, Listener]] = []  # the stage an execution belongs to
_last_step = [0.0]  # when ``report_done`` last told a listener


@contextmanager
def watching(progress: StageProgress, listener: Listener) -> Iterator[None]:
    """Report ``progress`` to ``listener`` while Ray Data executions run inside the block."""
    _watching.append((progress, listener))
    try:
        yield
    finally:
        _watching.pop()  # stages nest: the innermost ends first


def finished_share(executor: object) -> float | None:
    """Finished tasks of the last operator / its expected outputs, as Ray Data's dataset
    progress bar counts them; None while unknown or where the executor differs."""
    topology = getattr(executor, "_topology", None)  # Ray Data 2.60's streaming executor
    if not topology:
        return None
    op, state = list(topology.items())[-1]
    total = op.num_outputs_total()
    return min(1.0, state.num_completed_tasks / total) if total else None


def report_done(share: float | None) -> None:
    """The watching stage has done ``share`` of its work (None: not known): its listener
    hears of it at most every ``EVERY`` seconds (Ray Data's steps, or a stage run in this
    process after each batch)."""
    if not _watching or time.monotonic() - _last_step[0] < EVERY:
        return
    _last_step[0] = time.monotonic()
    progress, listener = _watching[-1]
    if share is not None:
        progress.done = share
    listener(progress)
