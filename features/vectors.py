"""A feature set's embedding column as matrices: reading, filtering, top-k.

What exact search, the ANN index and the embedding map share: the column's
description (``EmbeddingColumn``, from the feature set's ``FeatureSetMeta``),
the query vector, the column streamed in record batches as ``(keys, matrix)``
chunks (optionally filtered by a SQL ``where`` over feature and sample
columns), and the top-k helpers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from features.duck import connect
from features.errors import StoreError
from features.metadata import FeatureSetMeta, feature_table
from features.schema import FEATURE_KEY_FIELDS, FEATURES_PREFIX, ORIGINAL_VIEW
from features.tables import TableStore, Version, string_field

if TYPE_CHECKING:
    import pyarrow.dataset as pads

# the feature set's key columns travel with every row (a `where` may use any of them);
# results show the first four
KEY_SCHEMA = pa.schema(FEATURE_KEY_FIELDS)
KEYS = KEY_SCHEMA.names
SHOWN = ["sample_id", "view", "split", "label"]
# samples columns a `where` may use besides the feature set's own (media bytes left out)
SAMPLE_COLUMNS = ["source", "source_uri", "group_id", "text", "image_width", "image_height"]
SAMPLE_COLUMNS += ["audio_duration", "label_source", "metadata", "ingested_at"]
CHUNK_ROWS = 65_536
T = TypeVar("T")


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
    store: TableStore, feature_set: str, column: str | None = None, version: Version = None
) -> tuple[DeltaTable, EmbeddingColumn]:
    """The Delta table of ``feature_set`` at ``version`` and the embedding column to search."""
    table = feature_table(feature_set)
    dt = store.delta(table, version)
    columns = FeatureSetMeta.of(store, dt, table=table).embeddings()
    if not columns:
        raise StoreError(f"{table} has no embedding columns in its {FeatureSetMeta.KEY} metadata")
    if column is None and len(columns) > 1:
        raise StoreError(f"{table} has several embedding columns; pick one of {sorted(columns)}")
    column = column or next(iter(columns))
    if column not in columns:
        raise StoreError(f"{table} has no embedding column {column!r}; have {sorted(columns)}")
    meta = columns[column]
    return dt, EmbeddingColumn(
        table=table,
        column=column,
        dim=meta.dim,
        version=dt.version(),
        encoder=meta.encoder,
        normalized=meta.normalized,
    )


def query_vector(
    store: TableStore,
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
        where = (string_field("sample_id") == sample_id) & (pc.field("view") == view)
        rows = store.dataset_of(col.table, dt).to_table(columns=[col.column], filter=where)
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


# ---- reading ---------------------------------------------------------------------


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
    store: TableStore,
    dt: DeltaTable,
    col: EmbeddingColumn,
    where: str | None,
    rows: int,
    dataset: pads.Dataset | None = None,
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """(keys, matrix) per batch of the column's non-null rows (``where``: a SQL filter;
    ``dataset``: some of the version's files instead of all of them).

    Rows come L2-normalised: a column stored without normalisation is normalised here.
    """
    label = f"{col.table}.{col.column}"
    if where is None:
        reader = (dataset or store.dataset_of(col.table, dt)).to_batches(
            columns=[*KEYS, col.column], batch_size=rows
        )
    else:
        rel = where_relation(store, store.dataset_of(col.table, dt), where)
        rel = rel.filter(f'"{col.column}" IS NOT NULL').select(
            *[f'"{c}"' for c in [*KEYS, col.column]]
        )
        reader = _filtered_batches(rel, rows)
    for batch in reader:
        if (part := _batch_matrix(batch, col, label)) is not None:
            yield part


def file_matrices(
    store: TableStore, dt: DeltaTable, col: EmbeddingColumn, files: set[str]
) -> Iterator[tuple[str, pa.Table, np.ndarray]]:
    """(path, keys, matrix) of each of ``files`` (paths relative to the table), as
    ``chunks`` reads them: one scan, so files are decoded in parallel as a whole-table
    read is, and each file's rows are yielded together once it has been read."""
    import pyarrow.dataset as pads  # loaded by the dataset below already

    dataset = store.dataset_of(col.table, dt)
    fragments = [f for f in dataset.get_fragments() if f.path.lstrip("/") in files]
    dataset = pads.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)
    label = f"{col.table}.{col.column}"
    path, parts, done = None, [], set()
    for tagged in dataset.scanner(columns=[*KEYS, col.column]).scan_batches():
        here = tagged.fragment.path.lstrip("/")
        if here != path and path is not None:
            yield path, *stacked(parts, col)
            parts = []
            done.add(path)
        if here in done:  # the scan keeps each file's batches together; never half a file
            raise StoreError(f"{label}: the scan returned {here} in two pieces")
        path = here
        if (part := _batch_matrix(tagged.record_batch, col, label)) is not None:
            parts.append(part)
    if path is not None:
        yield path, *stacked(parts, col)


