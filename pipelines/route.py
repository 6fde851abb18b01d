"""Routers: which store table each row of a stage's output goes to.

Every stage emits good rows and error rows (``error_type`` set) in one stream;
a router splits a batch into ``{table: rows}`` for ``features.sink.StoreSink``
and counts what goes nowhere. Error rows become quarantine rows keyed by
(input, stage, error type), so a rerun over the same bad input adds nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.identity import short_hash

ERROR_COLUMNS = ["error_stage", "error_type", "error_message"]
INPUT_COLUMNS = ["input_container", "input_fingerprint"]


class Router:
    """Good rows -> ``table``; error rows -> ``quarantine`` unless already quarantined.

    ``input_uri(row)`` names the input an error row came from (a file, a view).
    Subclasses decide which good rows are new (``select_new``).
    """

    def __init__(
        self,
        table: str,
        run_id: str,
        known_quarantine_ids: frozenset[str],
        input_uri: Callable[[dict], str],
    ) -> None:
        self.table = table
        self.run_id = run_id
        self.known = known_quarantine_ids
        self.input_uri = input_uri

    def select_new(self, good: pa.Table, counts: Counter[str]) -> pa.Table:
        return good

    def extra_tables(self, batch: pa.Table, now: datetime) -> dict[str, pa.Table]:
        return {}

    def __call__(self, batch: pa.Table) -> tuple[dict[str, pa.Table], dict[str, int]]:
        now = datetime.now(UTC)
        counts: Counter[str] = Counter()
        is_error = pc.is_valid(batch.column("error_type"))
        good = self.select_new(batch.filter(pc.invert(is_error)), counts)
        extra = [*ERROR_COLUMNS, *INPUT_COLUMNS, "status"]
        good = good.drop_columns([c for c in extra if c in good.column_names])
        good = _stamp(good, now, self.run_id)
        counts[self.table] += good.num_rows
        quarantine = []
        for row in batch.filter(is_error).to_pylist():
            uri = self.input_uri(row)
            qid = short_hash(uri, row["error_stage"], row["error_type"])
            if qid in self.known:
                counts["already_quarantined"] += 1
                continue
            counts["duplicates" if row["error_type"] == "DuplicateSample" else "quarantined"] += 1
            quarantine.append(
                {
                    "quarantine_id": qid,
                    "source": row.get("source"),
                    "uri": uri,
                    "stage": row["error_stage"],
                    "error_type": row["error_type"],
                    "message": row["error_message"],
                    "run_id": self.run_id,
                    "quarantined_at": now,
                }
            )
        routed = {self.table: good, **self.extra_tables(batch, now)}
        if quarantine:
            routed["quarantine"] = pa.Table.from_pylist(quarantine)
        return routed, dict(counts)


class SampleRouter(Router):
    """Collect output: only ``status == "new"`` rows are written; ``stored`` ones are counted."""

    def __init__(self, run_id: str, known_quarantine_ids: frozenset[str]) -> None:
        super().__init__("samples", run_id, known_quarantine_ids, lambda r: r["source_uri"])

    def select_new(self, good: pa.Table, counts: Counter[str]) -> pa.Table:
        status = good.column("status")
        counts["already_stored"] += pc.sum(pc.equal(status, "stored")).as_py() or 0
        return good.filter(pc.equal(status, "new"))

    def extra_tables(self, batch: pa.Table, now: datetime) -> dict[str, pa.Table]:
        """One ``_inputs`` ledger row per input: its fingerprint and what became of it."""
        outcome = pc.if_else(
            pc.equal(batch.column("status"), "new"),
            "sample",
            pc.if_else(
                pc.equal(batch.column("status"), "stored"),
                "stored",
                pc.if_else(
                    pc.equal(batch.column("error_type"), "DuplicateSample"),
                    "duplicate",
                    batch.column("error_type"),
                ),
            ),
        )
        ledger = pa.table(
            {
                "input_key": batch.column("source_uri"),
                "source": batch.column("source"),
                "container": batch.column("input_container"),
                "fingerprint": batch.column("input_fingerprint"),
                "outcome": outcome,
                "sample_id": batch.column("sample_id"),
                "run_id": pa.repeat(pa.scalar(self.run_id), batch.num_rows),
                "seen_at": pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), batch.num_rows),
            }
        )
        return {"_inputs": ledger}


class ViewRouter(Router):
    def __init__(self, run_id: str, known_quarantine_ids: frozenset[str]) -> None:
        super().__init__(
            "views", run_id, known_quarantine_ids, lambda r: f"{r['sample_id']}#view={r['view']}"
        )


def _stamp(rows: pa.Table, now: datetime, run_id: str) -> pa.Table:
    """Fill the write-time columns a table has: ingest/creation time and run id."""
    stamp = pa.scalar(now, pa.timestamp("us", tz="UTC"))
    for name, value in (
        ("ingested_at", stamp),
        ("created_at", stamp),
        ("run_id", pa.scalar(run_id)),
    ):
        if name in rows.column_names:
            index = rows.schema.get_field_index(name)
            rows = rows.set_column(index, name, pa.repeat(value, rows.num_rows))
    return rows
