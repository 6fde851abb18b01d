"""Cosine top-k over a feature set's embedding column: exact (streamed) or approximate (faiss).

Exact search reads the column in record batches (``chunk_rows`` at a time),
multiplies each chunk with the normalised query and keeps a running top-k, so
memory is bounded by one chunk whatever the table's size. ``cache=True`` keeps
the decoded matrix of a (table, version, column) in the process instead, for
notebooks and services that ask many questions of one version (versions are
immutable, so the cache never goes stale).

``method="ann"`` asks the approximate index of exactly that version instead: a
faiss IVF-Flat index that ``features.catalog.build_index`` builds, tunes to a
recall@10 target against this module's exact search, and stores under
``<store>/_indexes/<name>/v<version>/``.

Queries are vectors. ``sample_id=`` uses a stored row's own embedding (and
leaves that sample out of the results); text, image or audio queries are
embedded by the encode stage's ``embed_query`` hook and passed as ``vector=``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from features.errors import StoreError
from features.schema import FEATURE_KEY_FIELDS, FEATURE_SET_KEY, FEATURES_PREFIX, ORIGINAL_VIEW
from features.sql import dataset
from features.store import FeatureStore, Version

# the feature set's key columns travel with every row (a `where` may use any of them);
# results show the first four
KEY_SCHEMA = pa.schema(FEATURE_KEY_FIELDS)
KEYS = KEY_SCHEMA.names
SHOWN = ["sample_id", "view", "split", "label"]
# samples columns a `where` may use besides the feature set's own (media bytes left out)
SAMPLE_COLUMNS = ["source", "source_uri", "group_id", "text", "image_width", "image_height"]
SAMPLE_COLUMNS += ["audio_duration", "label_source", "metadata", "ingested_at"]
RESULT_SAMPLE_COLUMNS = ["source", "source_uri", "text", "metadata"]
CHUNK_ROWS = 65_536
_CACHE: dict[tuple[str, int, str], tuple[pa.Table, np.ndarray]] = {}


@dataclass(frozen=True)
class EmbeddingColumn:
    """One embedding column of one feature-set version, as its table metadata describes it."""

    table: str  # features/<name>
    column: str
    dim: int
    version: int
    encoder: str | None = None
    normalized: bool = True

    @property
    def name(self) -> str:
        return self.table[len(FEATURES_PREFIX) :]


def embedding_column(
    store: FeatureStore, feature_set: str, column: str | None = None, version: Version = None
) -> tuple[DeltaTable, EmbeddingColumn]:
    """The Delta table of ``feature_set`` at ``version`` and the embedding column to search."""
    table = FEATURES_PREFIX + feature_set.removeprefix(FEATURES_PREFIX)
    dt = store.delta(table, version)
    meta = json.loads(dt.metadata().configuration.get(FEATURE_SET_KEY) or "{}")
    columns = {
        name: spec
        for name, spec in meta.get("columns", {}).items()
        if spec.get("kind", "embedding") == "embedding"
    }
    if not columns:
        raise StoreError(f"{table} has no embedding columns in its {FEATURE_SET_KEY} metadata")
    if column is None and len(columns) > 1:
        raise StoreError(f"{table} has several embedding columns; pick one of {sorted(columns)}")
    column = column or next(iter(columns))
    if column not in columns:
        raise StoreError(f"{table} has no embedding column {column!r}; have {sorted(columns)}")
    spec = columns[column]
    return dt, EmbeddingColumn(
        table=table,
        column=column,
        dim=int(np.prod(spec["shape"])),
        version=dt.version(),
        encoder=spec.get("encoder"),
        normalized=bool(spec.get("normalized", False)),
    )


def query_vector(
    store: FeatureStore,
    dt: DeltaTable,
    col: EmbeddingColumn,
    *,
    vector: Any = None,
    sample_id: str | None = None,
    view: int = ORIGINAL_VIEW,
) -> np.ndarray:
    """The L2-normalised float32 query: ``vector`` as given, or the stored row of ``sample_id``."""
    if (vector is None) == (sample_id is None):
        raise StoreError("give exactly one query: a vector or a sample_id")
    if sample_id is not None:
        where = (pc.field("sample_id") == sample_id) & (pc.field("view") == view)
        rows = dataset(store, col.table, dt).to_table(columns=[col.column], filter=where)
        if rows.num_rows == 0:
            raise StoreError(f"no row sample_id={sample_id!r} view={view} in {col.table}")
        vector = rows.column(0)[0].as_py()
        if vector is None:
            raise StoreError(f"sample {sample_id!r} has no {col.column} in {col.table}")
    q = np.asarray(vector, dtype=np.float32).ravel()
    if q.size != col.dim:
        raise StoreError(
            f"query vector has {q.size} dims but {col.table}.{col.column} has {col.dim} "
            f"(encoder {col.encoder}); embed the query with the same encoder"
        )
    norm = float(np.linalg.norm(q))
    if not np.isfinite(norm) or norm == 0:
        raise StoreError("query vector is zero or not finite")
    return q / norm


def search(
    store: FeatureStore,
    feature_set: str,
    *,
    column: str | None = None,
    vector: Any = None,
    sample_id: str | None = None,
    k: int = 10,
    where: str | None = None,
    version: Version = None,
    method: Literal["exact", "ann"] = "exact",
    cache: bool = False,
    chunk_rows: int = CHUNK_ROWS,
) -> pa.Table:
    """Top-``k`` rows by cosine similarity to the query, best first.

    ``where`` is a DuckDB SQL condition over the feature set's key columns
    (split, label, labels, modalities, view) and the sample's (``source``,
    ``text``, ``metadata``, ... from ``samples``). Returns sample_id, view,
    score, split, label and the sample's source, uri, text and metadata.
    """
    if k < 1:
        raise StoreError(f"k must be at least 1, got {k}")
    dt, col = embedding_column(store, feature_set, column, version)
    q = query_vector(store, dt, col, vector=vector, sample_id=sample_id)
    exclude = [sample_id] if sample_id else []
    if method == "ann":
        from features.catalog import load_index

        hits = load_index(store, col).search(store, q, k, where=where, exclude=exclude)
    elif cache:
        keys, matrix = _cached(store, dt, col, chunk_rows)
        rows = None if where is None else where_rows(store, keys, where)
        hits = _top_k_dense(keys, matrix, q, k, rows=rows, exclude=exclude)
    else:
        hits = _top_k_stream(chunks(store, dt, col, where, chunk_rows), q, k, exclude)
    return _with_samples(store, hits)


# ---- exact ----------------------------------------------------------------------


def as_matrix(column: pa.ChunkedArray | pa.Array, dim: int, name: str = "") -> np.ndarray:
    """``list<float32>`` rows (no nulls) as an (n, dim) float32 array, without a copy."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = np.diff(column.offsets.to_numpy())
    if len(lengths) and (lengths.min() != dim or lengths.max() != dim):
        raise StoreError(f"{name} rows have {lengths.min()}..{lengths.max()} values, not {dim}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(column), dim)


def chunks(
    store: FeatureStore, dt: DeltaTable, col: EmbeddingColumn, where: str | None, rows: int
) -> Any:
    """(keys, matrix) per batch of the column's non-null rows (``where``: a SQL filter).

    Rows come L2-normalised: a column stored without normalisation is normalised here.
    """
    label = f"{col.table}.{col.column}"
    if where is None:
        reader = dataset(store, col.table, dt).to_batches(
            columns=[*KEYS, col.column], batch_size=rows
        )
    else:
        con = _where_con(store, dataset(store, col.table, dt), where)
        select = ", ".join(f'"{c}"' for c in [*KEYS, col.column])
        sql = f'SELECT {select} FROM v WHERE "{col.column}" IS NOT NULL AND ({where})'
        reader = _sql(con, sql).to_arrow_reader(rows)
    for batch in reader:
        if batch.column(col.column).null_count:  # rows without this modality
            batch = batch.filter(pc.is_valid(batch.column(col.column)))
        if batch.num_rows:
            keys = pa.Table.from_batches([batch.select(KEYS)])
            matrix = as_matrix(batch.column(col.column), col.dim, label)
            if not col.normalized:
                matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
            yield keys, matrix


def _top_k_stream(parts: Any, q: np.ndarray, k: int, exclude: list[str]) -> pa.Table:
    best_keys: list[pa.Table] = []
    best_scores = np.empty(0, np.float32)
    for keys, matrix in parts:
        scores = matrix @ q
        scores[excluded_rows(keys, exclude)] = -np.inf
        top = top_indices(scores, k)
        best_keys.append(keys.take(top))
        best_scores = np.concatenate([best_scores, scores[top]])
        if len(best_scores) > 4 * k:  # merge now and then: bounded, and few concatenations
            best_keys, best_scores = _merge(best_keys, best_scores, k)
    if not best_keys:
        return hits_table(KEY_SCHEMA.empty_table(), np.empty(0, np.float32))
    keys, scores = _merge(best_keys, best_scores, k)
    return hits_table(keys[0], scores)


def excluded_rows(keys: pa.Table, exclude: list[str]) -> np.ndarray:
    """Row positions of ``keys`` whose sample is excluded (the query's own rows)."""
    if not exclude:
        return np.empty(0, np.int64)
    return np.flatnonzero(pc.is_in(keys.column("sample_id"), pa.array(exclude)).to_numpy(False))


def _merge(parts: list[pa.Table], scores: np.ndarray, k: int) -> tuple[list[pa.Table], np.ndarray]:
    keys = pa.concat_tables(parts)
    top = top_indices(scores, k)
    return [keys.take(top)], scores[top]


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest finite scores, best first."""
    idx = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    return idx[np.isfinite(scores[idx])]


def _top_k_dense(
    keys: pa.Table,
    matrix: np.ndarray,
    q: np.ndarray,
    k: int,
    *,
    rows: np.ndarray | None = None,
    exclude: list[str],
) -> pa.Table:
    scores = matrix @ q if rows is None else np.full(len(matrix), -np.inf, np.float32)
    if rows is not None:
        scores[rows] = matrix[rows] @ q
    scores[excluded_rows(keys, exclude)] = -np.inf
    top = top_indices(scores, k)
    return hits_table(keys.take(top), scores[top])


def _cached(
    store: FeatureStore, dt: DeltaTable, col: EmbeddingColumn, rows: int
) -> tuple[pa.Table, np.ndarray]:
    key = (store.table_uri(col.table), col.version, col.column)
    if key not in _CACHE:
        _CACHE.clear()  # one matrix at a time: the cache is for one hot version, not a store
        _CACHE[key] = load_matrix(store, dt, col, rows)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget the matrix ``search(cache=True)`` keeps (frees its memory)."""
    _CACHE.clear()


def load_matrix(
    store: FeatureStore, dt: DeltaTable, col: EmbeddingColumn, rows: int = CHUNK_ROWS
) -> tuple[pa.Table, np.ndarray]:
    """All non-null rows of the column: their keys and one (n, dim) float32 matrix."""
    n = dataset(store, col.table, dt).count_rows(filter=pc.is_valid(pc.field(col.column)))
    matrix = np.empty((n, col.dim), np.float32)
    keys, filled = [], 0
    for batch_keys, chunk in chunks(store, dt, col, None, rows):
        matrix[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
        keys.append(batch_keys)
    table = pa.concat_tables(keys) if keys else KEY_SCHEMA.empty_table()
    return table, matrix[:filled]


# ---- filters and results -----------------------------------------------------------


def _where_con(store: FeatureStore, features: Any, where: str) -> duckdb.DuckDBPyConnection:
    """A connection with view ``v``: the feature rows, joined with samples if ``where`` needs it."""
    con = duckdb.connect()
    con.execute("SET python_enable_replacements = false")
    con.register("f", features)
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", where))
    extra = [c for c in SAMPLE_COLUMNS if c in words]
    if extra and store.exists("samples"):
        con.register("s", dataset(store, "samples", store.delta("samples")))
        picked = ", ".join(f's."{c}"' for c in extra)
        _sql(con, f"CREATE VIEW v AS SELECT f.*, {picked} FROM f LEFT JOIN s USING (sample_id)")
    else:
        _sql(con, "CREATE VIEW v AS SELECT * FROM f")
    return con


def where_rows(store: FeatureStore, keys: pa.Table, where: str) -> np.ndarray:
    """Row positions of ``keys`` (with its ``__row`` column added) that satisfy ``where``."""
    numbered = keys.append_column("__row", pa.array(np.arange(keys.num_rows)))
    con = _where_con(store, numbered, where)
    rows = _sql(con, f"SELECT __row FROM v WHERE {where}").to_arrow_table().column(0)
    return rows.to_numpy()


def _sql(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
    try:
        return con.sql(sql)
    except duckdb.Error as e:
        raise StoreError(f"search filter failed: {' '.join(str(e).split())}") from e


def hits_table(keys: pa.Table, scores: np.ndarray) -> pa.Table:
    keys = keys.select(SHOWN)
    return keys.add_column(2, "score", pa.array(scores, pa.float32()))


def _with_samples(store: FeatureStore, hits: pa.Table) -> pa.Table:
    """Add the samples' source, uri, text and metadata to the hits (order kept; null if none)."""
    columns = ["sample_id", *RESULT_SAMPLE_COLUMNS]
    if store.exists("samples") and hits.num_rows:
        ids = hits.column("sample_id").unique()
        where = pc.is_in(pc.field("sample_id"), ids)
        info = store.to_arrow("samples", columns=columns, filter=where)
    else:
        info = pa.table({c: pa.array([], pa.string()) for c in columns})
    where = pc.index_in(hits.column("sample_id"), info.column("sample_id"))
    for name in RESULT_SAMPLE_COLUMNS:
        hits = hits.append_column(name, info.column(name).take(where))
    return hits
