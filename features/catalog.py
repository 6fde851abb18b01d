"""What the store keeps beside its rows: version diffs, file upkeep, lineage, vector indexes.

- ``diff``: rows added and removed between two versions of a table, by key,
  reading only the files one version has and the other does not (Delta add
  and remove actions), so a diff of a large table costs its change;
- ``vacuum`` / ``optimize``: Delta's own file upkeep over every table, with
  Delta's retention rule kept unless forced;
- ``lineage``: each version of a table with the run that wrote it, from the
  commit metadata and ``_runs``;
- ``build_index`` / ``load_index``: the approximate vector index of one
  feature-set version (faiss IVF-Flat), tuned and checked against exact search.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake.exceptions import DeltaError

from features.errors import StoreError
from features.schema import FEATURES_PREFIX, TABLE_KEYS
from features.search import (
    EmbeddingColumn,
    embedding_column,
    excluded_rows,
    hits_table,
    load_matrix,
    top_indices,
    where_rows,
)
from features.sql import open_version
from features.storage import filesystem_for, join_uri
from features.store import FeatureStore, Version

INDEX_DIR = "_indexes"


# ---- diff ------------------------------------------------------------------------


@dataclass
class TableDiff:
    """Keys added and removed going from version ``v1`` to ``v2`` of ``table``."""

    table: str
    v1: int
    v2: int
    added: pa.Table
    removed: pa.Table
    files_added: int
    files_removed: int
    rewritten: int  # rows whose files changed but which are in both versions (e.g. optimize)

    def summary(self) -> dict[str, Any]:
        return {
            "table": self.table, "from": self.v1, "to": self.v2,
            "rows_added": self.added.num_rows, "rows_removed": self.removed.num_rows,
            "rows_rewritten": self.rewritten,
            "files_added": self.files_added, "files_removed": self.files_removed,
        }  # fmt: skip


def table_key(table: str) -> list[str]:
    if table.startswith(FEATURES_PREFIX):
        return ["sample_id", "view"]
    if table not in TABLE_KEYS:
        raise StoreError(f"no key known for table {table!r}; known: {', '.join(TABLE_KEYS)}")
    return list(TABLE_KEYS[table])


def diff(store: FeatureStore, table: str, v1: Version, v2: Version = None) -> TableDiff:
    """Rows (by key) in ``v2`` and not ``v1`` (added) and in ``v1`` and not ``v2`` (removed).

    ``v2`` defaults to the latest version; either may be a time.
    """
    key = table_key(table)
    old, new = open_version(store, table, v1), open_version(store, table, v2)
    old_ds, new_ds = old.to_pyarrow_dataset(), new.to_pyarrow_dataset()
    old_files = {f.path: f for f in old_ds.get_fragments()}
    new_files = {f.path: f for f in new_ds.get_fragments()}
    gone = [f for p, f in old_files.items() if p not in new_files]
    came = [f for p, f in new_files.items() if p not in old_files]
    gone_keys = _keys(old_ds, gone, key)
    came_keys = _keys(new_ds, came, key)
    added = came_keys.join(gone_keys, key, join_type="left anti")
    removed = gone_keys.join(came_keys, key, join_type="left anti")
    return TableDiff(
        table=table,
        v1=old.version(),
        v2=new.version(),
        added=added.sort_by([(k, "ascending") for k in key]),
        removed=removed.sort_by([(k, "ascending") for k in key]),
        files_added=len(came),
        files_removed=len(gone),
        rewritten=came_keys.num_rows - added.num_rows,
    )


def _keys(dataset: pads.FileSystemDataset, fragments: list, key: list[str]) -> pa.Table:
    subset = pads.FileSystemDataset(fragments, dataset.schema, dataset.format, dataset.filesystem)
    return subset.to_table(columns=key)


# ---- file upkeep --------------------------------------------------------------------


def vacuum(
    store: FeatureStore,
    *,
    retention_hours: int | None = None,
    dry_run: bool = True,
    force: bool = False,
) -> dict[str, list[str]]:
    """Files that no version within the retention window needs, per table: listed, or deleted.

    Covers files removed by later commits and files no commit ever referenced
    (left by a killed job). ``retention_hours`` defaults to each table's
    ``delta.deletedFileRetentionDuration`` (7 days); a shorter one is refused
    unless ``force``: it breaks time travel to older versions and can delete
    the files of a write in progress. Every table is checked before any file
    is deleted, so a refusal deletes nothing.
    """
    plan: dict[str, list[str]] = {}
    refused = []
    for table in store.tables():
        try:
            plan[table] = _vacuum(store, table, retention_hours, dry_run=True, force=force)
        except DeltaError as e:
            if "retention" not in str(e).lower():
                raise StoreError(f"vacuum of {table!r} failed: {e}") from e
            refused.append(table)
    if refused:
        raise StoreError(
            f"retention of {retention_hours} hours is shorter than the tables' minimum "
            f"(delta.deletedFileRetentionDuration) for {', '.join(refused)}; "
            "add --force to vacuum anyway (time travel to older versions stops working)"
        )
    if dry_run:
        return plan
    return {t: _vacuum(store, t, retention_hours, dry_run=False, force=force) for t in plan}


def _vacuum(
    store: FeatureStore, table: str, hours: int | None, *, dry_run: bool, force: bool
) -> list[str]:
    return store.delta(table).vacuum(
        retention_hours=hours, dry_run=dry_run, enforce_retention_duration=not force, full=True
    )


def optimize(store: FeatureStore, table: str, *, target_size: int | None = None) -> dict[str, Any]:
    """Compact the table's small files into fewer large ones (one Delta commit, same rows)."""
    dt = store.delta(table)
    before = len(dt.file_uris())
    metrics = dt.optimize.compact(target_size=target_size)
    after = store.delta(table)
    return {
        "table": table,
        "version": after.version(),
        "files_before": before,
        "files_after": len(after.file_uris()),
        "files_added": metrics.get("numFilesAdded", 0),
        "files_removed": metrics.get("numFilesRemoved", 0),
    }


