"""The one policy for bad inputs: an ``InputError`` at any stage becomes a quarantine row.

Stages never drop a row and never crash on one input (webdataset's
``handler=``, with a single handler): a failing row keeps its place in the
stream with the three error columns set (``ERROR_FIELDS``), whatever stage
failed it, and a router (``pipelines.route``) turns every such row into one
``quarantine`` row keyed by (input, stage, error type), so a rerun over the
same bad input adds nothing. Anything that is not an ``InputError`` is a bug
and propagates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.errors import InputError, UnreadableInput
from pipelines.identity import short_hash

ERROR_FIELDS = (
    pa.field("error_stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
)
ERROR_COLUMNS = [f.name for f in ERROR_FIELDS]


def error_columns(error: InputError) -> dict[str, str]:
    """The error columns of a row that ``error`` refused."""
    return {
        "error_stage": error.stage,
        "error_type": type(error).__name__,
        "error_message": str(error),
    }


# OSErrors that are about one input (a directory where a file was named, no permission);
# any other OSError is the store's or the network's and fails the run instead.
INPUT_OS_ERRORS = (IsADirectoryError, NotADirectoryError, PermissionError, FileNotFoundError)


def row_or_error(make: Callable[[], dict[str, Any]], **base: Any) -> dict[str, Any]:
    """``make()``'s row, or ``base`` plus the error columns when reading or decoding fails.

    One input never fails a run: an ``InputError`` keeps its type, anything else a
    decoder or parser raises on it becomes ``UnreadableInput`` naming the exception.
    """
    try:
        return make()
    except InputError as e:
        return {**base, **error_columns(e)}
    except OSError as e:
        if not isinstance(e, INPUT_OS_ERRORS):
            raise
        return {**base, **error_columns(unreadable(e))}
    except Exception as e:
        return {**base, **error_columns(unreadable(e))}


def unreadable(error: BaseException) -> UnreadableInput:
    """An unanticipated failure on one input, as one line: ``Type: message``."""
    message = " ".join(str(error).split())[:300]
    return UnreadableInput(
        f"{type(error).__name__}: {message}" if message else type(error).__name__
    )


def with_errors(batch: pa.Table, errors: Mapping[int, InputError]) -> pa.Table:
    """``batch`` with the error columns of row ``i`` set from ``errors[i]`` (others kept)."""
    if not errors:
        return batch
    for name in ERROR_COLUMNS:
        values = batch.column(name).to_pylist()
        for i, error in errors.items():
            values[i] = error_columns(error)[name]
        index = batch.schema.get_field_index(name)
        batch = batch.set_column(index, name, pa.array(values, pa.string()))
    return batch


def is_error(batch: pa.Table) -> pa.ChunkedArray:
    """True for the rows a stage refused."""
    return pc.is_valid(batch.column("error_type"))


def quarantine_rows(errors: pa.Table, uris: list[str], *, run_id: str, now: datetime) -> pa.Table:
    """One ``quarantine`` row per error row; ``uris[i]`` names the input row ``i`` came from."""
    stages = errors.column("error_stage").to_pylist()
    types = errors.column("error_type").to_pylist()
    return pa.table(
        {
            "quarantine_id": [
                short_hash(uri, stage, kind)
                for uri, stage, kind in zip(uris, stages, types, strict=True)
            ],
            "source": (
                errors.column("source")
                if "source" in errors.column_names
                else pa.nulls(errors.num_rows, pa.string())
            ),
            "uri": pa.array(uris, pa.string()),
            "stage": pa.array(stages, pa.string()),
            "error_type": pa.array(types, pa.string()),
            "message": errors.column("error_message"),
            "run_id": pa.repeat(pa.scalar(run_id), errors.num_rows),
            "quarantined_at": pa.repeat(
                pa.scalar(now, pa.timestamp("us", tz="UTC")), errors.num_rows
            ),
        }
    )
