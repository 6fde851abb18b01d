"""Flat Arrow list columns -> dense NumPy arrays, inside Ray Data tasks.

Columns are stored as flat ``list<float32>`` / ``list<int32>`` (Delta has no
fixed-size lists); ``to_tensors`` reshapes them to the recorded per-row shape, so
training workers receive dense arrays, and turns a null (a row missing that
modality) into zeros plus a ``has_<modality>`` mask. Only NumPy and pyarrow are
imported here: Ray may start a fresh worker process for a read task, and that
process imports this module (torch would cost it seconds).
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.errors import StoreError
from features.schema import ORIGINAL_VIEW
from features.tables import string_field


def dense(column: pa.Array | pa.ChunkedArray, shape: list[int], dtype: Any) -> tuple:
    """A flat list column as an ``(rows, *shape)`` array (nulls -> zeros) and a presence mask."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    width = int(np.prod(shape))
    present = column.is_valid().to_numpy(zero_copy_only=False)
    out = np.zeros((len(column), width), dtype=dtype)
    if present.any():
        values = column.filter(pa.array(present)).flatten().to_numpy(zero_copy_only=False)
        if values.size != int(present.sum()) * width:
            raise StoreError(
                f"column {column.type} rows do not all have {width} values (shape {shape}): "
                "the table does not match its recorded shape"
            )
        out[present] = values.reshape(-1, width)
    return out.reshape(len(column), *shape), present


def row_filter(
    split: str, *, include_views: bool, exclude: pa.Array | None = None
) -> pc.Expression:
    """Rows of ``split`` (originals only unless ``include_views``), without the samples in
    ``exclude`` (marked near duplicates: ``features.duplicates.excluded_ids``)."""
    expr = string_field("split") == split
    if not include_views:
        expr = expr & (pc.field("view") == ORIGINAL_VIEW)
    if exclude is not None and len(exclude):
        expr = expr & ~string_field("sample_id").isin(exclude)
    return expr


def label_codes(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each label as a stable int64 (the same string, the same code, on every worker and
    every run); -1 where the row has no label."""
    return np.array(
        [-1 if v is None else int.from_bytes(blake2b(v.encode(), digest_size=7).digest())
         for v in column.to_pylist()],
        dtype=np.int64,
    )  # fmt: skip


def to_tensors(
    batch: pa.Table,
    *,
    inputs: dict[str, tuple[str, list[int], str]],
    split: str,
    include_views: bool,
    labels: bool = False,
    exclude: pa.Array | None = None,
) -> dict[str, np.ndarray]:
    """Rows of ``split`` as ``x_<modality>`` arrays and ``has_<modality>`` masks, plus
    ``label`` codes (``label_codes``) with ``labels``.

    ``inputs`` maps modality -> (column, per-row shape, dtype name). A pure
    function of the batch, so it runs in Ray Data tasks and in unit tests alike.
    """
    batch = batch.filter(row_filter(split, include_views=include_views, exclude=exclude))
    out: dict[str, np.ndarray] = {}
    for modality, (column, shape, dtype) in sorted(inputs.items()):
        x, present = dense(batch.column(column), shape, np.dtype(dtype))
        out[f"x_{modality}"] = x
        out[f"has_{modality}"] = present
    if labels:
        out["label"] = label_codes(batch.column("label"))
    return out
