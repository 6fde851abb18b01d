"""Pages of a store for a browser: samples, their augmented views, quarantined inputs,
counts per split and label, and a 2-D map of an embedding matrix.

Every page reads the metadata columns only (media bytes come one row at a time through
``media``), takes its filters as bound parameters, and is ordered, so paging is stable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.duck import connect
from features.schema import ORIGINAL_VIEW
from features.stats import stats
from features.tables import TableStore, string_field

SAMPLE_COLUMNS = (
    "sample_id, split, label, labels, text, modalities, source, source_uri, image_format, "
    "image_width, image_height, audio_format, audio_duration, audio_sample_rate"
)
VIEW_COLUMNS = "sample_id, view, split, modalities, text, image_width, image_height, " \
    "audio_duration, transforms, label"  # fmt: skip
MEDIA_FORMAT = {"image": "image_format", "audio": "audio_format"}
VIEW_FORMAT = {"image": "png", "audio": "wav"}  # how views store their media (schema.VIEWS)


def _page(
    store: TableStore, table: str, columns: str, where: dict[str, Any], order: str,
    offset: int, limit: int,
) -> dict[str, Any]:  # fmt: skip
    """Rows ``offset .. offset+limit`` of ``table`` where each given column equals its
    value, and how many rows match in all."""
    if not store.exists(table):
        return {"total": 0, "rows": []}
    given = {k: v for k, v in where.items() if v is not None}
    cond = " AND ".join(f"{k} = ${k}" for k in given) or "true"
    con = connect({"t": store.dataset(table)})
    (total,) = con.sql(f"SELECT count(*) FROM t WHERE {cond}", params=given).fetchall()[0]
    rows = con.sql(
        f"SELECT {columns} FROM t WHERE {cond} ORDER BY {order} LIMIT {int(limit)} "
        f"OFFSET {int(offset)}",
        params=given,
    ).to_arrow_table()
    return {"total": int(total), "rows": rows.to_pylist()}


def samples_page(
    store: TableStore, *, split: str | None = None, label: str | None = None,
    offset: int = 0, limit: int = 48,
) -> dict[str, Any]:  # fmt: skip
    """Samples (no media bytes) of one split and/or label, by sample id."""
    where = {"split": split, "label": label}
    return _page(store, "samples", SAMPLE_COLUMNS, where, "sample_id", offset, limit)


def views_of(store: TableStore, sample_id: str) -> list[dict[str, Any]]:
    """The augmented views of one sample (no media bytes), by view number."""
    return _page(store, "views", VIEW_COLUMNS, {"sample_id": sample_id}, "view", 0, 10_000)["rows"]


def quarantine_page(
    store: TableStore, *, error_type: str | None = None, offset: int = 0, limit: int = 100
) -> dict[str, Any]:
    """Quarantined inputs (of one error type, or all), newest first."""
    columns = "quarantine_id, source, uri, stage, error_type, message, run_id, quarantined_at"
    where = {"error_type": error_type}
    order = "quarantined_at DESC, quarantine_id"
    return _page(store, "quarantine", columns, where, order, offset, limit)


def counts(store: TableStore) -> dict[str, Any]:
    """Samples per split and label, and quarantined inputs per error type."""
    out: dict[str, Any] = {"labels": [], "quarantine": []}
    if store.exists("samples"):
        con = connect({"t": store.dataset("samples")})
        out["labels"] = con.sql(
            "SELECT split, label, count(*) AS samples FROM t GROUP BY ALL ORDER BY ALL"
        ).to_arrow_table().to_pylist()  # fmt: skip
    if store.exists("quarantine"):
        con = connect({"t": store.dataset("quarantine")})
        out["quarantine"] = con.sql(
            "SELECT error_type, count(*) AS inputs FROM t GROUP BY ALL ORDER BY 2 DESC, 1"
        ).to_arrow_table().to_pylist()  # fmt: skip
    return out


def quality(store: TableStore) -> dict[str, Any]:
    """Each numeric stat's percentiles and histogram per split (``features.stats``) and the
    languages found; empty when the store has no ``quality`` table."""
    if not store.exists("quality"):
        return {"stats": {}, "version": None}
    summary = stats(store, "quality")
    return {"stats": summary["stats"], "version": summary["version"],
            "languages": summary["by_text_lang"]}  # fmt: skip


def media(
    store: TableStore, sample_id: str, modality: str, view: int | None = None
) -> tuple[bytes, str] | None:
    """The stored bytes of one sample's (or one of its views') image or audio, and their
    format; None when the row or that modality is absent."""
    if view is None:
        table, columns = "samples", [modality, MEDIA_FORMAT[modality]]
        match = string_field("sample_id") == sample_id
    else:
        table, columns = "views", [modality]
        match = (string_field("sample_id") == sample_id) & (pc.field("view") == view)
    if not store.exists(table):
        return None
    rows = store.to_arrow(table, columns=columns, filter=match).slice(0, 1).to_pylist()
    if not rows or rows[0][modality] is None:
        return None
    kind = VIEW_FORMAT[modality] if view is not None else rows[0][MEDIA_FORMAT[modality]]
    return rows[0][modality], str(kind or "")


def projection(matrix: np.ndarray, keys: pa.Table, limit: int = 2000) -> dict[str, Any]:
    """A 2-D map of up to ``limit`` original rows (evenly spaced, so one version always
    gives the same map): their coordinates on the first two principal components, with
    their keys."""
    originals = np.flatnonzero(pc.equal(keys.column("view"), ORIGINAL_VIEW).to_numpy(False))
    picks = np.linspace(0, len(originals) - 1, min(limit, len(originals)))
    rows = originals[np.unique(picks.astype(np.int64))]
    x = matrix[rows].astype(np.float64)
    xy = np.zeros((len(rows), 2))
    if len(rows) > 1:
        x -= x.mean(axis=0)
        axes = np.linalg.svd(x, full_matrices=False)[2][:2]  # the principal axes
        xy[:, : len(axes)] = x @ axes.T
    picked = keys.take(pa.array(rows, pa.int64()))
    return {
        "rows": len(originals),
        "points": np.round(xy, 5).tolist(),
        **{c: picked.column(c).to_pylist() for c in ("sample_id", "split", "label")
           if c in picked.column_names},
    }  # fmt: skip
