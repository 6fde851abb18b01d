"""Samples moved to another split, in every table that carries their split.

``mmfp dedup`` joins near-duplicate sets into one split
(``pipelines.same_split``). The moves are applied in an order that a kill at
any point leaves repairable by running the dedup again: the moved groups are
recorded first (``_split_moves``, read by every later build), then ``samples``
is rewritten, then each table that copied a sample's split (``views``,
``quality``, every feature set) is aligned with ``samples``. Each is one Delta
commit planned on the version it commits on, so a second writer's rows are
never lost; rows whose sample is no longer stored keep their split.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError

from features.commit import RunCommits
from features.errors import StoreError
from features.schema import FEATURES_PREFIX, SPLIT_MOVES
from features.tables import RUN_ID_KEY, TableStore

TABLE = "_split_moves"
COPIES = ("views", "quality")  # tables besides the feature sets that copy a sample's split


def recorded_moves(store: TableStore) -> dict[str, str]:
    """Group id -> split of every group a dedup moved (empty when none ever was)."""
    return _moves_of(store.delta(TABLE)) if store.exists(TABLE) else {}


def record_moves(store: TableStore, groups: Mapping[str, str], run_id: str) -> int | None:
    """Add ``groups`` (group id -> split) to the recorded moves, a group's newest move
    winning; one commit, refused if another dedup recorded moves meanwhile."""
    if not groups:
        return None
    store.ensure_table(TABLE)
    dt = store.delta(TABLE)
    known = _moves_of(dt) | dict(groups)
    now = datetime.now(UTC)
    rows = pa.table(
        {
            "group_id": list(known),
            "split": list(known.values()),
            "run_id": [run_id] * len(known),
            "moved_at": [now] * len(known),
        },
        schema=SPLIT_MOVES,
    )
    try:
        write_deltalake(
            dt,
            rows,
            mode="overwrite",
            commit_properties=CommitProperties(custom_metadata={RUN_ID_KEY: run_id}),
        )
    except CommitFailedError as e:
        raise StoreError(
            "another `mmfp dedup` moved groups while this one ran; nothing was moved by this "
            "one: run it again"
        ) from e
    return store.version(TABLE)


def _moves_of(dt: DeltaTable) -> dict[str, str]:
    rows = dt.to_pyarrow_dataset().to_table(columns=["group_id", "split"])
    return dict(zip(*(c.to_pylist() for c in rows.columns), strict=True))


def move_samples(store: TableStore, moves: pa.Table, run_id: str) -> dict[str, int]:
    """Give each sample of ``moves`` (sample_id, split) its split in ``samples``, then
    align every table that copies splits with ``samples``; the new version per table
    that changed."""
    commits = RunCommits(store, run_id)
    versions: dict[str, int] = {}
    if moves.num_rows:
        wanted = moves.select(["sample_id", "split"])
        commits.rewrite("samples", lambda rows: moved_splits(rows, wanted))
        if (version := commits.commit("samples")) is not None:
            versions["samples"] = version
    stored = store.to_arrow("samples", columns=["sample_id", "split"])
    copies = [
        name
        for name in store.tables()
        if (name in COPIES or name.startswith(FEATURES_PREFIX))
        and {"sample_id", "split"} <= set(store.delta(name).schema().to_arrow().names)
    ]
    for name in copies:
        commits.rewrite(name, lambda rows: moved_splits(rows, stored))
        if (version := commits.commit(name)) is not None:
            versions[name] = version
    return versions


def moved_splits(rows: pa.Table, splits: pa.Table) -> pa.Table | None:
    """``rows`` with the ``split`` that ``splits`` (sample_id, split) gives their sample;
    ``None`` when no row changes, so the file is left alone."""
    at = pc.index_in(rows.column("sample_id"), value_set=splits.column("sample_id"))
    wanted = pc.take(splits.column("split"), at)
    current = rows.column("split")
    change = pc.and_(
        pc.is_valid(at), pc.not_equal(pc.fill_null(current, ""), pc.fill_null(wanted, ""))
    )
    if not pc.any(change).as_py():
        return None
    index = rows.schema.get_field_index("split")
    return rows.set_column(index, rows.schema.field(index), pc.if_else(change, wanted, current))
