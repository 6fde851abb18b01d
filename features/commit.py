"""A run's writes: Parquet files under its tables, then one Delta commit per table.

``RunCommits`` is the one owner of what a run commits: the version it read
each table at (its base), the files its workers wrote and the rows it removes.
Workers only write files (``features.sink``); nothing is visible until
``RunCommits.commit``, so a killed run leaves the previous version intact and
its files unreferenced (``vacuum`` removes them).

Delta's optimistic concurrency lets two appends commit side by side, which
would let two concurrent refreshes both add the same new sample ids. So a run
commits against its base version: keys other writers committed since then are
dropped from this run's files (rewritten without them) before the commit, and
the commit itself is attempted with no automatic rebase, so a writer that
slips in between is detected and the check runs again. Removals (rows whose
inputs disappeared, a re-encode's old rows) are file rewrites in the same
transaction, so a table still gets one commit per run.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction, RemoveAction, Transaction

from features.errors import StoreError
from features.keys import changed_keys, key_mask, version_keys
from features.schema import TABLE_SCHEMAS, conform, table_keys
from features.storage import filesystem_for
from features.tables import ROWS_KEY, RUN_ID_KEY, TableStore

MAX_ATTEMPTS = 8


def add_action(path: str, size: int, rows: int) -> AddAction:
    """The Delta action that adds one Parquet file (``path`` relative to the table)."""
    return AddAction(
        path=path,
        size=size,
        partition_values={},
        modification_time=int(time.time() * 1000),
        data_change=True,
        stats=json.dumps({"numRecords": rows}),
    )


# columns that hold already-compressed bytes (JPEG, PNG, WebP): zstd would spend CPU
# on them for ~1% less space, so they are written as they are
ENCODED_MEDIA = frozenset({"image"})


def write_file(
    table_uri: str, storage_options: dict[str, str], rows: pa.Table, tag: str
) -> AddAction:
    """Write ``rows`` as one new Parquet file under the table; the action to commit it."""
    fs, root = filesystem_for(table_uri, storage_options)
    name = f"part-{tag}-{uuid.uuid4().hex}.parquet"
    compression = {
        path: "none" if field.name in ENCODED_MEDIA else "zstd"
        for field in rows.schema
        for path in _leaf_paths(field.name, field.type)
    }
    with fs.open_output_stream(f"{root}/{name}") as out:
        pq.write_table(rows, out, compression=compression)
    return add_action(name, fs.get_file_info(f"{root}/{name}").size, rows.num_rows)


def _leaf_paths(path: str, kind: pa.DataType) -> list[str]:
    """The Parquet column paths of an Arrow field (per-column options name leaves only)."""
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _leaf_paths(f"{path}.list.element", kind.value_type)
    if pa.types.is_map(kind):
        return [
            *_leaf_paths(f"{path}.key_value.key", kind.key_type),
            *_leaf_paths(f"{path}.key_value.value", kind.item_type),
        ]
    if pa.types.is_struct(kind):
        return [p for f in kind for p in _leaf_paths(f"{path}.{f.name}", f.type)]
    return [path]


def rewrite_files(
    table_uri: str,
    storage_options: dict[str, str],
    actions: list[AddAction],
    keep: Callable[[pa.Table], np.ndarray],
    tag: str,
) -> list[AddAction]:
    """Rewrite this run's (uncommitted) files keeping only the rows ``keep`` marks True."""
    fs, root = filesystem_for(table_uri, storage_options)
    kept = []
    for action in actions:
        path = f"{root}/{action.path}"
        with fs.open_input_file(path) as f:
            rows = pq.read_table(f)
        mask = keep(rows)
        if mask.all():
            kept.append(action)
            continue
        remaining = rows.filter(pa.array(mask))
        if remaining.num_rows:
            kept.append(write_file(table_uri, storage_options, remaining, tag))
        fs.delete_file(path)  # never committed: nobody can be reading it
    return kept


def rows_without(
    dt: DeltaTable, storage_options: dict[str, str], column: str, ids: pa.Array, tag: str
) -> tuple[list[RemoveAction], list[AddAction]]:
    """Remove + add actions deleting the rows of ``dt``'s version whose ``column`` is in ``ids``."""
    ids = pc.unique(ids.cast(pa.string()))
    if len(ids) == 0:
        return [], []

    def without(rows: pa.Table) -> pa.Table | None:
        hit = pc.is_in(rows.column(column), value_set=ids)
        return rows.filter(pc.invert(hit)) if pc.any(hit).as_py() else None

    return rewritten_rows(dt, storage_options, without, tag)


