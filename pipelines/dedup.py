"""Exact-duplicate removal within a run and against what the store already holds.

One small actor owns the ids: the ids committed before the run (read by the
actor itself, not the driver, and compared per batch with an Arrow hash join)
and, for this run, which input claimed each new id first. A claim is
idempotent per input key, so a retried task gets the same answer and never
turns its own rows into duplicates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from features.keys import key_mask
from features.tables import TableStore
from pipelines.errors import DuplicateSample
from pipelines.quarantine import is_error, with_errors

if TYPE_CHECKING:
    from ray.actor import ActorHandle

STORED = ""  # winner marker for ids committed before this run


class Ids:
    """The registry's state and answers; ``id_registry`` makes the same as a Ray actor."""

    def __init__(self, store: TableStore, version: int | None) -> None:
        # None: no samples table yet
        ids = store.column_values("samples", "sample_id", version) if version is not None else []
        self.stored = pa.table({"sample_id": pa.array(ids, pa.string())})
        self.claims: dict[str, str] = {}  # this run's new ids -> the input that claimed it
        self.seen: list[pa.Array] = []  # every id an input of this run produced

    def claim(self, ids: pa.Array, keys: list[str]) -> list[str]:
        """For each (id, key): the key that owns the id, or ``STORED``."""
        self.seen.append(ids)
        stored = key_mask(pa.table({"sample_id": ids}), self.stored, ["sample_id"])
        return [
            STORED if was_stored else self.claims.setdefault(sid, key)
            for sid, key, was_stored in zip(ids.to_pylist(), keys, stored, strict=True)
        ]

    def produced(self, ids: pa.Array) -> pa.Array:
        """The ``ids`` some input of this run produced (a renamed file still produces its id)."""
        candidates = pa.table({"sample_id": ids})
        seen = pa.table({"sample_id": pa.chunked_array(self.seen, pa.string())})
        return candidates.filter(pa.array(key_mask(candidates, seen, ["sample_id"]))).column(0)


def id_registry(store: TableStore, version: int | None) -> ActorHandle:
    """``Ids`` as a Ray actor that every task of the run asks (it holds no CPU)."""
    import ray

    return ray.remote(num_cpus=0)(Ids).remote(store, version)


def mark_duplicates(batch: pa.Table, *, registry: ActorHandle | Ids) -> pa.Table:
    """Add ``status``: ``new``, ``stored`` (already committed) or ``error``.

    A second input with the same content becomes a ``DuplicateSample`` error
    naming the input that kept the id, so it is accounted for in quarantine.
    """
    ok = pc.invert(is_error(batch))
    good = batch.select(["source_uri", "sample_id"]).filter(ok)  # not the media columns
    idx = pc.indices_nonzero(ok).to_pylist()
    keys = good.column("source_uri").to_pylist()
    ids = good.column("sample_id").combine_chunks()
    if isinstance(registry, Ids):  # a run small enough to stay in the CLI process
        winners = registry.claim(ids, keys)
    else:
        import ray  # a Ray task: Ray is imported already

        winners = ray.get(registry.claim.remote(ids, keys))
    status = ["error"] * batch.num_rows
    duplicates = {}
    for i, key, sid, winner in zip(idx, keys, ids.to_pylist(), winners, strict=True):
        if winner == STORED:
            status[i] = "stored"
        elif winner == key:
            status[i] = "new"
        else:
            duplicates[i] = DuplicateSample(f"same content as {winner} (sample_id {sid})")
    batch = with_errors(batch, duplicates)
    return batch.append_column("status", pa.array(status, pa.string()))
