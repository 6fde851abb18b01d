"""Routers: which store table each row of a stage's output goes to.

Every stage emits good rows and error rows (``pipelines.quarantine``) in one
stream; a router splits a batch into ``{table: rows}`` for
``features.sink.StoreSink`` and counts what goes nowhere. Error rows become
quarantine rows (``quarantine_rows``), except those the store already holds.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from features.keys import key_mask, rows_where
from pipelines.collect import INPUT_COLUMNS, STAT_COLUMNS
from pipelines.filters import is_filtered
from pipelines.ledger import news_mask
from pipelines.quality import STATS
from pipelines.quarantine import ERROR_COLUMNS, is_error, quarantine_rows

STAMP = pa.timestamp("us", tz="UTC")


class Router:
    """Good rows -> ``table``; error rows -> ``quarantine`` unless already quarantined.

    Subclasses name the input an error row came from (``input_uris``) and may
    decide which good rows are new (``select_new``) or add tables (``extra_tables``).
    """

    table: str

    def __init__(self, run_id: str, known_quarantine: pa.Table) -> None:
        self.run_id = run_id
        self.known = known_quarantine  # quarantine_id of every row the store holds

    def input_uris(self, errors: pa.Table) -> list[str]:
        raise NotImplementedError

    def select_new(self, good: pa.Table, counts: Counter[str]) -> pa.Table:
        return good

    def extra_tables(self, batch: pa.Table, now: datetime) -> dict[str, pa.Table]:
        return {}

    def __call__(self, batch: pa.Table) -> tuple[dict[str, pa.Table], dict[str, int]]:
        if batch.num_rows == 0:  # Ray Data may hand over an empty block with no columns
            return {}, {}
        now = datetime.now(UTC)
        counts: Counter[str] = Counter()
        failed = is_error(batch)
        good = self.select_new(rows_where(batch, pc.invert(failed)), counts)
        extra = {*ERROR_COLUMNS, *INPUT_COLUMNS, *STAT_COLUMNS, "status"}
        # (column_names builds a new list per call: ask once)
        good = _stamp(
            good.drop_columns([c for c in good.column_names if c in extra]), now, self.run_id
        )
        counts[self.table] += good.num_rows
        errors = rows_where(batch, failed)
        quarantine = quarantine_rows(errors, self.input_uris(errors), run_id=self.run_id, now=now)
        known = key_mask(quarantine, self.known, ["quarantine_id"])
        counts["already_quarantined"] += int(known.sum())
        quarantine = rows_where(quarantine, ~known)
        kinds = quarantine.column("error_type")
        duplicates = pc.sum(pc.equal(kinds, "DuplicateSample")).as_py() or 0
        filtered = pc.sum(is_filtered(kinds)).as_py() or 0
        counts["duplicates"] += duplicates
        counts["filtered"] += filtered
        counts["quarantined"] += quarantine.num_rows - duplicates - filtered
        routed = {self.table: good, **self.extra_tables(batch, now)}
        if quarantine.num_rows:
            routed["quarantine"] = quarantine
        return routed, dict(counts)


class SampleRouter(Router):
    """Collect output: only ``status == "new"`` rows are written; ``stored`` ones are counted,
    and each input gets an ``_inputs`` ledger row when it tells something new. With
    ``quality``, new and filtered samples get a ``quality`` row (a filtered one only when
    its ledger row is new: a rebuild re-reads it and must not repeat its stats)."""

    table = "samples"

    def __init__(self, run_id: str, known_quarantine: pa.Table, *, quality: bool = False) -> None:
        super().__init__(run_id, known_quarantine)
        self.quality = quality

    def input_uris(self, errors: pa.Table) -> list[str]:
        return errors.column("source_uri").to_pylist()

    def select_new(self, good: pa.Table, counts: Counter[str]) -> pa.Table:
        status = good.column("status")
        counts["already_stored"] += pc.sum(pc.equal(status, "stored")).as_py() or 0
        return rows_where(good, pc.equal(status, "new"))

    def extra_tables(self, batch: pa.Table, now: datetime) -> dict[str, pa.Table]:
        status = batch.column("status")
        outcome = pc.case_when(
            pc.make_struct(
                pc.equal(status, "new"),
                pc.equal(status, "stored"),
                pc.equal(batch.column("error_type"), "DuplicateSample"),
            ),
            "sample",
            "stored",
            "duplicate",
            batch.column("error_type"),
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
                "seen_at": pa.repeat(pa.scalar(now, STAMP), batch.num_rows),
                "prev_fingerprint": batch.column("input_prev_fingerprint"),
                "prev_outcome": batch.column("input_prev_outcome"),
            }
        )
        # a rebuild sees every input again: only rows that tell something new are written
        news = news_mask(ledger)
        tables = {
            "_inputs": rows_where(ledger, news).drop_columns(["prev_fingerprint", "prev_outcome"])
        }
        if self.quality:
            measured = pc.or_(
                pc.equal(status, "new"), pc.and_(pc.equal(status, "filtered"), news)
            ).fill_null(False)
            rows = rows_where(batch, measured).select(["sample_id", "split", "source_uri", *STATS])
            tables["quality"] = rows.append_column(
                "computed_at", pa.repeat(pa.scalar(now, STAMP), rows.num_rows)
            ).append_column("run_id", pa.repeat(pa.scalar(self.run_id), rows.num_rows))
        return tables


class ViewRouter(Router):
    """Augment output: views to ``views``; views that could not be made to quarantine."""

    table = "views"

    def input_uris(self, errors: pa.Table) -> list[str]:
        return view_uris(errors)


def _stamp(rows: pa.Table, now: datetime, run_id: str) -> pa.Table:
    """Fill the write-time columns a table has: ingest/creation time and run id."""
    for name, value in (
        ("ingested_at", pa.scalar(now, STAMP)),
        ("created_at", pa.scalar(now, STAMP)),
        ("run_id", pa.scalar(run_id)),
    ):
        if name in rows.column_names:
            index = rows.schema.get_field_index(name)
            rows = rows.set_column(index, name, pa.repeat(value, rows.num_rows))
    return rows


class FeatureRouter(Router):
    """Encode output: feature rows to the feature set; rows an encoder failed on to quarantine."""

    def __init__(self, table: str, run_id: str, known_quarantine: pa.Table) -> None:
        super().__init__(run_id, known_quarantine)
        self.table = table

    def input_uris(self, errors: pa.Table) -> list[str]:
        return view_uris(errors)


def view_uris(errors: pa.Table) -> list[str]:
    """``<sample_id>#view=<view>``: how a quarantine row names one view of one sample."""
    ids, views = errors.column("sample_id").to_pylist(), errors.column("view").to_pylist()
    return [f"{sid}#view={view}" for sid, view in zip(ids, views, strict=True)]
