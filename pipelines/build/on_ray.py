"""What a run sets in Ray Data once a stage runs on Ray; undone when the run ends.

Imported only then, so a run that stays in the CLI process never imports Ray
(``pipelines.build.in_process``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ray.data import DataContext
from ray.data._internal.execution.execution_callback import ExecutionCallback

from pipelines.progress import finished_share, report_done


class ExecutionProgress(ExecutionCallback):
    """Reports each scheduling step to the stage that is watching (``pipelines.progress``)."""

    def on_execution_step(self, executor: object) -> None:
        report_done(finished_share(executor))


@contextmanager
def run_settings() -> Iterator[None]:
    """Progress reports on, and Ray Data's per-operator resource reservation off.

    The reservation holds back a share of few CPUs per operator: a short stage idles a
    CPU for ~1 s at its start, and encode's CPU preprocessing ran one task at a time
    beside the model actor, which left the accelerator waiting (BENCHMARKS.md, encode).
    """
    context = DataContext.get_current()
    if ExecutionProgress not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(ExecutionProgress)
    reserved, context.op_resource_reservation_enabled = (
        context.op_resource_reservation_enabled,
        False,
    )
    try:
        yield
    finally:
        context.op_resource_reservation_enabled = reserved
