"""Exact-duplicate removal within a run and against what the store already holds.

One small actor owns the set of ids: the ids committed before the run (read
by the actor itself, not the driver) and, for this run, which input claimed
each new id first. A claim is idempotent per input key, so a retried task
gets the same answer and never turns its own rows into duplicates.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

from features.store import FeatureStore

STORED = ""  # winner marker for ids committed before this run


@ray.remote(num_cpus=0)
class IdRegistry:
    def __init__(self, store: FeatureStore, version: int | None) -> None:
        self.stored: set[str] = set()
        if version is not None:  # None: no samples table yet
            self.stored = set(store.column_values("samples", "sample_id", version).to_pylist())
        self.claims: dict[str, str] = {}

    def claim(self, ids: list[str], keys: list[str]) -> list[str]:
        """For each (id, key): the key that owns the id, or ``STORED``."""
        winners = []
        for sid, key in zip(ids, keys, strict=True):
            if sid in self.stored:
                winners.append(STORED)
            else:
                winners.append(self.claims.setdefault(sid, key))
        return winners


def mark_duplicates(batch: pa.Table, *, registry: ray.actor.ActorHandle) -> pa.Table:
    """Add ``status``: ``new``, ``stored`` (already committed) or ``error``.

    A second input with the same content becomes a ``DuplicateSample`` error
    naming the input that kept the id, so it is accounted for in quarantine.
    """
    ok = pc.is_null(batch.column("error_type")).to_pylist()
    ids = batch.column("sample_id").to_pylist()
    keys = batch.column("source_uri").to_pylist()
    idx = [i for i, good in enumerate(ok) if good]
    winners = ray.get(registry.claim.remote([ids[i] for i in idx], [keys[i] for i in idx]))
    status = ["error"] * batch.num_rows
    stage = batch.column("error_stage").to_pylist()
    etype = batch.column("error_type").to_pylist()
    message = batch.column("error_message").to_pylist()
    for i, winner in zip(idx, winners, strict=True):
        if winner == STORED:
            status[i] = "stored"
        elif winner == keys[i]:
            status[i] = "new"
        else:
            stage[i], etype[i] = "dedup", "DuplicateSample"
            message[i] = f"same content as {winner} (sample_id {ids[i]})"
    for name, values in (("error_stage", stage), ("error_type", etype), ("error_message", message)):
        batch = batch.set_column(
            batch.schema.get_field_index(name), name, pa.array(values, pa.string())
        )
    return batch.append_column("status", pa.array(status, pa.string()))