def rewritten_rows(
    dt: DeltaTable,
    storage_options: dict[str, str],
    change: Callable[[pa.Table], pa.Table | None],
    tag: str,
) -> tuple[list[RemoveAction], list[AddAction]]:
    """Remove + add actions replacing each file of ``dt``'s version by ``change(rows)``
    (``None``: the file stays as it is; no rows: the file goes)."""
    removes: list[RemoveAction] = []
    adds: list[AddAction] = []
    now = int(time.time() * 1000)
    for fragment in dt.to_pyarrow_dataset().get_fragments():
        changed = change(fragment.to_table())
        if changed is None:
            continue
        rel = fragment.path.rsplit("/", 1)[-1]
        removes.append(RemoveAction(path=rel, deletion_timestamp=now, data_change=True, size=None))
        if changed.num_rows:
            adds.append(write_file(dt.table_uri, storage_options, changed, tag))
    return removes, adds


def remove_all(dt: DeltaTable) -> list[RemoveAction]:
    """Remove actions for every file of ``dt``'s version (a full replacement)."""
    now = int(time.time() * 1000)
    actions = pa.table(dt.get_add_actions(flatten=True))
    return [
        RemoveAction(path=path, deletion_timestamp=now, data_change=True, size=size)
        for path, size in zip(
            actions.column("path").to_pylist(),
            actions.column("size_bytes").to_pylist(),
            strict=True,
        )
    ]


def keys_since(
    dt: DeltaTable, storage_options: dict[str, str], base_version: int | None, keys: Sequence[str]
) -> pa.Table:
    """Keys in ``dt``'s version that were not there at ``base_version`` (all when None)."""
    if base_version is None:
        return version_keys(dt, keys)
    before = DeltaTable(dt.table_uri, storage_options=storage_options or None)
    before.load_as_version(base_version)
    return changed_keys(before, dt, keys).added


class SlotCommitted(StoreError):
    """A scheduled slot another run already committed to this table: this run stops."""


@dataclass(frozen=True)
class Removal:
    """Rows a run removes from a table: those whose ``column`` is in ``ids``, or all."""

    column: str | None = None  # None: every row (a full replacement)
    ids: pa.Array | None = None


@dataclass(frozen=True)
class Rewrite:
    """Rows a run changes in place: each file's rows through ``change`` (``None``: unchanged)."""

    change: Callable[[pa.Table], pa.Table | None]


@dataclass(frozen=True)
class Committed:
    """What one commit did: its version (None: nothing to commit), the rows of this run's
    own files that landed, and the rows dropped because the table already had their key."""

    version: int | None
    rows: int = 0
    dropped: int = 0


def removal_actions(
    dt: DeltaTable,
    storage_options: dict[str, str],
    removals: Sequence[Removal | Rewrite],
    tag: str,
) -> tuple[list[RemoveAction], list[AddAction]]:
    """Remove actions (and rewritten files) for ``removals``, planned against ``dt``'s version."""
    rewrites = [r for r in removals if isinstance(r, Rewrite)]
    if rewrites:
        if len(removals) > 1:
            raise StoreError(f"{dt.table_uri}: a rewrite in place commits on its own")
        return rewritten_rows(dt, storage_options, rewrites[0].change, tag)
    if any(r.column is None for r in removals):
        return remove_all(dt), []
    columns = {r.column for r in removals}
    if len(columns) != 1:
        raise StoreError(f"{dt.table_uri}: removals by several columns {sorted(columns)}")
    ids = pa.chunked_array([r.ids for r in removals if r.ids is not None], pa.string())
    return rows_without(dt, storage_options, columns.pop(), ids.combine_chunks(), tag)


