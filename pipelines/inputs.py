"""The inputs ledger (``_inputs``): what a refresh can skip and what disappeared.

Every build records, per input, the fingerprint it listed (size + mtime of the
input's files, or of its tar shard) and what became of it. A refresh lists the
sources again and processes only inputs whose fingerprint is new or changed;
inputs the ledger knows but the listing no longer shows are *removed*, and the
spec's ``refresh.on_removed`` policy decides whether their rows go too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from features.store import FeatureStore

REMOVED = "removed"


@dataclass
class Listing:
    """What the sources hold now: file references and tar shards (path -> fingerprint)."""

    refs: pa.Table
    shards: dict[str, dict[str, str]] = field(default_factory=dict)  # source -> shard -> fp


@dataclass
class LedgerState:
    """The latest ledger row of every input still present (not removed)."""

    rows: dict[str, dict[str, Any]]

    @classmethod
    def read(cls, store: FeatureStore, version: int | None) -> LedgerState:
        if version is None:
            return cls({})
        import duckdb

        con = duckdb.connect()
        con.register("t", store.delta("_inputs", version).to_pyarrow_dataset())
        latest = con.sql(
            "SELECT * FROM t QUALIFY row_number() OVER "
            "(PARTITION BY input_key ORDER BY seen_at DESC, run_id DESC) = 1"
        ).to_arrow_table()
        return cls({r["input_key"]: r for r in latest.to_pylist() if r["outcome"] != REMOVED})

    def container_fingerprints(self) -> dict[str, str]:
        return {r["container"]: r["fingerprint"] for r in self.rows.values() if r["container"]}


def changed_only(listing: Listing, state: LedgerState) -> Listing:
    """The part of ``listing`` whose fingerprints the ledger has not seen."""
    seen = [
        state.rows.get(k, {}).get("fingerprint") for k in listing.refs.column("key").to_pylist()
    ]
    fresh = pc.invert(
        pc.equal(listing.refs.column("fingerprint"), pa.array(seen, pa.string())).fill_null(False)
    )
    known = state.container_fingerprints()
    shards = {
        source: {path: fp for path, fp in shards.items() if known.get(path) != fp}
        for source, shards in listing.shards.items()
    }
    return Listing(listing.refs.filter(fresh), shards)


def removed_inputs(listing: Listing, state: LedgerState) -> list[dict[str, Any]]:
    """Ledger rows of inputs that the sources no longer list.

    An input of a source dropped from the spec is gone too: the spec says
    what the store should hold.
    """
    keys = set(listing.refs.column("key").to_pylist())
    containers = {path for shards in listing.shards.values() for path in shards}
    return [
        row
        for row in state.rows.values()
        if not (row["container"] in containers if row["container"] else row["input_key"] in keys)
    ]


def removal_rows(gone: list[dict[str, Any]], run_id: str) -> pa.Table:
    now = datetime.now(UTC)
    return pa.Table.from_pylist(
        [{**row, "outcome": REMOVED, "run_id": run_id, "seen_at": now} for row in gone]
    )


def removable_ids(gone: list[dict[str, Any]], state: LedgerState) -> set[str]:
    """Sample ids of removed inputs that no input still present also produced."""
    gone_keys = {r["input_key"] for r in gone}
    still = {r["sample_id"] for k, r in state.rows.items() if k not in gone_keys and r["sample_id"]}
    return {r["sample_id"] for r in gone if r["sample_id"] and r["sample_id"] not in still}


def _same(state_row: dict[str, Any] | None, fingerprint: str | None, outcome: str) -> bool:
    if state_row is None or state_row["fingerprint"] != fingerprint:
        return False
    # all three mean "this content is in the store"; a rebuild reports them as stored
    settled = {"sample", "stored", "duplicate"}
    old = state_row["outcome"]
    return old == outcome or (old in settled and outcome in settled)


def news_mask(ledger: pa.Table, state: LedgerState) -> pa.Array:
    """True for ledger rows that tell something new: a new input, fingerprint or outcome."""
    rows = zip(
        ledger.column("input_key").to_pylist(),
        ledger.column("fingerprint").to_pylist(),
        ledger.column("outcome").to_pylist(),
        strict=True,
    )
    return pa.array([not _same(state.rows.get(k), fp, out) for k, fp, out in rows], pa.bool_())
