"""Cosine top-k over a feature set's embedding column: exact (streamed) or approximate (faiss).

Exact search maps the column one data file at a time from its snapshot
(``features.snapshots``: made the first time a file is searched, then read
without decoding by every later search), multiplies each with the normalised
query and keeps a running top-k, so memory is bounded by one file whatever the
table's size. ``snapshots=False`` decodes the Parquet files in record batches
(``chunk_rows`` at a time) and writes nothing. ``cache=True`` keeps the matrix
of a (table, version, column) in the process instead, for notebooks and
services that ask many questions of one version (versions are immutable, so the
cache never goes stale).

``method="ann"`` asks the approximate index of exactly that version instead
(``features.ann``: faiss IVF-Flat tuned to a recall@10 target against exact
search).

Queries are vectors. ``sample_id=`` uses a stored row's own embedding (and
leaves that sample out of the results); text, image or audio queries are
embedded by the encode stage's ``embed_query`` hook and passed as ``vector=``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from features.ann import AnnIndex, load_index
from features.errors import StoreError
from features.schema import ORIGINAL_VIEW
from features.snapshots import filtered_parts, load_matrix, stored_vector
from features.tables import TableStore, Version, string_field
from features.vectors import (
    CHUNK_ROWS,
    KEY_SCHEMA,
    EmbeddingColumn,
    chunks,
    decode_matrix,
    embedding_column,
    excluded_rows,
    hits_table,
    query_vector,
    top_indices,
    where_rows,
)

RESULT_SAMPLE_COLUMNS = ["source", "source_uri", "text", "modalities", "metadata"]


@dataclass(frozen=True)
class ResidentColumn:
    """One embedding column of one feature-set version held in memory (a notebook's, a
    service replica's): an exact search is one matrix product, no Parquet decode per
    query. Versions are immutable, so a resident column never goes stale; a newer
    version is a new ``ResidentColumn``."""

    column: EmbeddingColumn
    keys: pa.Table
    matrix: np.ndarray

    def __post_init__(self) -> None:
        # one chunk: a query's `take` of its hits from chunked keys (a chunk per file and
        # row group) cost 20x more, ~0.2 ms per query at 200k rows
        object.__setattr__(self, "keys", self.keys.combine_chunks())

    @classmethod
    def load(
        cls,
        store: TableStore,
        feature_set: str,
        column: str | None = None,
        version: Version = None,
    ) -> ResidentColumn:
        dt, col = embedding_column(store, feature_set, column, version)
        return cls(col, *load_matrix(store, dt, col))

    def at(self, store: TableStore, version: int) -> ResidentColumn:
        """This column at a newer ``version``: when that version only added files (an
        append, a build's commit), only those are read and stacked under the rows held;
        otherwise (rows removed, files rewritten) the whole version is loaded."""
        dt, col = embedding_column(store, self.column.name, self.column.column, version)
        held = _files(store.delta(self.column.table, self.column.version))
        now = _files(dt)
        if not held <= now or col.dim != self.column.dim:
            return ResidentColumn(col, *load_matrix(store, dt, col))
        keys, matrix = load_matrix(store, dt, col, files=now - held)
        return ResidentColumn(
            col, pa.concat_tables([self.keys, keys]), np.concatenate([self.matrix, matrix])
        )

    def vector_of(self, sample_id: str, view: int = ORIGINAL_VIEW) -> np.ndarray:
        """The stored (normalised) embedding of one row."""
        match = pc.and_(
            pc.equal(self.keys.column("sample_id"), sample_id),
            pc.equal(self.keys.column("view"), view),
        )
        rows = np.flatnonzero(match.to_numpy(zero_copy_only=False))
        if not len(rows):
            raise StoreError(f"no row sample_id={sample_id!r} view={view} in {self.column.table}")
        return self.matrix[rows[0]]

    def search(
        self,
        store: TableStore,
        q: np.ndarray,
        k: int,
        *,
        where: str | None = None,
        exclude: Sequence[str] = (),
        index: AnnIndex | None = None,
        samples: ResidentSamples | None = None,
    ) -> pa.Table:
        """Top-``k`` by cosine to the normalised query ``q``, with the samples' columns
        (from ``samples`` when held, else read); with ``index`` (this version's),
        approximate through it instead."""
        if index is None:
            rows = None if where is None else where_rows(store, self.keys, where)
            return self.search_many(store, [ExactQuery(q, k, rows, exclude)], samples=samples)[0]
        hits = index.search(store, q, k, where=where, exclude=list(exclude))
        return samples.attach(hits) if samples is not None else _with_samples(store, hits)

    def search_many(
        self,
        store: TableStore,
        queries: Sequence[ExactQuery],
        *,
        samples: ResidentSamples | None = None,
    ) -> list[pa.Table]:
        """Exact top-``k`` of several queries from one pass over the matrix: the product
        is bound by reading the matrix, so a batch of queries costs about what one does
        (a service batches the queries that arrive together)."""
        scores = np.stack([x.q for x in queries]) @ self.matrix.T  # (queries, rows)
        out = []
        for x, row in zip(queries, scores, strict=True):
            if x.rows is not None:
                row, kept = np.full(len(row), -np.inf, np.float32), row
                row[x.rows] = kept[x.rows]
            row[excluded_rows(self.keys, list(x.exclude))] = -np.inf
            top = top_indices(row, x.k)
            hits = hits_table(self.keys.take(top), row[top])
            out.append(samples.attach(hits) if samples is not None else _with_samples(store, hits))
        return out


@dataclass(frozen=True)
class ExactQuery:
    """One exact search of a batch: a normalised vector, how many hits, the rows a filter
    allows (``where_rows`` of ``search``'s ``where``; None: all) and the sample ids to
    leave out."""

    q: np.ndarray
    k: int
    rows: np.ndarray | None = None
    exclude: Sequence[str] = ()


@dataclass(frozen=True)
class ResidentSamples:
    """The columns a hit shows of its sample (source, uri, text, ...) for every sample of
    one ``samples`` version, in memory and sorted by id: a service attaches them to its
    hits by binary search instead of scanning the table per query."""

    version: int | None
    ids: np.ndarray  # sorted sample ids as UTF-8 bytes
    rows: pa.Table  # RESULT_SAMPLE_COLUMNS in the same order

    @classmethod
    def load(cls, store: TableStore) -> ResidentSamples:
        version = store.version("samples") if store.exists("samples") else None
        if version is None:
            return cls(None, np.array([], "S1"), _no_samples())
        rows = store.to_arrow("samples", version, columns=["sample_id", *RESULT_SAMPLE_COLUMNS])
        rows = rows.sort_by("sample_id").combine_chunks()  # one chunk for each query's take
        ids = np.array([i.encode() for i in rows.column("sample_id").to_pylist()])
        return cls(version, ids if len(ids) else np.array([], "S1"), rows)

    def attach(self, hits: pa.Table) -> pa.Table:
        wanted = np.array([i.encode() for i in hits.column("sample_id").to_pylist()], "S")
        at = np.searchsorted(self.ids, wanted).clip(0, max(len(self.ids) - 1, 0))
        found = self.ids[at] == wanted if len(self.ids) else np.zeros(len(wanted), bool)
        return _attach(hits, self.rows, pa.array(at, pa.int64(), mask=~found))


_CACHE: dict[tuple[str, int, str], ResidentColumn] = {}


def _files(dt: DeltaTable) -> set[str]:
    """The data files of a table version, relative to the table."""
    return set(pa.table(dt.get_add_actions(flatten=True)).column("path").to_pylist())


def search(
    store: TableStore,
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
    snapshots: bool = True,
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
    exclude = [sample_id] if sample_id else []
    stored = None
    if sample_id is not None and vector is None and snapshots:
        stored = stored_vector(store, dt, col, sample_id, ORIGINAL_VIEW)
    if stored is not None:  # else the Parquet read says whether the row or its vector is missing
        vector, sample_id = stored, None
    q = query_vector(store, dt, col, vector=vector, sample_id=sample_id)
    if method == "ann":
        hits = load_index(store, col).search(store, q, k, where=where, exclude=exclude)
    elif cache:
        held = _cached(store, dt, col, snapshots=snapshots, rows=chunk_rows)
        return held.search(store, q, k, where=where, exclude=exclude)
    elif snapshots:
        hits = _top_k_stream(filtered_parts(store, dt, col, where), q, k, exclude)
    else:
        hits = _top_k_stream(chunks(store, dt, col, where, chunk_rows), q, k, exclude)
    return _with_samples(store, hits)


def _top_k_stream(
    parts: Iterable[tuple[pa.Table, np.ndarray]], q: np.ndarray, k: int, exclude: list[str]
) -> pa.Table:
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


def _merge(parts: list[pa.Table], scores: np.ndarray, k: int) -> tuple[list[pa.Table], np.ndarray]:
    keys = pa.concat_tables(parts)
    top = top_indices(scores, k)
    return [keys.take(top)], scores[top]


def _cached(
    store: TableStore, dt: DeltaTable, col: EmbeddingColumn, *, snapshots: bool, rows: int
) -> ResidentColumn:
    key = (store.table_uri(col.table), col.version, col.column)
    if key not in _CACHE:
        _CACHE.clear()  # one matrix at a time: the cache is for one hot version, not a store
        read = load_matrix(store, dt, col) if snapshots else decode_matrix(store, dt, col, rows)
        _CACHE[key] = ResidentColumn(col, *read)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget the matrix ``search(cache=True)`` keeps (frees its memory)."""
    _CACHE.clear()


def _with_samples(store: TableStore, hits: pa.Table) -> pa.Table:
    """Add the samples' source, uri, text and metadata to the hits (order kept; null if none)."""
    columns = ["sample_id", *RESULT_SAMPLE_COLUMNS]
    if store.exists("samples") and hits.num_rows:
        ids = hits.column("sample_id").unique()
        where = pc.is_in(string_field("sample_id"), ids)
        info = store.to_arrow("samples", columns=columns, filter=where)
    else:
        info = _no_samples()
    return _attach(hits, info, pc.index_in(hits.column("sample_id"), info.column("sample_id")))


def _no_samples() -> pa.Table:
    return pa.table({c: pa.array([], pa.string()) for c in ["sample_id", *RESULT_SAMPLE_COLUMNS]})


def _attach(hits: pa.Table, info: pa.Table, rows: pa.Array) -> pa.Table:
    """The hits with ``info``'s sample columns at ``rows`` (null: no such sample)."""
    for name in RESULT_SAMPLE_COLUMNS:
        hits = hits.append_column(name, info.column(name).take(rows))
    return hits
