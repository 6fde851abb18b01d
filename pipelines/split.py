"""Deterministic, group-aware hash split into train / val / test.

A sample's split is a pure function of (group_id or sample_id, seed, ratios,
pinned groups): adding data never moves an existing sample, and every sample of
one group lands in the same split. Pinned groups (``split.groups``: held-out
speakers, a test site) go to the split they are pinned to, groups ``mmfp dedup``
moved to join their near duplicates go where they were moved, every other group
by its hash.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pyarrow as pa

from features.metadata import SPLIT_SETTINGS_KEY
from pipelines.errors import SpecError
from pipelines.identity import stable_unit_interval
from pipelines.spec import SplitSpec

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
    moved: Mapping[str, str] | None = None,
) -> pa.Table:
    """Fill the ``split`` column of rows that have a ``sample_id``; ``groups`` pins
    named group ids to a split, ``moved`` (group id -> split) holds the groups
    ``mmfp dedup`` moved to join their near duplicates (``pipelines.same_split``)."""
    pinned = {**(moved or {}), **{g: name for name, names in (groups or {}).items() for g in names}}
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


def split_properties(split: SplitSpec) -> dict[str, str]:
    """Table properties of ``samples``: the settings its rows were split with."""
    settings = split.model_dump(mode="json")
    settings["groups"] = {name: sorted(ids) for name, ids in settings["groups"].items() if ids}
    settings["ratios"] = {name: r for name, r in settings["ratios"].items() if r > 0}
    return {SPLIT_SETTINGS_KEY: json.dumps(settings, sort_keys=True)}


def check_split_unchanged(properties: Mapping[str, str], split: SplitSpec) -> None:
    """Refuse a build whose split settings differ from those the stored samples used.

    Stored samples keep their split; new samples of an existing group would take the
    new settings' split, so one speaker or site would span train and test. (A store
    written before the settings were recorded is not checked.)
    """
    recorded = properties.get(SPLIT_SETTINGS_KEY)
    wanted = split_properties(split)[SPLIT_SETTINGS_KEY]
    if recorded is None or json.loads(recorded) == json.loads(wanted):
        return
    raise SpecError(
        f"split settings changed: the stored samples were split with {recorded}, the spec "
        f"says {wanted}. Stored samples keep their split, so new samples of the same group "
        "could land in another split. Put the old `split` settings back, or build into a "
        "new store (`store.uri`)."
    )
