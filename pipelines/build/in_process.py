"""Small runs stay in the CLI process: the same stage functions and sink, without Ray.

A refresh that adds 1% or a build of a few thousand inputs is work of seconds;
starting a local Ray for it (GCS, raylet, agents, worker and actor processes)
costs several seconds more, and on a few cores its processes share them with the
work (20,000 inputs on 2 cores: 19-22 s here, 27-31 s on Ray). So when the CLI
started no cluster yet (``mmfp build/refresh/encode`` without ``--address``) and
a stage fits (by default any size on a machine of at most 8 CPUs, 20,000 inputs or
stored rows on a larger one: ``resources.in_process_inputs`` for collect,
``in_process_rows`` for augment and encode, which read their stored rows a block at a
time), it runs here: each batch goes through the stage's functions in order and
the sink writes one file per table, exactly as one Ray task would. Models run here
only on a machine without CUDA (on CPU they would in Ray too): they load once, here,
before the workers fork, and each worker's forward runs on one thread.

The per-batch steps (read and decode, label, split, augment; everything before a
step that must see every batch, like the run's duplicate check) run in forked
worker processes, one per CPU, batches kept in order: a 2,000-input build is
mostly decoding, and one process is one core. Their outputs come back through
shared memory (Arrow IPC files in /dev/shm, mapped here), not pickles. The rest
of the steps and the sink stay here. A worker that dies (a decoder's crash, the OOM killer) fails
the run with ``BrokenProcessPool``; nothing was committed.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import itertools
import multiprocessing
import os
import signal
import sys
import uuid
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
    done: Callable[[int], None] | None = None,
) -> int:
    """Every ``batch_size`` rows of ``tables`` through ``steps``, then into ``sink``: one
    file per table for every ``rows_per_file`` input rows, as a Ray task per block would
    (so memory holds one block's output, and two of ``tables``, which may be a stream of
    chunks: ``stored_rows``).

    The steps before ``serial_from`` (default: all) run in up to ``workers`` forked
    processes; those with a ``load`` method (a model: ``Encode``, ``Labeller``) load
    first, here. ``done`` hears the input rows finished so far after each batch. Returns the
    number of processes that ran them.
    """
    split = len(steps) if serial_from is None else serial_from
    head, tail = list(steps[:split]), steps[split:]
    for step in head:  # a step's model loads here, once: the forked workers share it
        if callable(load := getattr(step, "load", None)):
            load()
    tables, processes = _processes(iter(tables), batch_size, workers if head and _can_fork() else 1)
    outputs, pending, finished = [], 0, 0
    for rows, batch in _mapped(head, tables, batch_size, processes):
        pending += rows
        finished += rows
        outputs.append(batch)
        if pending >= rows_per_file:
            sink.record(sink.write(_through(tail, outputs)))
            outputs, pending = [], 0
        if done is not None:
            done(finished)
    if outputs:
        sink.record(sink.write(_through(tail, outputs)))
    return processes


def _processes(
    tables: Iterator[pa.Table], batch_size: int, workers: int
) -> tuple[Iterator[pa.Table], int]:
    """The processes to run: ``workers``, or fewer when the first two tables (of a stream
    that has more, each a block) have fewer batches; and the tables, as they were."""
    peeked = list(itertools.islice(tables, 2))
    batches = sum(-(-t.num_rows // batch_size) for t in peeked)
    return itertools.chain(peeked, tables), max(1, min(workers, batches))


def _through(tail: Sequence[Step], outputs: list[pa.Table]) -> list[pa.Table]:
    """One file's batches through the steps that stay here, as one table where they
    concatenate (for the sink's router too): the duplicate check and the router cost ~40
    Arrow calls per table whatever its size, so per 32-row batch they were most of this
    process's work."""
    try:
        blocks = [pa.concat_tables(outputs, promote_options="default")]
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # batches of other columns: one at a time
        blocks = outputs
    return [_apply(block, tail) for block in blocks]


# The CLI process checks, routes and writes ~0.22 ms of CPU per collected input while a
# worker reads and decodes it in ~1.5 ms (20,000 inputs on 2 cores, 2026-11-29), so it
# keeps up with ~7 workers: up to 8 CPUs collect stays here at any size (100,000 inputs on
# 2 cores: 112 s here, 138 s on a local Ray); on more, Ray's tasks route and write in
# parallel and win once the work outweighs starting Ray.
FEW_CPUS = 8
MANY_CPUS_INPUTS = 20_000


def input_limit(configured: int | None, cpus: int) -> int:
    """``resources.in_process_inputs``, or by default (None) every input on a machine of
    at most ``FEW_CPUS`` CPUs and ``MANY_CPUS_INPUTS`` on a larger one."""
    if configured is not None:
        return configured
    return sys.maxsize if cpus <= FEW_CPUS else MANY_CPUS_INPUTS


def default_workers(configured: int) -> int:
    """``resources.in_process_workers``, or with 0 the CPUs this process may run on."""
    if configured:
        return configured
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def _can_fork() -> bool:
    """Forking a process that has imported pyarrow and the decoders is safe on Linux; macOS
    forbids it for some system libraries, so there the steps run here."""
    return sys.platform == "linux"


SHARED_MEMORY = "/dev/shm"  # tmpfs on Linux; where it is missing or full, tables are pickled
SHM_PREFIX = "mmfp-batch-"  # + the CLI process's pid, so orphans can be told from live files
_installed: list[Sequence[Step]] = []  # a worker's steps, set once when it starts
_chunk: list[tuple[str, pa.Table]] = []  # the table a worker mapped last, and its path
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _install(steps: Sequence[Step], parent: int) -> None:
    _die_with(parent)
    _one_thread()
    _installed[:] = [steps]


def _one_thread() -> None:
    """A model's forward in a worker runs on one thread: the other workers have the other
    cores (DESIGN §7's ideal is one thread times the cores), and torch's OpenMP pool is
    not fork-safe above one thread. Its weights were loaded before the fork, so the
    workers share them."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _die_with(parent: int) -> None:
    """End this worker when the CLI process ends, even by SIGKILL: a worker waits on its
    task queue, whose pipe it holds both ends of, so it would never see the parent go."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _apply_installed(source: str | pa.Buffer, offset: int, length: int) -> pa.Table | str:
    """Rows ``offset`` to ``offset + length`` of a table handed over in shared memory
    (mapped once per worker), or of a batch sent as IPC bytes, through the worker's
    steps."""
    if isinstance(source, pa.Buffer):
        table = pa.ipc.open_stream(source).read_all()
    else:
        if not _chunk or _chunk[0][0] != source:
            _chunk[:] = [(source, _read(source))]
        table = _chunk[0][1]
    return _handed_over(_apply(table.slice(offset, length), _installed[0]))


def _handed_over(table: pa.Table) -> pa.Table | str:
    """The table written to shared memory as Arrow IPC, for another process to map (its
    path), or the table itself, pickled through the pipe, where there is no /dev/shm or it
    is full. A batch of media is megabytes: pickling it, the pipe and unpickling cost ~5x
    the CPU of one copy into shared memory (2.6 against 0.5 CPU s per 0.9 GB here)."""
    path = f"{SHARED_MEMORY}/{SHM_PREFIX}{_cli_pid()}-{uuid.uuid4().hex}.arrow"
    try:
        with pa.OSFile(path, "wb") as out, pa.ipc.new_file(out, table.schema) as writer:
            writer.write_table(table)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        return table
    return path


def _cli_pid() -> int:
    """The CLI process's pid, in a worker (its parent) or in the CLI process itself."""
    return os.getppid() if _installed else os.getpid()


def _read(path: str) -> pa.Table:
    return pa.ipc.open_file(pa.memory_map(path)).read_all()


def _taken(output: pa.Table | str) -> pa.Table:
    """A worker's output in this process: mapped, and its file unlinked at once (the
    memory goes when the table does)."""
    if isinstance(output, pa.Table):
        return output
    try:
        return _read(output)
    finally:
        os.unlink(output)


def _drop(future: Future[pa.Table | str]) -> None:
    """Unlink the shared-memory file of an output nobody will take (the run failed)."""
    finished = future.done() and not future.cancelled() and future.exception() is None
    if finished and isinstance(path := future.result(), str):
        _unlink(path)


def _unlink(path: pa.Table | str | None) -> None:
    if isinstance(path, str):
        with contextlib.suppress(OSError):
            os.unlink(path)


def _remove_orphans() -> None:
    """Shared-memory files of CLI processes that are gone (killed between a worker's write
    and their read): tmpfs keeps them, and their memory, until someone unlinks them."""
    for path in glob.glob(f"{SHARED_MEMORY}/{SHM_PREFIX}*.arrow"):
        pid = path[len(SHARED_MEMORY) + 1 + len(SHM_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _apply(batch: pa.Table, steps: Sequence[Step]) -> pa.Table:
    for step in steps:
        batch = step(batch)
    return batch


def _mapped(
    steps: list[Step], tables: Iterable[pa.Table], batch_size: int, processes: int
) -> Iterator[tuple[int, pa.Table]]:
    """(input rows, output) of each ``batch_size`` rows of ``tables`` through ``steps``, in
    order. With several processes, each table goes to the workers once, through shared
    memory, and at most two batches per process are in flight (bounded memory): the next
    table is read while the workers finish this one."""
    if processes == 1:
        for table in tables:
            for offset in range(0, table.num_rows, batch_size):
                batch = table.slice(offset, batch_size)
                yield batch.num_rows, _apply(batch, steps)
        return
    # fork: workers share the parent's imports, steps and loaded models
    _remove_orphans()
    pool = ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("fork"),
        initializer=_install,
        initargs=(steps, os.getpid()),
    )
    # (rows, the batch's output, the table's file to unlink once its last batch is taken)
    in_flight: deque[tuple[int, Future[pa.Table | str], pa.Table | str | None]] = deque()
    shared: pa.Table | str | None = None
    try:
        for table in tables:
            if not table.num_rows:
                continue
            shared = _handed_over(table)
            for offset in range(0, table.num_rows, batch_size):
                rows = min(batch_size, table.num_rows - offset)
                if isinstance(shared, str):
                    future = pool.submit(_apply_installed, shared, offset, rows)
                else:  # no shared memory: the batch alone (a slice pickles its whole table)
                    future = pool.submit(_apply_installed, _ipc(table.slice(offset, rows)), 0, rows)
                last = offset + rows >= table.num_rows
                in_flight.append((rows, future, shared if last else None))
                if len(in_flight) >= 2 * processes:
                    yield _next(in_flight)
        shared = None
        while in_flight:
            yield _next(in_flight)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for _, future, _ in in_flight:
            _drop(future)
        _unlink(shared)  # the table being handed out, or the last one whose batches are out


def _next(
    in_flight: deque[tuple[int, Future[pa.Table | str], pa.Table | str | None]],
) -> tuple[int, pa.Table]:
    """The oldest batch's output, its table's file unlinked once its last batch is in."""
    rows, future, shared = in_flight.popleft()
    try:
        return rows, _taken(future.result())
    finally:
        _unlink(shared)


def _ipc(table: pa.Table) -> pa.Buffer:
    """``table`` as Arrow IPC bytes: only its rows, where pickling a slice writes every row
    of the table it slices."""
    out = pa.BufferOutputStream()
    with pa.ipc.new_stream(out, table.schema) as writer:
        writer.write_table(table)
    return out.getvalue()


def stored_rows(
    store: TableStore, table: str, columns: list[str], todo: pa.Table, chunk_rows: int
) -> Iterator[pa.Table]:
    """The rows of ``table`` whose ``sample_id`` the stage's ``todo`` names, as a stream of
    tables of about ``chunk_rows`` rows (one record batch more at most): a stage run here
    reads just those and holds a few chunks of media at a time, where Ray's tasks read the
    whole table and filter in the stream."""
    wanted = string_field("sample_id").isin(pc.unique(todo.column("sample_id")))
    chunk: list[pa.RecordBatch] = []
    rows = 0
    # read here, as the chunks are taken: a threaded scan reads ahead by hundreds of MB
    one_file = {"use_threads": False, "fragment_readahead": 1, "batch_readahead": 1}
    scanner = store.scanner(table, columns=columns, filter=wanted, **one_file)
    for batch in scanner.to_batches():
        chunk.append(batch)
        rows += batch.num_rows
        if rows >= chunk_rows:
            yield pa.Table.from_batches(chunk)
            chunk, rows = [], 0
    if chunk:
        yield pa.Table.from_batches(chunk)


def no_cuda() -> bool:
    """True on a machine without a CUDA device: a model runs on CPU wherever it runs."""
    import torch

    return not torch.cuda.is_available()