# ---- lineage --------------------------------------------------------------------------


def lineage(store: FeatureStore, table: str) -> list[dict[str, Any]]:
    """Each version of ``table``, newest first, with the run that wrote it and its spec and code."""
    runs: dict[str, dict[str, Any]] = {}
    if store.exists("_runs"):
        columns = ["run_id", "kind", "spec_name", "spec_hash", "code_version"]
        runs = {r["run_id"]: r for r in store.to_arrow("_runs", columns=columns).to_pylist()}
    out = []
    for entry in store.history(table):
        run = runs.get(entry["run_id"] or "", {})
        out.append(
            {
                **entry,
                "kind": run.get("kind"),
                "spec_name": run.get("spec_name"),
                "spec_hash": run.get("spec_hash"),
                "code_version": run.get("code_version"),
            }
        )
    return out


# ---- approximate vector index ------------------------------------------------------


@dataclass
class AnnIndex:
    """A loaded index: faiss IVF over the column's rows, their keys, and its build record."""

    index: Any
    keys: pa.Table
    meta: dict[str, Any]

    def search(
        self, store: FeatureStore, q: np.ndarray, k: int, *, where: str | None, exclude: list[str]
    ) -> pa.Table:
        """Top-``k`` rows; ``where`` and ``exclude`` restrict the rows faiss may return."""
        import faiss

        params = faiss.SearchParametersIVF(nprobe=int(self.meta["nprobe"]))
        banned = excluded_rows(self.keys, exclude)
        selectors = []  # faiss keeps raw pointers: the Python objects must outlive the search
        if where is not None:
            allowed = np.setdiff1d(where_rows(store, self.keys, where), banned)
            selectors.append(faiss.IDSelectorBatch(allowed.astype(np.int64)))
        elif len(banned):
            selectors.append(faiss.IDSelectorBatch(banned.astype(np.int64)))
            selectors.append(faiss.IDSelectorNot(selectors[0]))
        if selectors:
            params.sel = selectors[-1]
        scores, ids = self.index.search(q[None, :], k, params=params)
        found = ids[0] >= 0
        return hits_table(self.keys.take(ids[0][found]), scores[0][found])


_INDEXES: dict[str, AnnIndex] = {}


def index_uri(store: FeatureStore, col: EmbeddingColumn) -> str:
    return join_uri(store.uri, INDEX_DIR, col.name, f"v{col.version}")


def build_index(
    store: FeatureStore,
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


def load_index(store: FeatureStore, col: EmbeddingColumn) -> AnnIndex:
    """The saved index of exactly this version (kept in the process once loaded)."""
    import faiss

    fs, root = filesystem_for(index_uri(store, col), store.storage_options)
    path = f"{root}/{col.column}"
    if path not in _INDEXES:
        if fs.get_file_info(f"{path}.faiss").type != pafs.FileType.File:
            raise StoreError(
                f"no index for {col.table}.{col.column} v{col.version}; build it with "
                f"`mmfp store index {col.name} --column {col.column}`, or search exactly"
            )
        with fs.open_input_file(f"{path}.faiss") as f:
            index = faiss.deserialize_index(np.frombuffer(f.read(), np.uint8))
        with fs.open_input_file(f"{path}.json") as f:
            meta = json.loads(f.read())
        _INDEXES.clear()  # one loaded index at a time
        _INDEXES[path] = AnnIndex(index, pq.read_table(f"{path}.keys.parquet", filesystem=fs), meta)
    return _INDEXES[path]


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
