"""Deterministic, group-aware hash split into train / val / test.

A sample's split is a pure function of (group_id or sample_id, seed, ratios,
pinned groups): adding data never moves an existing sample, and every sample of
one group lands in the same split. Pinned groups (``split.groups``: held-out
speakers, a test site) go to the split they are pinned to, every other group by
its hash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa

from pipelines.identity import stable_unit_interval

SPLITS = ("train", "val", "test")


def assign_split(key: str, *, seed: int, ratios: Mapping[str, float]) -> str:
    """The split for one key: its hash in [0, 1) against the cumulative ratios."""
    u = stable_unit_interval("split", seed, key)
    edge = 0.0
    last = "train"
    for name in SPLITS:
        ratio = ratios.get(name, 0.0)
        if ratio <= 0:
            continue
        edge += ratio
        last = name
        if u < edge:
            return name
    return last  # only reached through float rounding at the top edge


def split_batch(
    batch: pa.Table,
    *,
    seed: int,
    ratios: Mapping[str, float],
    by: str = "group",
    groups: Mapping[str, Sequence[str]] | None = None,
) -> pa.Table:
    """Fill the ``split`` column of rows that have a ``sample_id``; ``groups`` pins
    named group ids to a split."""
    pinned = {g: name for name, names in (groups or {}).items() for g in names}
    ids = batch.column("sample_id").to_pylist()
    group_ids = batch.column("group_id").to_pylist() if by == "group" else [None] * len(ids)
    splits = [
        None
        if sid is None
        else pinned.get(group) or assign_split(group or sid, seed=seed, ratios=ratios)
        for sid, group in zip(ids, group_ids, strict=True)
    ]
    index = batch.schema.get_field_index("split")
    return batch.set_column(index, "split", pa.array(splits, pa.string()))
