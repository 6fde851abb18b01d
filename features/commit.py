"""One Delta commit per table per run, safe against concurrent writers and retries.

Delta's optimistic concurrency lets two appends commit side by side, which
would let two concurrent refreshes both add the same new sample ids. So a run
commits against the version it started from (``base_version``): keys other
writers committed since then are dropped from this run's files (rewritten
without them) before the commit, and the commit itself is attempted with no
automatic rebase, so a writer that slips in between is detected and the
check runs again. Removals (rows whose inputs disappeared) are file rewrites
in the same transaction, so a table still gets one commit per run.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction, RemoveAction, Transaction

from features.errors import StoreError
from features.storage import filesystem_for

RUN_ID_KEY = "mmfp.run_id"
ROWS_KEY = "mmfp.rows"  # rows a commit added; delta-rs records no metrics for raw add actions
MAX_ATTEMPTS = 8


def add_action(path: str, size: int, rows: int) -> AddAction:
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


def _key_set(table: pa.Table, keys: Sequence[str]) -> set[tuple]:
    return set(zip(*(table.column(k).to_pylist() for k in keys), strict=True))


def _key_mask(table: pa.Table, keys: Sequence[str], drop: set[tuple]) -> pa.Array:
    rows = zip(*(table.column(k).to_pylist() for k in keys), strict=True)
    return pa.array([row not in drop for row in rows], pa.bool_())


def committed_keys_since(
    dt: DeltaTable,
    storage_options: dict[str, str],
    base_version: int | None,
    keys: Sequence[str],
) -> set[tuple]:
    """Keys added to the table after ``base_version`` (all keys when it is None)."""
    latest = _key_set(dt.to_pyarrow_dataset().to_table(columns=list(keys)), keys)
    if base_version is None or base_version == dt.version():
        return latest if base_version is None else set()
    before = DeltaTable(dt.table_uri, storage_options=storage_options or None)
    before.load_as_version(base_version)
    return latest - _key_set(before.to_pyarrow_dataset().to_table(columns=list(keys)), keys)


def drop_keys_from_files(
    table_uri: str,
    storage_options: dict[str, str],
    actions: list[AddAction],
    keys: Sequence[str],
    drop: set[tuple],
    tag: str,
) -> list[AddAction]:
    """Rewrite this run's (uncommitted) files without the rows whose key is in ``drop``."""
    if not drop:
        return actions
    return filter_files(
        table_uri, storage_options, actions, lambda rows: _key_mask(rows, keys, drop), tag
    )


def filter_files(
    table_uri: str,
    storage_options: dict[str, str],
    actions: list[AddAction],
    keep: Callable[[pa.Table], pa.Array],
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
        if pc.all(mask).as_py():
            kept.append(action)
            continue
        remaining = rows.filter(mask)
        if remaining.num_rows:
            kept.append(write_file(table_uri, storage_options, remaining, tag))
        fs.delete_file(path)  # never committed: nobody can be reading it
    return kept


def rewrite_without(
    dt: DeltaTable, storage_options: dict[str, str], column: str, ids: Iterable[str], tag: str
) -> tuple[list[RemoveAction], list[AddAction]]:
    """Remove + add actions that delete the rows whose ``column`` is in ``ids``."""
    ids = pa.array(sorted(set(ids)), pa.string())
    if len(ids) == 0:
        return [], []
    removes: list[RemoveAction] = []
    adds: list[AddAction] = []
    now = int(time.time() * 1000)
    uri = dt.table_uri
    for fragment in dt.to_pyarrow_dataset().get_fragments():
        rows = fragment.to_table()
        hit = pc.is_in(rows.column(column), value_set=ids)
        if not pc.any(hit).as_py():
            continue
        rel = fragment.path.rsplit("/", 1)[-1]
        removes.append(RemoveAction(path=rel, deletion_timestamp=now, data_change=True, size=None))
        remaining = rows.filter(pc.invert(hit))
        if remaining.num_rows:
            adds.append(write_file(uri, storage_options, remaining, tag))
    return removes, adds


def remove_all(dt: DeltaTable) -> list[RemoveAction]:
    """Remove actions for every file of the current version (a full replacement)."""
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


def commit_run(
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
    """Commit this run's files as one version; ``None`` when nothing is left to commit.

    With ``keys``, rows whose key another writer committed after ``base_version``
    are dropped first; the commit never auto-rebases, so the check repeats
    until this run's commit lands on top of everything it checked against.
    """
    checked = base_version
    for _ in range(MAX_ATTEMPTS):
        dt.update_incremental()
        if keys is not None and checked != dt.version():
            clash = committed_keys_since(dt, storage_options, checked, keys)
            adds = drop_keys_from_files(dt.table_uri, storage_options, adds, keys, clash, run_id)
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