def commit_files(
    dt: DeltaTable,
    storage_options: dict[str, str],
    adds: list[AddAction],
    *,
    run_id: str,
    keys: Sequence[str] | None = None,
    base_version: int | None = None,
    removals: Sequence[Removal | Rewrite] = (),
    transaction: Transaction | None = None,
    owned: bool = False,
    metadata: dict[str, str] | None = None,
) -> Committed:
    """Commit files (and removals) as one version of ``dt``.

    The commit is attempted against the version it was checked and planned on,
    with no automatic rebase, exactly as Delta's own conflict checker treats a
    delete: when another writer commits first, the check and the plan run again
    on the new version. With ``keys``, rows whose key the run's own files repeat
    or another writer committed after ``base_version`` are dropped first;
    removals are planned anew on each attempt's version, so they never
    resurrect or duplicate a row another writer changed. A ``transaction`` (a
    scheduled slot) already on the table stops the run (``SlotCommitted``)
    unless this run put it there (``owned``). ``metadata`` goes into the
    commit's info, atomically with the rows (e.g. the feature-set description).
    """
    checked = base_version
    dropped = 0
    if keys is not None and adds:
        adds, dropped = _unique_keys(dt.table_uri, storage_options, adds, keys, run_id)
    rewritten: list[AddAction] = []
    for _ in range(MAX_ATTEMPTS):
        dt.update_incremental()
        if transaction is not None and not owned:
            done = dt.transaction_version(transaction.app_id)
            if done is not None and done >= transaction.version:
                discard_files(dt.table_uri, storage_options, [*adds, *rewritten])
                raise SlotCommitted(
                    f"{dt.table_uri}: slot {transaction.version} of {transaction.app_id} was "
                    "already committed by another run"
                )
        if keys is not None and checked != dt.version():
            clash = keys_since(dt, storage_options, checked, keys)
            if clash.num_rows:
                before = _rows(adds)
                adds = rewrite_files(
                    dt.table_uri,
                    storage_options,
                    adds,
                    lambda rows, clash=clash: ~key_mask(rows, clash, keys),
                    run_id,
                )
                dropped += before - _rows(adds)
            checked = dt.version()
        removes: list[RemoveAction] = []
        if removals:
            discard_files(dt.table_uri, storage_options, rewritten)
            removes, rewritten = removal_actions(dt, storage_options, removals, run_id)
        if not adds and not removes:
            discard_files(dt.table_uri, storage_options, rewritten)
            return Committed(None, 0, dropped)
        properties = CommitProperties(
            custom_metadata={**(metadata or {}), RUN_ID_KEY: run_id, ROWS_KEY: str(_rows(adds))},
            max_commit_retries=0,
            app_transactions=[transaction] if transaction else None,
        )
        try:
            dt.create_write_transaction(
                actions=[*adds, *rewritten, *removes],
                mode="append",
                schema=dt.schema(),
                commit_properties=properties,
            )
        except CommitFailedError:
            continue  # another writer was first: check and plan again on its version
        dt.update_incremental()
        return Committed(dt.version(), _rows(adds), dropped)
    raise StoreError(f"{dt.table_uri}: gave up after {MAX_ATTEMPTS} concurrent-commit retries")


def _rows(actions: Sequence[AddAction]) -> int:
    return sum(json.loads(a.stats)["numRecords"] for a in actions)


def discard_files(
    table_uri: str, storage_options: dict[str, str], actions: Sequence[AddAction]
) -> None:
    """Delete files this run wrote and will not commit (nobody can be reading them)."""
    fs, root = filesystem_for(table_uri, storage_options)
    for action in actions:
        fs.delete_file(f"{root}/{action.path}")


def _unique_keys(
    table_uri: str,
    storage_options: dict[str, str],
    adds: list[AddAction],
    keys: Sequence[str],
    tag: str,
) -> tuple[list[AddAction], int]:
    """The run's files with each key once (the first row keeps it), and the rows dropped.

    Stages never emit a key twice (duplicates are quarantined); this is the
    table's own guarantee that a bug upstream cannot break it.
    """
    fs, root = filesystem_for(table_uri, storage_options)
    parts = []
    for i, action in enumerate(adds):
        with fs.open_input_file(f"{root}/{action.path}") as f:
            part = pq.read_table(f, columns=list(keys))
        parts.append(part.append_column("__file", pa.repeat(pa.scalar(i), part.num_rows)))
    found = pa.concat_tables(parts)
    found = found.append_column("__pos", pa.array(np.arange(found.num_rows)))
    first = found.group_by(list(keys)).aggregate([("__pos", "min")]).column("__pos_min")
    if len(first) == found.num_rows:
        return adds, 0
    keep = np.zeros(found.num_rows, dtype=bool)
    keep[first.to_numpy()] = True
    starts = np.cumsum([0, *(p.num_rows for p in parts)])
    masks = iter([keep[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)])
    kept = rewrite_files(table_uri, storage_options, adds, lambda _rows: next(masks), tag)
    return kept, found.num_rows - len(first)


