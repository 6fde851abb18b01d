"""A table at a glance: counts, media size histograms, quarantine reasons, embedding maps.

``stats`` returns plain JSON-ready numbers (DuckDB over the Delta table, only
the small columns read); ``plot_stats`` and ``embedding_map`` draw them with
matplotlib's Agg backend, imported inside the functions so ``import features``
stays fast and works without a display.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.crossmodal import similarities
from features.duck import connect
from features.duplicates import summary as duplicates_summary
from features.errors import StoreError
from features.schema import FEATURES_PREFIX, QUALITY_STATS
from features.tables import TableStore, Version
from features.vectors import chunks, embedding_column

COUNTED = ("split", "label", "source", "label_source", "error_type", "stage")
HISTOGRAMS = ("image_width", "image_height", "audio_duration")
# the latest stats row of each sample (rows of one sample agree; see ``features.schema.QUALITY``)
LATEST_STATS = "row_number() OVER (PARTITION BY sample_id ORDER BY computed_at DESC) = 1"
TOP_LABELS = 10


def stats(store: TableStore, table: str = "samples", version: Version = None) -> dict[str, Any]:
    """Rows per split / label / modality / source, media histograms, quarantine reasons.

    Only the columns the table has are counted; quarantine reasons come from the
    latest ``quarantine`` table (its versions are not those of ``table``).
    """
    dt = store.delta(table, version)
    names = {f.name for f in dt.schema().fields}
    if table == "quality":  # a sample may have two identical stats rows: count it once
        con = connect({"raw": store.dataset_of(table, dt)})
        con.execute(f"CREATE VIEW t AS SELECT * FROM raw QUALIFY {LATEST_STATS}")
    else:
        con = connect({"t": store.dataset_of(table, dt)})
    out: dict[str, Any] = {"table": table, "version": dt.version()}
    out["rows"] = con.sql("SELECT count(*) FROM t").fetchall()[0][0]
    for column in COUNTED:
        if column in names:
            out[f"by_{column}"] = _counts(con, f'SELECT "{column}" AS k FROM t')
    if "modalities" in names:
        out["by_modality"] = _counts(con, "SELECT unnest(modalities) AS k FROM t")
    for column in HISTOGRAMS if table != "quality" else ():
        if column in names:
            values = con.sql(f'SELECT "{column}" FROM t WHERE "{column}" IS NOT NULL').fetchnumpy()
            out[column] = _histogram(values[column])
    if table == "quality":
        out["by_text_lang"] = _counts(
            con, "SELECT text_lang AS k FROM t WHERE text_lang IS NOT NULL"
        )
        out["stats"] = quality_summary(con, [n for n in QUALITY_STATS.names if n in names])
    if table.startswith(FEATURES_PREFIX):
        out |= cross_modal_summary(store, table.removeprefix(FEATURES_PREFIX), dt.version())
    if table == "samples" and (marked := duplicates_summary(store)) is not None:
        out["near_duplicates"] = marked
    if table != "quarantine" and store.exists("quarantine"):
        con.register("q", store.dataset("quarantine"))
        out["quarantine"] = _counts(con, "SELECT error_type AS k FROM q")
    return out


def cross_modal_summary(
    store: TableStore, feature_set: str, version: int, lowest: int = 5
) -> dict[str, Any]:
    """A feature set's cross-modal similarities (``features.crossmodal``) as ``stats``, plus
    the ``lowest`` samples of each: the captions that agree least with their media."""
    try:
        sims = similarities(store, feature_set, version)
    except StoreError:  # a features/ table another tool wrote: no description, no pairs
        return {}
    names = [c for c in sims.column_names if c.endswith("_similarity")]
    if not names:
        return {}
    least = {}
    for name in names:
        present = sims.filter(pc.is_valid(sims.column(name)))
        worst = present.sort_by(name).slice(0, lowest)
        least[name] = worst.select(["sample_id", "split", name]).to_pylist()
    return {"stats": quality_summary(connect({"t": sims}), names), "least_agreeing": least}


def quality_summary(con: duckdb.DuckDBPyConnection, columns: list[str]) -> dict[str, Any]:
    """Per numeric stat and split: count, mean, 5th/50th/95th percentile and a histogram with
    edges shared across splits (so the splits' bars line up), over every measured sample,
    kept or filtered: where a threshold would cut is what the numbers are for."""
    out: dict[str, Any] = {}
    for column in columns:
        if column in QUALITY_STATS.names and pa.types.is_string(QUALITY_STATS.field(column).type):
            continue
        rows = con.sql(
            f"SELECT coalesce(split, '(none)') AS split, \"{column}\" AS v FROM t "
            f'WHERE "{column}" IS NOT NULL AND isfinite("{column}")'
        ).fetchnumpy()
        values = np.asarray(rows["v"], dtype=np.float64)
        if values.size == 0:
            continue
        edges = np.histogram_bin_edges(values, bins=20)
        splits = np.asarray(rows["split"], dtype=object)
        per_split = {}
        for split in sorted(set(splits.tolist())):
            part = values[splits == split]
            p5, p50, p95 = np.percentile(part, [5, 50, 95])
            per_split[split] = {
                "n": int(part.size),
                "mean": float(part.mean()),
                "p5": float(p5),
                "p50": float(p50),
                "p95": float(p95),
                "counts": [int(c) for c in np.histogram(part, bins=edges)[0]],
            }
        out[column] = {"edges": [float(e) for e in edges], "splits": per_split}
    return out


def _counts(con: duckdb.DuckDBPyConnection, sql: str) -> dict[str, int]:
    rows = con.sql(f"SELECT k, count(*) AS n FROM ({sql}) GROUP BY k ORDER BY n DESC, k").fetchall()
    return {("(none)" if k is None else str(k)): int(n) for k, n in rows}


def _histogram(values: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def plot_stats(summary: dict[str, Any], out_png: str | Path) -> Path:
    """One PNG with a panel per count and histogram that ``stats`` returned."""
    plt = _pyplot()
    bars = [k for k in summary if k.startswith("by_") or k == "quarantine"]
    hists = [k for k in HISTOGRAMS if summary.get(k, {}).get("counts")]
    measured = list(summary.get("stats", {}))
    panels = [k for k in bars if summary[k]] + hists + measured
    cols = 4 if measured else 3
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, panels, strict=False):
        if key in measured:
            h = summary["stats"][key]
            edges = np.asarray(h["edges"])
            for split, part in h["splits"].items():
                ax.stairs(part["counts"], edges, label=f"{split} ({part['n']})")
            ax.set_xlabel(key.replace("_", " "))
            ax.legend(fontsize=6)
        elif key in hists:
            h = summary[key]
            edges = np.asarray(h["edges"])
            ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="#4c72b0")
            ax.set_xlabel(key.replace("_", " ") + (" (s)" if "duration" in key else " (px)"))
        else:
            items = list(summary[key].items())[:20]
            ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#55a868")
            ax.tick_params(axis="y", labelsize=7)
        title = "quarantine reasons" if key == "quarantine" else key.replace("_", " ")
        ax.set_title(title, fontsize=9)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{summary['table']} v{summary['version']}: {summary['rows']} rows", fontsize=11)
    return _save(fig, plt, out_png)


def embedding_map(
    store: TableStore,
    feature_set: str,
    column: str | None = None,
    out_png: str | Path = "embedding-map.png",
    *,
    version: Version = None,
    max_points: int = 5000,
    seed: int = 0,
) -> Path:
    """A 2-D PCA (numpy SVD) of up to ``max_points`` embeddings, coloured by label.

    Rows are sampled uniformly while the column streams by, so memory stays at
    one chunk plus the sample whatever the table's size.
    """
    plt = _pyplot()
    dt, col = embedding_column(store, feature_set, column, version)
    total = max(1, store.dataset_of(col.table, dt).count_rows())
    rate = min(1.0, max_points / total)
    rng = np.random.default_rng(seed)
    picked, labels = [], []
    for keys, matrix in chunks(store, dt, col, None, 65_536):
        take = np.flatnonzero(rng.random(len(matrix)) < rate)
        picked.append(matrix[take])
        labels += keys.column("label").take(take).to_pylist()
    points = np.concatenate(picked) if picked else np.empty((0, col.dim), np.float32)
    fig, ax = plt.subplots(figsize=(7, 6))
    if len(points) >= 2:
        centred = points - points.mean(axis=0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        explained = (s[:2] ** 2 / max(float((s**2).sum()), 1e-12)).round(3)
        common = [k for k, _ in Counter(labels).most_common(TOP_LABELS)]
        names = ["(none)" if v is None else (v if v in common else "(other)") for v in labels]
        for name in sorted(set(names)):
            mask = np.array([n == name for n in names])
            ax.scatter(xy[mask, 0], xy[mask, 1], s=8, alpha=0.7, label=name)
        ax.legend(fontsize=7, markerscale=2, loc="best")
        ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
        ax.set_ylabel(f"PC2 ({explained[1]:.0%})" if len(explained) > 1 else "PC2")
    ax.set_title(f"{col.table}.{col.column} v{col.version}: {len(points)} of {total} rows, PCA")
    return _save(fig, plt, out_png)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, plt: Any, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
