"""Near duplicates land in the same split, and so do their groups.

A near-duplicate pair across train and test leaks; moving only the one sample
would split its group (a speaker, a site) instead. So split keys (the group
id, or the sample id without one: ``pipelines.split``) linked by near pairs
form sets, and every sample of a set that spans splits moves to one split:
the split a key of the set is pinned to (``split.groups``), else the split
that already holds most of the set's samples, a tie going to the earliest of
train, val, test, so that held-out splits only ever lose samples to training,
never gain seen content.
A set whose keys are pinned to two different splits cannot be joined, and a set
larger than ``max_set`` samples is not: near pairs between big groups (two
speakers who share a reused image) would otherwise pull whole speakers, or the
whole store, into one split. Both are counted and left for
``exclude_duplicates``, which removes every leak the moves did not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipelines.split import SPLITS

ALWAYS_JOINED = 10  # sets of up to this many samples are joined whatever the store's size

MOVES = pa.schema([("sample_id", pa.string()), ("split", pa.string()), ("from_split", pa.string())])


@dataclass
class SplitMoves:
    """What joining the near-duplicate sets moves."""

    moves: pa.Table  # MOVES: each sample whose split changes, with its new and old split
    groups: dict[str, str]  # group id -> split, for samples of those groups built later
    joined: int  # near-duplicate sets that spanned splits and were joined
    conflicts: int  # sets pinned to two splits: left as they are
    too_large: int = 0  # sets of more than max_set samples: left as they are

    def counts(self) -> dict[str, int]:
        """Moved samples per ``from->to``."""
        pairs = zip(
            self.moves.column("from_split").to_pylist(),
            self.moves.column("split").to_pylist(),
            strict=True,
        )
        return dict(sorted(Counter(f"{a}->{b}" for a, b in pairs).items()))

    def moved_to(self) -> dict[str, str]:
        """Sample id -> the split it moves to."""
        ids, splits = (self.moves.column(c).to_pylist() for c in ("sample_id", "split"))
        return dict(zip(ids, splits, strict=True))


def join_near_sets(
    samples: pa.Table,
    pairs: pa.Table,
    *,
    by: str,
    pinned: Mapping[str, Sequence[str]],
    max_set: int | None = None,
) -> SplitMoves:
    """The moves that put every near pair of ``pairs`` (a, b) in one split.

    ``samples`` has ``sample_id``, ``group_id`` and ``split`` of every stored sample;
    pairs naming a sample not among them are ignored. Sets of more than ``max_set``
    samples (None: no limit) are left where they are.
    """
    from scipy.sparse import coo_matrix  # here: the CLI starts without SciPy
    from scipy.sparse.csgraph import connected_components

    ids = samples.column("sample_id").to_pylist()
    groups = samples.column("group_id").to_pylist() if by == "group" else [None] * len(ids)
    keys = [group or sid for sid, group in zip(ids, groups, strict=True)]
    key_names, key_of_sample = np.unique(np.array(keys, dtype=object), return_inverse=True)
    position = {sid: i for i, sid in enumerate(ids)}
    a = [position.get(s) for s in pairs.column("a").to_pylist()]
    b = [position.get(s) for s in pairs.column("b").to_pylist()]
    known = [(i, j) for i, j in zip(a, b, strict=True) if i is not None and j is not None]
    if not known:
        return SplitMoves(MOVES.empty_table(), {}, 0, 0)
    left, right = (key_of_sample[np.array(side)] for side in zip(*known, strict=True))
    n = len(key_names)
    graph = coo_matrix((np.ones(len(left)), (left, right)), shape=(n, n))
    _, set_of_key = connected_components(graph, directed=False)
    linked = np.zeros(n, dtype=bool)
    linked[left] = linked[right] = True

    splits = np.array(samples.column("split").to_pylist(), dtype=object)
    set_of_sample = set_of_key[key_of_sample]
    pins: dict[int, set[str]] = {}
    for name, names in pinned.items():
        for group in names:
            at = np.searchsorted(key_names, group)
            if at < n and key_names[at] == group:
                pins.setdefault(set_of_key[at], set()).add(name)
    members = np.flatnonzero(np.isin(set_of_sample, set_of_key[linked]))
    members = members[np.argsort(set_of_sample[members], kind="stable")]
    found, starts = np.unique(set_of_sample[members], return_index=True)
    targets: dict[int, str] = {}
    joined = conflicts = too_large = 0
    for one, rows in zip(found, np.split(members, starts[1:]), strict=True):
        if len({s for s in splits[rows] if s is not None}) < 2:
            continue
        if len(pins.get(one, ())) > 1:
            conflicts += 1
            continue
        if max_set is not None and len(rows) > max_set:
            too_large += 1
            continue
        targets[one] = next(iter(pins[one])) if one in pins else _most_held(splits[rows])
        joined += 1
    if not targets:
        return SplitMoves(MOVES.empty_table(), {}, 0, conflicts, too_large)
    target = np.array([targets.get(s) for s in set_of_sample], dtype=object)
    moving = np.flatnonzero((target != None) & (target != splits))  # noqa: E711 (elementwise)
    moves = pa.table(
        {
            "sample_id": pa.array([ids[i] for i in moving], pa.string()),
            "split": pa.array(target[moving].tolist(), pa.string()),
            "from_split": pa.array(splits[moving].tolist(), pa.string()),
        },
        schema=MOVES,
    )
    moved_groups = {groups[i]: target[i] for i in moving if groups[i] is not None}
    return SplitMoves(moves, moved_groups, joined, conflicts, too_large)


def _most_held(splits: np.ndarray) -> str:
    """The split holding most of ``splits``; a tie goes to the earliest of ``SPLITS``."""
    counts = {name: int((splits == name).sum()) for name in SPLITS}
    return max(SPLITS, key=lambda name: (counts[name], -SPLITS.index(name)))


def largest_joined(fraction: float, stored: int) -> int:
    """The ``max_set`` for ``same_split_max``: a fraction of the stored samples, at least
    ``ALWAYS_JOINED``."""
    return max(ALWAYS_JOINED, int(fraction * stored))
