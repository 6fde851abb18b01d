"""Counts a run report shows: samples per split and modality, quarantine reasons, table sizes."""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa

from features.duck import connect
from features.tables import TableStore, Version


def _over(store: TableStore, name: str, version: Version = None) -> duckdb.DuckDBPyConnection:
    """A connection with ``name`` (at ``version``) registered as ``t``."""
    return connect({"t": store.dataset(name, version)})


def split_modality_counts(store: TableStore, version: Version = None) -> pa.Table:
    """Samples per split and modality (a sample with image and text counts under both)."""
    con = _over(store, "samples", version)
    return con.sql(
        "SELECT split, m AS modality, count(*) AS samples "
        "FROM (SELECT split, unnest(modalities) AS m FROM t) GROUP BY ALL ORDER BY ALL"
    ).to_arrow_table()


def split_counts(store: TableStore, version: Version = None) -> dict[str, int]:
    con = _over(store, "samples", version)
    rows = con.sql("SELECT split, count(*) FROM t GROUP BY split ORDER BY split").fetchall()
    return {split: n for split, n in rows}


def quarantine_reasons(store: TableStore, *, run_id: str | None = None) -> pa.Table:
    """Quarantined inputs (of one run, or all), most common reasons first."""
    if not store.exists("quarantine"):
        return pa.table({"error_type": [], "uri": [], "message": []})
    con = _over(store, "quarantine")
    where = "WHERE run_id = $run" if run_id else ""
    return con.sql(
        f"SELECT error_type, stage, uri, message FROM t {where} "
        "ORDER BY count(*) OVER (PARTITION BY error_type) DESC, error_type, uri",
        params={"run": run_id} if run_id else None,
    ).to_arrow_table()


def table_summary(store: TableStore, name: str) -> dict[str, Any]:
    """Rows, files, bytes and latest version of one table, from the Delta log alone."""
    dt = store.delta(name)
    actions = pa.table(dt.get_add_actions(flatten=True))
    return {
        "table": name,
        "version": dt.version(),
        "rows": int(pa.compute.sum(actions.column("num_records")).as_py() or 0),
        "files": actions.num_rows,
        "bytes": int(pa.compute.sum(actions.column("size_bytes")).as_py() or 0),
    }
