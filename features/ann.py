"""The approximate vector index of one feature-set version (faiss IVF-Flat).

``build_index`` tunes ``nprobe`` to a recall@10 target against exact search on
held-out rows and stores the index, its row keys and its build record under
``<store>/_indexes/<name>/v<version>/``; ``load_index`` keeps the loaded index
of exactly that version in the process (versions are immutable).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from features.errors import StoreError
from features.snapshots import load_matrix
from features.storage import filesystem_for, join_uri
from features.tables import TableStore, Version
from features.vectors import (
    EmbeddingColumn,
    embedding_column,
    exact_ids,
    excluded_rows,
    hits_table,
    recall_at,
    where_rows,
)

INDEX_DIR = "_indexes"


@dataclass
class AnnIndex:
    """A loaded index: faiss IVF over the column's rows, their keys, and its build record."""

    index: Any
    keys: pa.Table
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        self.keys = self.keys.combine_chunks()  # a query takes its hits' keys: one chunk

    def search(
        self, store: TableStore, q: np.ndarray, k: int, *, where: str | None, exclude: list[str]
    ) -> pa.Table:
        """Top-``k`` rows; ``where`` and ``exclude`` restrict the rows faiss may return."""
        import faiss

        params = faiss.SearchParametersIVF(nprobe=int(self.meta["nprobe"]))
        banned = excluded_rows(self.keys, exclude)
        available = self.index.ntotal - len(banned)
        selectors = []  # faiss keeps raw pointers: the Python objects must outlive the search
        if where is not None:
            allowed = np.setdiff1d(where_rows(store, self.keys, where), banned)
            available = len(allowed)
            selectors.append(faiss.IDSelectorBatch(allowed.astype(np.int64)))
        elif len(banned):
            selectors.append(faiss.IDSelectorBatch(banned.astype(np.int64)))
            selectors.append(faiss.IDSelectorNot(selectors[0]))
        if selectors:
            params.sel = selectors[-1]
        scores, ids = self.index.search(q[None, :], k, params=params)
        if (ids[0] >= 0).sum() < min(k, available):
            # the probed lists held fewer allowed rows than asked for (a selective filter or
            # a large k): probe every list, which for IVF-Flat is the exact answer
            params.nprobe = self.index.nlist
            scores, ids = self.index.search(q[None, :], k, params=params)
        found = ids[0] >= 0
        return hits_table(self.keys.take(ids[0][found]), scores[0][found])


_INDEXES: dict[str, AnnIndex] = {}


def index_uri(store: TableStore, col: EmbeddingColumn) -> str:
    return join_uri(store.uri, INDEX_DIR, col.name, f"v{col.version}")


def build_index(
    store: TableStore,
    feature_set: str,
    column: str | None = None,
    *,
    version: Version = None,
    target_recall: float = 0.95,
    queries: int = 200,
    nlist: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Build, tune and save the IVF index of one feature-set version; returns its record.

    ``nlist`` defaults to about sqrt(rows) lists. ``nprobe`` is the smallest
    power of two whose recall@10 against exact search reaches ``target_recall``
    for ``queries`` held-out rows (added to the index only after tuning, so they
    are queries it has not seen); the record, saved as JSON beside the index,
    holds it and the whole recall curve.
    """
    import faiss

    dt, col = embedding_column(store, feature_set, column, version)
    started = time.perf_counter()
    keys, matrix = load_matrix(store, dt, col)
    n = len(matrix)
    if n == 0:
        raise StoreError(f"{col.table}.{col.column} v{col.version} has no embeddings to index")
    read_s = time.perf_counter() - started
    nlist = nlist or max(1, min(round(np.sqrt(n)), n // 39))
    rng = np.random.default_rng(seed)
    index = faiss.IndexIVFFlat(
        faiss.IndexFlatIP(col.dim), col.dim, nlist, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.niter = 20
    # tune on held-out rows: queries the index has not seen, as users' queries are
    held = np.sort(rng.choice(n, min(queries, n // 10), replace=False))
    rest = np.setdiff1d(np.arange(n), held)
    index.train(matrix[np.sort(rng.choice(rest, min(len(rest), 40 * nlist), replace=False))])
    index.add_with_ids(matrix[rest], rest)
    build_s = time.perf_counter() - started - read_s
    truth = exact_ids(matrix, matrix[held], 10, exclude=held)
    curve: dict[int, float] = {}
    nprobe = 1 if len(held) else nlist  # too few rows to hold any out: probe every list
    while len(held):
        index.nprobe = nprobe
        curve[nprobe] = recall_at(index.search(matrix[held], 10)[1], truth)
        if curve[nprobe] >= target_recall or nprobe >= nlist:
            break
        nprobe = min(2 * nprobe, nlist)
    index.add_with_ids(matrix[held], held)
    meta = {
        "table": col.table, "column": col.column, "version": col.version, "dim": col.dim,
        "encoder": col.encoder, "rows": n, "kind": "faiss.IndexIVFFlat", "nlist": nlist,
        "nprobe": nprobe, "recall_at_10": curve.get(nprobe, 1.0), "target_recall": target_recall,
        "recall_curve": curve, "probe_queries": len(held), "read_s": round(read_s, 3),
        "build_s": round(build_s, 3), "faiss": faiss.__version__,
    }  # fmt: skip
    fs, root = filesystem_for(index_uri(store, col), store.storage_options)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{col.column}.faiss") as out:
        out.write(faiss.serialize_index(index).tobytes())
    pq.write_table(keys, f"{root}/{col.column}.keys.parquet", filesystem=fs)
    with fs.open_output_stream(f"{root}/{col.column}.json") as out:
        out.write(json.dumps(meta, indent=1).encode())
    _INDEXES.pop(f"{root}/{col.column}", None)
    return {**meta, "uri": index_uri(store, col)}


def load_index(store: TableStore, col: EmbeddingColumn) -> AnnIndex:
    """The saved index of exactly this version (kept in the process once loaded)."""
    fs, root = filesystem_for(index_uri(store, col), store.storage_options)
    path = f"{root}/{col.column}"
    if path not in _INDEXES:
        index = read_index(store, col)
        _INDEXES.clear()  # one loaded index at a time
        _INDEXES[path] = index
    return _INDEXES[path]


def read_index(store: TableStore, col: EmbeddingColumn) -> AnnIndex:
    """The saved index of exactly this version, read now (a service keeps its own)."""
    import faiss

    fs, root = filesystem_for(index_uri(store, col), store.storage_options)
    path = f"{root}/{col.column}"
    if fs.get_file_info(f"{path}.faiss").type != pafs.FileType.File:
        raise StoreError(
            f"no index for {col.table}.{col.column} v{col.version}; build it with "
            f"`mmfp store index {col.name} --column {col.column}`, or search exactly"
        )
    with fs.open_input_file(f"{path}.faiss") as f:
        index = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
    with fs.open_input_file(f"{path}.json") as f:
        meta = json.loads(f.read())
    return AnnIndex(index, pq.read_table(f"{path}.keys.parquet", filesystem=fs), meta)
