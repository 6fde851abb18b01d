"""Small runs stay in the CLI process: the same stage functions and sink, without Ray.

A refresh that adds 1% or a build of a few hundred inputs is work of a second or
two; starting a local Ray for it (GCS, raylet, agents, worker and actor
processes) costs several seconds more than the work. So when the CLI started
no cluster yet (``mmfp build/refresh/encode`` without ``--address``) and a
stage has at most ``resources.in_process_rows`` rows, it runs here: each batch
goes through the stage's functions in order and the sink writes one file per
table, exactly as one Ray task would. Models run here only on a machine without
CUDA (on CPU they would in Ray too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

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
) -> None:
    """Every ``batch_size`` rows of ``tables`` through ``steps``, then into ``sink``: one
    file per table for every ``rows_per_file`` input rows, as a Ray task per block would
    (so memory holds one block's output, whatever ``in_process_rows`` is set to)."""
    outputs, pending = [], 0
    for table in tables:
        for offset in range(0, table.num_rows, batch_size):
            batch = table.slice(offset, batch_size)
            pending += batch.num_rows
            for step in steps:
                batch = step(batch)
            outputs.append(batch)
            if pending >= rows_per_file:
                sink.record(sink.write(outputs, None))
                outputs, pending = [], 0
    if outputs:
        sink.record(sink.write(outputs, None))


def rows_of(store: TableStore, table: str, columns: list[str], todo: pa.Table) -> pa.Table:
    """The rows of ``table`` whose ``sample_id`` the stage's ``todo`` names: a small run
    reads just those, where Ray's tasks read the whole table and filter in the stream."""
    wanted = string_field("sample_id").isin(pc.unique(todo.column("sample_id")))
    return store.to_arrow(table, columns=columns, filter=wanted)


def no_cuda() -> bool:
    """True on a machine without a CUDA device: a model runs on CPU wherever it runs."""
    import torch

    return not torch.cuda.is_available()
