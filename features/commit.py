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


def write_file(
    table_uri: str, storage_options: dict[str, str], rows: pa.Table, tag: str
) -> AddAction:
    """Write ``rows`` as one new Parquet file under the table; the action to commit it."""
    fs, root = filesystem_for(table_uri, storage_options)
    name = f"part-{tag}-{uuid.uuid4().hex}.parquet"
    with fs.open_output_stream(f"{root}/{name}") as out:
        pq.write_table(rows, out, compression="zstd")
    return add_action(name, fs.get_file_info(f"{root}/{name}").size, rows.num_rows)


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
    removes: list[RemoveAction] = []
    adds: list[AddAction] = []
    now = int(time.time() * 1000)
    for fragment in dt.to_pyarrow_dataset().get_fragments():
        rows = fragment.to_table()
        hit = pc.is_in(rows.column(column), value_set=ids)
        if not pc.any(hit).as_py():
            continue
        rel = fragment.path.rsplit("/", 1)[-1]
        removes.append(RemoveAction(path=rel, deletion_timestamp=now, data_change=True, size=None))
        remaining = rows.filter(pc.invert(hit))
        if remaining.num_rows:
            adds.append(write_file(dt.table_uri, storage_options, remaining, tag))
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


def commit_files(
    dt: DeltaTable,
    storage_options: dict[str, str],
    adds: list[AddAction],
    *,
    run_id: str,
    keys: Sequence[str] | None = None,
    base_version: int | None = None,
    removes: Sequence[RemoveAction] = (),
    transaction: Transaction | None = None,
) -> int | None:
    """Commit files as one version of ``dt``; ``None`` when nothing is left to commit.

    With ``keys``, rows whose key another writer committed after ``base_version``
    are dropped first; the commit never auto-rebases, so the check repeats
    until this commit lands on top of everything it checked against.
    """
    checked = base_version
    for _ in range(MAX_ATTEMPTS):
        dt.update_incremental()
        if keys is not None and checked != dt.version():
            clash = keys_since(dt, storage_options, checked, keys)
            if clash.num_rows:
                adds = rewrite_files(
                    dt.table_uri,
                    storage_options,
                    adds,
                    lambda rows, clash=clash: ~key_mask(rows, clash, keys),
                    run_id,
                )
            checked = dt.version()
        if not adds and not removes:
            return None
        rows = sum(json.loads(a.stats)["numRecords"] for a in adds)
        properties = CommitProperties(
            custom_metadata={RUN_ID_KEY: run_id, ROWS_KEY: str(rows)},
            max_commit_retries=0,
            app_transactions=[transaction] if transaction else None,
        )
        try:
            dt.create_write_transaction(
                actions=[*adds, *removes],
                mode="append",
                schema=dt.schema(),
                commit_properties=properties,
            )
        except CommitFailedError:
            if removes:  # a concurrent writer may have rewritten the same files
                raise StoreError(
                    f"{dt.table_uri}: another writer committed while this run was removing "
                    "rows; run it again to remove them against the new version"
                ) from None
            continue
        dt.update_incremental()
        return dt.version()
    raise StoreError(f"{dt.table_uri}: gave up after {MAX_ATTEMPTS} concurrent-commit retries")


class RunCommits:
    """Everything one run will commit: base versions, pending files and removals, per table.

    ``pin`` records the version a table is read at; files workers wrote are
    ``add``-ed, driver-side rows ``write``-n, removals planned against the pinned
    version; ``commit`` makes one Delta version of a table from all of it and
    records the version in ``versions``.
    """

    def __init__(self, store: TableStore, run_id: str) -> None:
        self.store = store
        self.run_id = run_id
        self.base: dict[str, int | None] = {}
        self.pending: dict[str, list[AddAction]] = {}
        self.removals: dict[str, list[RemoveAction]] = {}
        self.schemas: dict[str, pa.Schema] = {}
        self.versions: dict[str, int] = {}

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
        """Create the table (or set changed ``properties``) before workers write under it;
        returns the schema every file of this table is cast to."""
        self.pin(name)
        self.schemas[name] = schema or self.schemas.get(name) or TABLE_SCHEMAS[name]
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
        """Plan the removal of the rows whose ``column`` is in ``ids``, against the base version."""
        base = self.base_version(name)
        if base is None or len(ids) == 0:
            return
        removes, rewritten = rows_without(
            self.store.delta(name, base), self.store.storage_options, column, ids, self.run_id
        )
        self.removals.setdefault(name, []).extend(removes)
        self.add(name, rewritten)

    def replace_all(self, name: str) -> None:
        """Plan the removal of every row of the base version (a re-encode replaces them)."""
        base = self.base_version(name)
        if base is not None:
            self.removals.setdefault(name, []).extend(remove_all(self.store.delta(name, base)))

    def has_pending(self, name: str) -> bool:
        return bool(self.pending.get(name) or self.removals.get(name))

    def commit(self, name: str, *, transaction: Transaction | None = None) -> int | None:
        """One Delta commit of everything pending for ``name``; ``None`` when there is nothing."""
        adds = self.pending.pop(name, [])
        removes = self.removals.pop(name, [])
        if not adds and not removes:
            return None
        version = commit_files(
            self.store.ensure_table(name, self.schemas.get(name)),
            self.store.storage_options,
            adds,
            run_id=self.run_id,
            keys=table_keys(name),
            base_version=self.base_version(name),
            removes=removes,
            transaction=transaction,
        )
        if version is not None:
            self.versions[name] = version
        return version
