"""Row keys compared as Arrow hash joins: which rows of one table another already has.

Every place that asks "is this key already stored?" (the commit's conflict
check, the dedup registry, the views and feature sets a run still has to
make) asks it here, with Acero's hash join over the key columns instead of
Python sets of every id. The smaller side is the one hashed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

_ROW = "__mmfp_row"


def key_mask(left: pa.Table, right: pa.Table, keys: Sequence[str]) -> np.ndarray:
    """Boolean mask over ``left``: True where the row's key columns match a row of ``right``.

    Null keys never match. ``right`` is cast to ``left``'s key types first.
    """
    mask = np.zeros(left.num_rows, dtype=bool)
    if left.num_rows == 0 or right.num_rows == 0:
        return mask
    keys = list(keys)
    probe = left.select(keys).append_column(_ROW, pa.array(np.arange(left.num_rows)))
    other = right.select(keys).cast(left.select(keys).schema)
    if other.num_rows > probe.num_rows:  # hash the smaller side (Acero builds on the right)
        found = other.join(probe, keys, join_type="right semi")
    else:
        found = probe.join(other, keys, join_type="left semi")
    mask[found.column(_ROW).to_numpy()] = True
    return mask


def rows_where(table: pa.Table, mask: pa.Array | pa.ChunkedArray | np.ndarray) -> pa.Table:
    """``table.filter(mask)`` (null means drop), without the copy when every row is kept.

    A filter copies every buffer, media bytes included: on a stage's hot path
    (route, dedup) most batches keep all their rows, so that copy is pure waste.
    """
    mask = mask if isinstance(mask, pa.Array | pa.ChunkedArray) else pa.array(mask)
    if mask.null_count == 0 and (len(mask) == 0 or pc.all(mask).as_py()):
        return table
    return table.filter(mask)


def anti_join(left: pa.Table, right: pa.Table, keys: Sequence[str]) -> pa.Table:
    """The rows of ``left`` whose key is not in ``right`` (order kept)."""
    if right.num_rows == 0:
        return left
    return rows_where(left, ~key_mask(left, right, keys))


def semi_join(left: pa.Table, right: pa.Table, keys: Sequence[str]) -> pa.Table:
    """The rows of ``left`` whose key is in ``right`` (order kept)."""
    return rows_where(left, key_mask(left, right, keys))


def version_keys(dt: DeltaTable, keys: Sequence[str], fragments: list | None = None) -> pa.Table:
    """The key columns of a table version (or of some of its file ``fragments``)."""
    dataset = dt.to_pyarrow_dataset()
    if fragments is not None:
        dataset = type(dataset)(fragments, dataset.schema, dataset.format, dataset.filesystem)
    return dataset.to_table(columns=list(keys))


@dataclass
class KeyChanges:
    """What changed by key between two versions of a table."""

    added: pa.Table  # keys in the new version and not the old
    removed: pa.Table  # keys in the old version and not the new
    rewritten: int  # rows whose files changed but which are in both (e.g. optimize)
    files_added: int
    files_removed: int


def changed_keys(old: DeltaTable, new: DeltaTable, keys: Sequence[str]) -> KeyChanges:
    """Keys added and removed going from version ``old`` to ``new``.

    Reads only the files one version has and the other does not (Delta add and
    remove actions), so it costs the change, not the table.
    """
    old_files = {f.path: f for f in old.to_pyarrow_dataset().get_fragments()}
    new_files = {f.path: f for f in new.to_pyarrow_dataset().get_fragments()}
    gone_files = [f for p, f in old_files.items() if p not in new_files]
    came_files = [f for p, f in new_files.items() if p not in old_files]
    gone = version_keys(old, keys, gone_files)
    came = version_keys(new, keys, came_files)
    added = anti_join(came, gone, keys)
    return KeyChanges(
        added=added,
        removed=anti_join(gone, came, keys),
        rewritten=came.num_rows - added.num_rows,
        files_added=len(came_files),
        files_removed=len(gone_files),
    )
