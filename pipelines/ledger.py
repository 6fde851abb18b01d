"""The inputs ledger (``_inputs``) and the plan a run makes from it, as Arrow tables.

Every build records, per input, the fingerprint it listed (size + mtime of the
input's files, or of its tar shard) and what became of it. ``plan_inputs`` is
the one planning step: from what the sources list now and the ledger's latest
state it decides what the run reads (everything for a build, only new or
changed inputs for a refresh), which inputs disappeared (a ``removed`` ledger
row each) and, under ``refresh.on_removed: delete``, which sample ids leave
the store. Each listed input carries its previous fingerprint and outcome
into the stage, so the workers write only ledger rows that tell something new
and the driver never reads them back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from features.duck import connect
from features.keys import anti_join
from features.schema import INPUTS
from features.tables import TableStore
from pipelines.listing import Listing

REMOVED = "removed"
SETTLED = ("sample", "stored", "duplicate")  # all mean "this content is in the store"
STATE_COLUMNS = ["input_key", "source", "container", "fingerprint", "outcome", "sample_id"]
# what a listed input carries of its last ledger row (null: the ledger never saw it)
PREVIOUS = [("prev_fingerprint", "fingerprint"), ("prev_outcome", "outcome")]


@dataclass
class InputPlan:
    """What a run reads, records and removes."""

    todo: Listing  # inputs to read, each with its previous ledger state
    member_state: dict[str, str]  # shard path -> its members' ledger state (JSON)
    removed: pa.Table  # ``_inputs`` rows recording inputs that disappeared
    delete_ids: pa.Array  # sample ids to remove (``on_removed: delete``)
    skipped: int  # unchanged inputs a refresh does not read again


def read_state(store: TableStore, version: int | None) -> pa.Table:
    """The latest ledger row of every input still present (not removed)."""
    if version is None:
        return INPUTS.empty_table().select(STATE_COLUMNS)
    con = connect({"t": store.dataset("_inputs", version)})
    return con.sql(
        f"SELECT {', '.join(STATE_COLUMNS)} FROM t QUALIFY row_number() OVER "
        "(PARTITION BY input_key ORDER BY seen_at DESC, run_id DESC) = 1 AND outcome != ?",
        params=[REMOVED],
    ).to_arrow_table()


def plan_inputs(
    listing: Listing,
    state: pa.Table,
    *,
    incremental: bool,
    delete_removed: bool,
    run_id: str,
    retry: pa.Array | None = None,
) -> InputPlan:
    """The run's input plan: what to read, what disappeared, which sample ids go.

    ``retry``: input keys an incremental run reads again although they did not change
    (inputs a quality filter refused, when the filters changed: ``mmfp filter``).
    """
    refs = _with_previous(listing.refs, state)
    shards = listing.shards
    removed = state.slice(0, 0)
    if incremental:
        retry = pa.array([], pa.string()) if retry is None else retry
        fresh = pc.invert(pc.equal(refs.column("fingerprint"), refs.column("prev_fingerprint")))
        fresh = pc.or_(fresh.fill_null(True), pc.is_in(refs.column("key"), retry))
        refs = refs.filter(fresh)
        known = _container_fingerprints(state)
        members = state.filter(pc.is_in(state.column("input_key"), retry))
        again = set(members.column("container").drop_null().to_pylist())
        shards = {
            source: {
                path: fp for path, fp in found.items() if known.get(path) != fp or path in again
            }
            for source, found in listing.shards.items()
        }
        removed = _removed(listing, state)
    todo = Listing(refs, shards)
    gone_ids = removed.column("sample_id").drop_null()
    if delete_removed and len(gone_ids):
        present = anti_join(state, removed, ["input_key"]).column("sample_id").drop_null()
        delete_ids = anti_join(
            pa.table({"sample_id": gone_ids}), pa.table({"sample_id": present}), ["sample_id"]
        ).column("sample_id")
    else:
        delete_ids = pa.chunked_array([], pa.string())
    return InputPlan(
        todo=todo,
        member_state=_member_state(state, todo),
        removed=_removal_rows(removed, run_id),
        delete_ids=pc.unique(delete_ids.combine_chunks()),
        skipped=listing.refs.num_rows - refs.num_rows,
    )


def _with_previous(refs: pa.Table, state: pa.Table) -> pa.Table:
    """``refs`` plus the fingerprint and outcome the ledger last recorded for each key."""
    previous = state.select(["input_key", "fingerprint", "outcome"]).rename_columns(
        ["key", *(name for name, _ in PREVIOUS)]
    )
    joined = refs.append_column("__order", pa.array(range(refs.num_rows), pa.int64()))
    joined = joined.join(previous, "key", join_type="left outer")
    return joined.sort_by("__order").drop_columns(["__order"])


def _container_fingerprints(state: pa.Table) -> dict[str, str]:
    shard_rows = state.filter(pc.is_valid(state.column("container")))
    pairs = shard_rows.select(["container", "fingerprint"]).group_by("container")
    found = pairs.aggregate([("fingerprint", "max")])
    return dict(
        zip(
            found.column("container").to_pylist(),
            found.column("fingerprint_max").to_pylist(),
            strict=True,
        )
    )


def _removed(listing: Listing, state: pa.Table) -> pa.Table:
    """Ledger rows of inputs the sources no longer list.

    An input of a source dropped from the spec is gone too: the spec says
    what the store should hold.
    """
    has_container = pc.is_valid(state.column("container"))
    files = state.filter(pc.invert(has_container))
    members = state.filter(has_container)
    listed_keys = listing.refs.select(["key"]).rename_columns(["input_key"])
    listed_shards = pa.table(
        {"container": [p for found in listing.shards.values() for p in found]},
        schema=pa.schema([("container", pa.string())]),
    )
    return pa.concat_tables(
        [
            anti_join(files, listed_keys, ["input_key"]),
            anti_join(members, listed_shards, ["container"]),
        ]
    )


def _member_state(state: pa.Table, todo: Listing) -> dict[str, str]:
    """Per shard to read: its members' latest ledger state, ``{key: [fingerprint, outcome]}``
    as JSON (travels with the shard to the task that reads it)."""
    paths = [p for found in todo.shards.values() for p in found]
    if not paths:
        return {}
    rows = state.filter(pc.is_in(state.column("container"), pa.array(paths, pa.string())))
    members: dict[str, dict[str, list[str]]] = {path: {} for path in paths}
    for row in rows.select(["container", "input_key", "fingerprint", "outcome"]).to_pylist():
        members[row["container"]][row["input_key"]] = [row["fingerprint"], row["outcome"]]
    return {path: json.dumps(known) for path, known in members.items()}


def _removal_rows(removed: pa.Table, run_id: str) -> pa.Table:
    n = removed.num_rows
    now = pa.scalar(datetime.now(UTC), pa.timestamp("us", tz="UTC"))
    return pa.table(
        {
            "input_key": removed.column("input_key"),
            "source": removed.column("source"),
            "container": removed.column("container"),
            "fingerprint": removed.column("fingerprint"),
            "outcome": pa.repeat(pa.scalar(REMOVED), n),
            "sample_id": removed.column("sample_id"),
            "run_id": pa.repeat(pa.scalar(run_id), n),
            "seen_at": pa.repeat(now, n),
        }
    )


def news_mask(ledger: pa.Table) -> pa.Array:
    """True for ledger rows that tell something new: a new input, fingerprint or outcome.

    ``ledger`` carries ``prev_fingerprint`` and ``prev_outcome`` (null for an
    input the ledger never saw); the three settled outcomes count as the same.
    """
    outcome, previous = ledger.column("outcome"), ledger.column("prev_outcome")
    same_outcome = pc.or_(
        pc.equal(outcome, previous),
        pc.and_(pc.is_in(outcome, pa.array(SETTLED)), pc.is_in(previous, pa.array(SETTLED))),
    )
    same_fp = pc.equal(ledger.column("fingerprint"), ledger.column("prev_fingerprint"))
    return pc.invert(pc.and_(same_fp, same_outcome).fill_null(False))
