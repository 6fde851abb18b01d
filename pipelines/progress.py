"""A run's progress as events, for whoever shows it (``jobs.live``); the library never prints.

``Run.stage`` reports each stage's start and end; while a stage's Ray Data
execution runs, ``ExecutionProgress`` (a Ray Data execution callback, called on
the driver at every scheduling step) reports the share of its tasks finished,
the same measure as Ray Data's own dataset progress bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ray.data import DataContext
from ray.data._internal.execution.execution_callback import ExecutionCallback


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


@contextmanager
def watching(progress: StageProgress, listener: Listener) -> Iterator[None]:
    """Report ``progress`` to ``listener`` while Ray Data executions run inside the block."""
    context = DataContext.get_current()
    if ExecutionProgress not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(ExecutionProgress)
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


class ExecutionProgress(ExecutionCallback):
    """Reports the running stage's share of finished tasks, at most every ``EVERY`` s."""

    def __init__(self) -> None:
        self._last = 0.0

    def on_execution_step(self, executor: object) -> None:
        if not _watching or time.monotonic() - self._last < EVERY:
            return
        self._last = time.monotonic()
        progress, listener = _watching[-1]
        share = finished_share(executor)
        if share is not None:
            progress.done = share
        listener(progress)