class RunCommits:
    """Everything one run will commit: base versions, pending files and removals, per table.

    ``pin`` records the version a table is read at; files workers wrote are
    ``add``-ed, driver-side rows ``write``-n, removals requested; ``commit``
    makes one Delta version of a table from all of it (removals planned on the
    version it commits on) and records what landed in ``versions`` and ``rows``.
    A scheduled run's ``transaction`` goes into every commit.
    """

    def __init__(
        self, store: TableStore, run_id: str, *, transaction: Transaction | None = None
    ) -> None:
        self.store = store
        self.run_id = run_id
        self.transaction = transaction
        self.base: dict[str, int | None] = {}
        self.pending: dict[str, list[AddAction]] = {}
        self.removals: dict[str, list[Removal | Rewrite]] = {}
        self.schemas: dict[str, pa.Schema] = {}
        self.properties: dict[str, dict[str, str]] = {}  # set with the table's next commit
        self.versions: dict[str, int] = {}
        self.rows: dict[str, int] = {}  # rows of this run's files each table took
        self.dropped: dict[str, int] = {}  # rows left out: the table had their key already

    def pin(self, *names: str) -> None:
        """Record the current version of each table (``None``: not created yet) as its base."""
        for name in names:
            self.base.setdefault(name, self.store.version(name))

    def base_version(self, name: str) -> int | None:
        self.pin(name)
        return self.base[name]

    def declare(
        self, name: str, schema: pa.Schema | None = None, properties: dict[str, str] | None = None
    ) -> pa.Schema:
        """Create the table before workers write under it; returns the schema every file of
        this table is cast to. ``properties`` describe the rows this run adds: a new table
        is created with them, an existing one gets them with the rows (in the commit's
        info, then as table properties), never before its rows."""
        self.pin(name)
        self.schemas[name] = schema or self.schemas.get(name) or TABLE_SCHEMAS[name]
        if properties:
            self.properties[name] = properties
        if not self.store.exists(name):
            self.store.ensure_table(name, self.schemas[name], properties=properties)
        return self.schemas[name]

    def add(self, name: str, actions: list[AddAction]) -> None:
        """Files a run's workers wrote under the table, to commit with it."""
        self.pending.setdefault(name, []).extend(actions)

    def write(self, name: str, rows: pa.Table) -> None:
        """Write driver-side rows (ledger entries, the run record) as one file of the table."""
        if rows.num_rows == 0:
            return
        schema = self.declare(name)
        uri = self.store.table_uri(name)
        self.add(
            name, [write_file(uri, self.store.storage_options, conform(rows, schema), self.run_id)]
        )

    def remove_rows(self, name: str, column: str, ids: pa.Array) -> None:
        """Remove the rows whose ``column`` is in ``ids`` in the table's next commit."""
        if len(ids) and self.base_version(name) is not None:
            ids = pa.chunked_array(ids).combine_chunks().cast(pa.string())
            self.removals.setdefault(name, []).append(Removal(column, ids))

    def replace_all(self, name: str) -> None:
        """Remove every row the table has at its next commit (a re-encode replaces them)."""
        if self.base_version(name) is not None:
            self.removals.setdefault(name, []).append(Removal())

    def rewrite(self, name: str, change: Callable[[pa.Table], pa.Table | None]) -> None:
        """Change rows in place in the table's next commit (``Rewrite``), alone in it."""
        if self.base_version(name) is not None:
            self.removals.setdefault(name, []).append(Rewrite(change))

    def pending_bytes(self, name: str) -> int:
        """Bytes of the files waiting to be committed to ``name``."""
        return sum(action.size for action in self.pending.get(name, []))

    def has_pending(self, name: str) -> bool:
        return bool(self.pending.get(name) or self.removals.get(name))

    def commit(self, name: str) -> int | None:
        """One Delta commit of everything pending for ``name``; ``None`` when there is nothing."""
        adds = self.pending.pop(name, [])
        removals = self.removals.pop(name, [])
        if not adds and not removals:
            return None
        done = commit_files(
            self.store.ensure_table(name, self.schemas.get(name)),
            self.store.storage_options,
            adds,
            run_id=self.run_id,
            keys=table_keys(name),
            base_version=self.base_version(name),
            removals=removals,
            transaction=self.transaction,
            owned=name in self.versions,  # this run put the slot on the table itself
            metadata=self.properties.get(name),
        )
        self.rows[name] = self.rows.get(name, 0) + done.rows
        self.dropped[name] = self.dropped.get(name, 0) + done.dropped
        if done.version is not None:
            self.versions[name] = done.version
            self.base[name] = done.version  # what follows is checked against this run's commit
            if name in self.properties:  # for readers of the properties; the commit has them
                self.store.set_properties(name, self.properties.pop(name))
        return done.version