def stacked(
    parts: list[tuple[pa.Table, np.ndarray]], col: EmbeddingColumn
) -> tuple[pa.Table, np.ndarray]:
    """(keys, matrix) parts as one keys table and one matrix (empty ones of the column's
    width when there are none)."""
    if not parts:
        return KEY_SCHEMA.empty_table(), np.empty((0, col.dim), np.float32)
    return pa.concat_tables([k for k, _ in parts]), np.concatenate([m for _, m in parts])


def _batch_matrix(
    batch: pa.RecordBatch, col: EmbeddingColumn, label: str
) -> tuple[pa.Table, np.ndarray] | None:
    """A batch's non-null rows as (keys, normalised matrix); None when there are none."""
    if batch.column(col.column).null_count:  # rows without this modality
        batch = batch.filter(pc.is_valid(batch.column(col.column)))
    if not batch.num_rows:
        return None
    keys = pa.Table.from_batches([batch.select(KEYS)])
    matrix = as_matrix(batch.column(col.column), col.dim, label)
    if not col.normalized:
        matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return keys, matrix


def decode_matrix(
    store: TableStore, dt: DeltaTable, col: EmbeddingColumn, rows: int = CHUNK_ROWS
) -> tuple[pa.Table, np.ndarray]:
    """All non-null rows of the column, decoded from Parquet: their keys and one (n, dim)
    float32 matrix (``features.snapshots.load_matrix`` reads them without decoding)."""
    dataset = store.dataset_of(col.table, dt)
    # every row, nulls too: Parquet footers answer without decoding the column (a count of
    # the non-null rows would decode it a first time)
    matrix = np.empty((dataset.count_rows(), col.dim), np.float32)
    keys, filled = [], 0
    for batch_keys, chunk in chunks(store, dt, col, None, rows, dataset):
        matrix[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
        keys.append(batch_keys)
    table = pa.concat_tables(keys) if keys else KEY_SCHEMA.empty_table()
    return table, matrix[:filled]


# ---- filters ---------------------------------------------------------------------


def where_relation(store: TableStore, features: Any, where: str) -> duckdb.DuckDBPyRelation:
    """The feature rows (joined with the samples columns ``where`` names) filtered by ``where``.

    ``where`` is parsed as one SQL expression and applied as a filter, never pasted into a
    statement: a second statement, a closing parenthesis or a ``COPY`` is a syntax error.
    """
    con = connect({"f": features})
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", where))
    extra = [c for c in SAMPLE_COLUMNS if c in words]
    rel = con.table("f")
    if extra and store.exists("samples"):
        con.register("s", store.dataset("samples"))
        picked = ", ".join(f's."{c}"' for c in extra)
        rel = con.sql(f"SELECT f.*, {picked} FROM f LEFT JOIN s USING (sample_id)")
    return _checked(lambda: rel.filter(where))


def where_rows(store: TableStore, keys: pa.Table, where: str) -> np.ndarray:
    """Row positions of ``keys`` (with its ``__row`` column added) that satisfy ``where``."""
    numbered = keys.append_column("__row", pa.array(np.arange(keys.num_rows)))
    rel = where_relation(store, numbered, where).select('"__row"')
    return _checked(rel.to_arrow_table).column(0).to_numpy()


def _filtered_batches(rel: duckdb.DuckDBPyRelation, rows: int) -> Iterator[pa.RecordBatch]:
    try:
        yield from rel.to_arrow_reader(rows)
    except duckdb.Error as e:
        raise StoreError(f"search filter failed: {' '.join(str(e).split())}") from e


def _checked(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except duckdb.Error as e:
        raise StoreError(f"search filter failed: {' '.join(str(e).split())}") from e


# ---- top-k -----------------------------------------------------------------------


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest finite scores, best first."""
    idx = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
    idx = idx[np.argsort(-scores[idx], kind="stable")]
    return idx[np.isfinite(scores[idx])]


def excluded_rows(keys: pa.Table, exclude: list[str]) -> np.ndarray:
    """Row positions of ``keys`` whose sample is excluded (the query's own rows)."""
    if not exclude:
        return np.empty(0, np.int64)
    return np.flatnonzero(pc.is_in(keys.column("sample_id"), pa.array(exclude)).to_numpy(False))


def hits_table(keys: pa.Table, scores: np.ndarray) -> pa.Table:
    keys = keys.select(SHOWN)
    return keys.add_column(2, "score", pa.array(scores, pa.float32()))


def exact_ids(
    matrix: np.ndarray, queries: np.ndarray, k: int, *, exclude: Any = None, block: int = 32
) -> np.ndarray:
    """Exact top-``k`` row ids per query (brute force, ``block`` queries at a time)."""
    out = np.full((len(queries), k), -1, np.int64)
    for i in range(0, len(queries), block):
        scores = queries[i : i + block] @ matrix.T
        if exclude is not None:
            scores[:, exclude] = -np.inf
        for j, row in enumerate(scores):
            top = top_indices(row, k)
            out[i + j, : len(top)] = top
    return out


def recall_at(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true ids (``-1``: none) that ``got`` found."""
    found = []
    for g, t in zip(got, truth, strict=True):
        t = set(t[t >= 0].tolist())
        found.append(len(t & set(g.tolist())) / max(len(t), 1))
    return float(np.mean(found))
