"""Small runs stay in the CLI process: the same stage functions and sink, without Ray.

A refresh that adds 1% or a build of a few thousand inputs is work of seconds;
starting a local Ray for it (GCS, raylet, agents, worker and actor processes)
costs several seconds more, and on a few cores its processes share them with the
work (20,000 inputs on 2 cores: 22 s here, 27 s on Ray). So when the CLI started
no cluster yet (``mmfp build/refresh/encode`` without ``--address``) and a
stage has few rows (``resources.in_process_inputs`` new inputs for collect,
``in_process_rows`` stored rows for augment and encode), it runs here: each batch
goes through the stage's functions in order and the sink writes one file per
table, exactly as one Ray task would. Models run here only on a machine without
CUDA (on CPU they would in Ray too).

The per-batch steps (read and decode, label, split, augment; everything before a
step that must see every batch, like the run's duplicate check) run in forked
worker processes, one per CPU, batches kept in order: a 2,000-input build is
mostly decoding, and one process is one core. The rest of the steps and the
sink stay here. A worker that dies (a decoder's crash, the OOM killer) fails
the run with ``BrokenProcessPool``; nothing was committed.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc

from features.sink import StoreSink
from features.tables import TableStore, string_field

Step = Callable[[pa.Table], pa.Table]


def run_steps(
    tables: Iterable[pa.Table],
    steps: Sequence[Step],
    sink: StoreSink,
    batch_size: int,
    rows_per_file: int,
    *,
    workers: int = 1,
    serial_from: int | None = None,
    done: Callable[[float], None] | None = None,
) -> int:
    """Every ``batch_size`` rows of ``tables`` through ``steps``, then into ``sink``: one
    file per table for every ``rows_per_file`` input rows, as a Ray task per block would
    (so memory holds one block's output, whatever ``in_process_rows`` is set to).

    The steps before ``serial_from`` (default: all) run in up to ``workers`` forked
    processes. ``done`` hears the share of batches finished after each one. Returns the
    number of processes that ran them.
    """
    batches = [t.slice(o, batch_size) for t in tables for o in range(0, t.num_rows, batch_size)]
    split = len(steps) if serial_from is None else serial_from
    head, tail = list(steps[:split]), steps[split:]
    processes = max(1, min(workers, len(batches))) if head and _can_fork() else 1
    outputs, pending = [], 0
    for finished, (rows, batch) in enumerate(_mapped(head, batches, processes), 1):
        pending += rows
        for step in tail:
            batch = step(batch)
        outputs.append(batch)
        if pending >= rows_per_file:
            sink.record(sink.write(outputs))
            outputs, pending = [], 0
        if done is not None:
            done(finished / len(batches))
    if outputs:
        sink.record(sink.write(outputs))
    return processes


def default_workers(configured: int) -> int:
    """``resources.in_process_workers``, or with 0 the CPUs this process may run on."""
    if configured:
        return configured
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def _can_fork() -> bool:
    """Forking a process that has imported pyarrow and the decoders is safe on Linux; macOS
    forbids it for some system libraries, so there the steps run here."""
    return sys.platform == "linux"


# a worker's steps and the stage's batches, set once when it starts: a batch is a slice,
# and pickling a slice of an Arrow table writes the whole table, so workers get indices
_installed: list[tuple[Sequence[Step], list[pa.Table]]] = []
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _install(steps: Sequence[Step], batches: list[pa.Table], parent: int) -> None:
    _die_with(parent)
    _installed[:] = [(steps, batches)]


def _die_with(parent: int) -> None:
    """End this worker when the CLI process ends, even by SIGKILL: a worker waits on its
    task queue, whose pipe it holds both ends of, so it would never see the parent go."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _apply_installed(index: int) -> pa.Table:
    steps, batches = _installed[0]
    return _apply(batches[index], steps)


def _apply(batch: pa.Table, steps: Sequence[Step]) -> pa.Table:
    for step in steps:
        batch = step(batch)
    return batch


def _mapped(
    steps: list[Step], batches: list[pa.Table], processes: int
) -> Iterator[tuple[int, pa.Table]]:
    """(input rows, output) of each batch through ``steps``, in order; with several
    processes, at most two batches per process are in flight (bounded memory)."""
    if processes == 1:
        for batch in batches:
            yield batch.num_rows, _apply(batch, steps)
        return
    # fork: workers share the parent's imports, steps and batches; only outputs are pickled
    pool = ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_install,
        initargs=(steps, batches, os.getpid()),
    )
    in_flight: deque[tuple[int, Future[pa.Table]]] = deque()
    try:
        for index, batch in enumerate(batches):
            in_flight.append((batch.num_rows, pool.submit(_apply_installed, index)))
            if len(in_flight) >= 2 * processes:
                rows, future = in_flight.popleft()
                yield rows, future.result()
        while in_flight:
            rows, future = in_flight.popleft()
            yield rows, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def rows_of(store: TableStore, table: str, columns: list[str], todo: pa.Table) -> pa.Table:
    """The rows of ``table`` whose ``sample_id`` the stage's ``todo`` names: a small run
    reads just those, where Ray's tasks read the whole table and filter in the stream."""
    wanted = string_field("sample_id").isin(pc.unique(todo.column("sample_id")))
    return store.to_arrow(table, columns=columns, filter=wanted)


def no_cuda() -> bool:
    """True on a machine without a CUDA device: a model runs on CPU wherever it runs."""
    import torch

    return not torch.cuda.is_available()
