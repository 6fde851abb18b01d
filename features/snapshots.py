"""Copies of a feature set's embedding column that map without decoding, one per data file.

Exact search is bound by decoding Parquet (zstd pages, list offsets): 1M x 384 takes ~2 s
to decode against ~50 ms for the product itself. A snapshot holds one data file's
non-null rows of one column, keys and L2-normalised vectors, as an uncompressed Arrow IPC
file: a later search, in any process, maps it (local stores) or reads it without decoding
(object stores). Delta data files are immutable, so a snapshot never goes stale; it is
made the first time its file is read for search and lives under
``<store>/_snapshots/<feature set>/<column>/``. ``vacuum`` deletes it with its data file;
deleting the whole folder is always safe (searches decode and make them again).

A snapshot that does not match its data file (another size recorded, another width, keys
that fail Arrow's full validation, a
truncated or foreign file) is ignored and made again, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from deltalake import DeltaTable

from features.schema import FEATURES_PREFIX
from features.storage import filesystem_for, join_uri
from features.tables import TableStore
from features.vectors import KEY_SCHEMA, EmbeddingColumn, file_matrices, stacked, where_rows

SNAPSHOT_DIR = "_snapshots"
VECTOR = "vector"
log = logging.getLogger(__name__)


def snapshot_dir(store: TableStore, feature_set: str, column: str) -> str:
    return join_uri(store.uri, SNAPSHOT_DIR, feature_set, column)


def snapshot_name(data_file: str) -> str:
    """A flat, safe file name for a data file's path (relative to its table): a hostile
    path in the Delta log (``../x``) cannot name a file outside the snapshot folder."""
    readable = re.sub(r"[^A-Za-z0-9._=-]", "_", data_file)[-120:]
    return f"{hashlib.sha1(data_file.encode()).hexdigest()[:12]}-{readable}.arrow"


def parts(
    store: TableStore, dt: DeltaTable, col: EmbeddingColumn, files: set[str] | None = None
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """(keys, normalised matrix) per data file of the version (of only ``files``, paths
    relative to the table, when given), from its snapshot, which is made first where
    missing. One file is in memory at a time; a store that cannot be written to is
    decoded as before."""
    for _, keys, matrix in _file_parts(store, dt, col, files):
        yield keys, matrix


def _file_parts(
    store: TableStore, dt: DeltaTable, col: EmbeddingColumn, files: set[str] | None = None
) -> Iterator[tuple[str, pa.Table, np.ndarray]]:
    """``parts`` with each data file's path: files with a snapshot come first, so the
    order differs between two calls when the first made snapshots."""
    fs, root = filesystem_for(snapshot_dir(store, col.name, col.column), store.storage_options)
    made = _listing(fs, root)
    actions = pa.table(dt.get_add_actions(flatten=True))
    paths = actions.column("path").to_pylist()
    sizes = actions.column("size_bytes").to_pylist()
    missing = {}
    for path, size in zip(paths, sizes, strict=True):
        if files is not None and path not in files:
            continue
        target = f"{root}/{snapshot_name(path)}"
        part = _read(fs, target, path, size, col) if target in made else None
        if part is None:
            missing[path] = (target, size)
        elif len(part[1]):
            yield path, *part
    for path, keys, matrix in file_matrices(store, dt, col, set(missing)) if missing else ():
        target, size = missing[path]
        part = _write(fs, target, path, size, col, keys, matrix) or (keys, matrix)
        if len(part[1]):
            yield path, *part


def load_matrix(
    store: TableStore, dt: DeltaTable, col: EmbeddingColumn, files: set[str] | None = None
) -> tuple[pa.Table, np.ndarray]:
    """All non-null rows of the column (of only ``files`` when given): their keys and one
    (n, dim) matrix in memory, stacked from the snapshots."""
    return stacked(list(parts(store, dt, col, files)), col)


def stored_vector(
    store: TableStore, dt: DeltaTable, col: EmbeddingColumn, sample_id: str, view: int
) -> np.ndarray | None:
    """The normalised stored vector of one row, found in the snapshots' keys (None when no
    row has one: the caller's Parquet read then says which of the two is missing)."""
    for keys, matrix in parts(store, dt, col):
        match = pc.and_(
            pc.equal(keys.column("sample_id"), sample_id), pc.equal(keys.column("view"), view)
        )
        if len(rows := pc.indices_nonzero(match)):
            return np.array(matrix[rows[0].as_py()])
    return None


def filtered_parts(
    store: TableStore, dt: DeltaTable, col: EmbeddingColumn, where: str | None
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """``parts``, only the rows that satisfy the SQL filter ``where`` (None: all): the
    filter runs once over every file's keys, then each file is mapped again in turn."""
    if where is None:
        yield from parts(store, dt, col)
        return
    paths, keys = [], []
    for path, part_keys, _ in _file_parts(store, dt, col):
        paths.append(path)
        keys.append(part_keys)
    if not keys:
        return
    allowed = np.sort(where_rows(store, pa.concat_tables(keys), where))
    starts = np.cumsum([0, *(k.num_rows for k in keys)])
    rows_of = {
        path: allowed[np.searchsorted(allowed, lo) : np.searchsorted(allowed, hi)] - lo
        for path, lo, hi in zip(paths, starts[:-1], starts[1:], strict=True)
    }
    del keys
    for path, part_keys, matrix in _file_parts(store, dt, col):
        if len(rows := rows_of[path]):
            yield part_keys.take(rows), matrix[rows]


def _listing(fs: pafs.FileSystem, root: str) -> set[str]:
    """The snapshots already made (one listing, not one request per file)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return set()
    return {i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".arrow")}


def _read(
    fs: pafs.FileSystem, target: str, path: str, size: int, col: EmbeddingColumn
) -> tuple[pa.Table, np.ndarray] | None:
    """The snapshot at ``target`` if it is the one of this data file and column, else None."""
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            source = pa.memory_map(target)
        else:
            with fs.open_input_file(target) as f:
                source = pa.BufferReader(f.read_buffer())
        table = pa.ipc.open_file(source).read_all()
        # a hostile file's offsets must not point outside it: check every key (a few ms
        # per million rows); the vectors' layout has no offsets, only a length to check
        table.drop_columns([c for c in table.column_names if c == VECTOR]).validate(full=True)
        table.validate()
    except (OSError, pa.ArrowInvalid) as e:
        log.warning("snapshot %s unreadable (%s); decoding its data file instead", target, e)
        return None
    meta = table.schema.metadata or {}
    if any(
        meta.get(k) != v for k, v in _metadata(path, size, col).items()
    ) or not table.schema.equals(_schema(col), check_metadata=False):
        log.info("snapshot %s is not the one of %s; making it again", target, path)
        return None
    vectors = table.column(VECTOR)
    vectors = vectors.combine_chunks() if vectors.num_chunks != 1 else vectors.chunk(0)
    matrix = vectors.flatten().to_numpy(zero_copy_only=True).reshape(len(vectors), col.dim)
    return table.drop_columns([VECTOR]), matrix


def _write(
    fs: pafs.FileSystem,
    target: str,
    path: str,
    size: int,
    col: EmbeddingColumn,
    keys: pa.Table,
    matrix: np.ndarray,
) -> tuple[pa.Table, np.ndarray] | None:
    """Write the snapshot and return it mapped (so the decoded copy can be freed); None
    when the store cannot be written to (the caller keeps the decoded copy)."""
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), col.dim)
    table = keys.cast(KEY_SCHEMA).append_column(VECTOR, vectors)
    table = table.cast(_schema(col)).replace_schema_metadata(_metadata(path, size, col))
    local = isinstance(fs, pafs.LocalFileSystem)
    # a local file appears whole or not at all (a kill mid-write leaves only a .tmp file);
    # an object store's PUT is atomic already
    staging = f"{target}.{uuid.uuid4().hex}.tmp" if local else target
    try:
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(staging) as out, pa.ipc.new_file(out, table.schema) as w:
            w.write_table(table, max_chunksize=max(table.num_rows, 1))
        if local:
            fs.move(staging, target)
    except OSError as e:
        log.info("no snapshot for %s (%s): searches decode it", path, e)
        if local:
            with contextlib.suppress(OSError):
                fs.delete_file(staging)
        return None
    return _read(fs, target, path, size, col)


def _schema(col: EmbeddingColumn) -> pa.Schema:
    return KEY_SCHEMA.append(pa.field(VECTOR, pa.list_(pa.float32(), col.dim), nullable=False))


def _metadata(path: str, size: int, col: EmbeddingColumn) -> dict[bytes, bytes]:
    return {
        b"mmfp.snapshot_format": b"1",  # a new layout changes this, and old files are made again
        b"mmfp.data_file": path.encode(),
        b"mmfp.data_file_size": str(size).encode(),
        b"mmfp.column": col.column.encode(),
        b"mmfp.dim": str(col.dim).encode(),
    }


def stale(store: TableStore, doomed: dict[str, list[str]]) -> list[str]:
    """Snapshot files (paths relative to the store) that no search can use once the data
    files in ``doomed`` (a vacuum's plan: table -> paths) are deleted: those of deleted or
    missing data files, of feature sets that are gone, and the staging files of writes
    that were killed."""
    fs, root = filesystem_for(join_uri(store.uri, SNAPSHOT_DIR), store.storage_options)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError:
        return []
    kept: dict[str, set[str]] = {}  # feature set -> snapshot names of its live data files
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(root) + 1 :]
        name = relative.split("/", 1)[0]
        if name not in kept:
            kept[name] = _live_names(store, f"{FEATURES_PREFIX}{name}", doomed)
        if relative.rsplit("/", 1)[-1] not in kept[name]:
            out.append(f"{SNAPSHOT_DIR}/{relative}")
    return sorted(out)


def _live_names(store: TableStore, table: str, doomed: dict[str, list[str]]) -> set[str]:
    if not store.exists(table):
        return set()
    fs, root = filesystem_for(store.table_uri(table), store.storage_options)
    files = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    paths = {i.path[len(root) + 1 :] for i in files if i.type == pafs.FileType.File}
    return {snapshot_name(p) for p in paths - set(doomed.get(table, []))}
