"""Keeping a store: version diffs, file upkeep and lineage.

- ``diff``: rows added and removed between two versions of a table, by key,
  reading only the files one version has and the other does not;
- ``vacuum`` / ``optimize``: Delta's own file upkeep over every table, with
  Delta's retention rule kept unless forced;
- ``lineage``: each version of a table with the run that wrote it, from the
  commit metadata and ``_runs``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from deltalake.exceptions import DeltaError

from features.errors import StoreError
from features.keys import changed_keys
from features.leases import live_runs, written_by
from features.schema import TABLE_KEYS, table_keys
from features.snapshots import SNAPSHOT_DIR
from features.snapshots import stale as stale_snapshots
from features.storage import filesystem_for
from features.tables import TableStore, Version

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
    key = table_keys(table)
    if key is None:
        raise StoreError(f"no key known for table {table!r}; known: {', '.join(TABLE_KEYS)}")
    return list(key)


def diff(store: TableStore, table: str, v1: Version, v2: Version = None) -> TableDiff:
    """Rows (by key) in ``v2`` and not ``v1`` (added) and in ``v1`` and not ``v2`` (removed).

    ``v2`` defaults to the latest version; either may be a time.
    """
    key = table_key(table)
    old, new = store.delta(table, v1), store.delta(table, v2)
    changes = changed_keys(old, new, key)
    order = [(k, "ascending") for k in key]
    return TableDiff(
        table=table,
        v1=old.version(),
        v2=new.version(),
        added=changes.added.sort_by(order),
        removed=changes.removed.sort_by(order),
        files_added=changes.files_added,
        files_removed=changes.files_removed,
        rewritten=changes.rewritten,
    )


# ---- file upkeep --------------------------------------------------------------------


def vacuum(
    store: TableStore,
    *,
    retention_hours: int | None = None,
    dry_run: bool = True,
    force: bool = False,
) -> dict[str, list[str]]:
    """Files that no version within the retention window needs, per table: listed, or deleted.

    Covers files removed by later commits and files no commit ever referenced
    (left by a killed run), and the search snapshots (``features.snapshots``, listed
    under ``_snapshots``) of every data file that is deleted or gone.
    ``retention_hours`` defaults to each table's
    ``delta.deletedFileRetentionDuration`` (7 days); a shorter one is refused
    unless ``force``: it breaks time travel to older versions. Files of a run
    that is still writing (a live lease, ``features.leases``) are never
    touched, whatever the retention. Every table is checked before any file is
    deleted, so a refusal deletes nothing.
    """
    plan: dict[str, list[str]] = {}
    refused = []
    for table in store.tables():
        try:
            plan[table] = _vacuum_plan(store, table, retention_hours, force=force)
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
    live = live_runs(store)  # read after listing: a run that starts later has newer files
    plan = {t: [p for p in paths if not written_by(p, live)] for t, paths in plan.items()}
    snapshot_files = stale_snapshots(store, plan)
    if not dry_run:
        for table, paths in plan.items():
            _delete(store, store.table_uri(table), paths)
        _delete(store, store.uri, snapshot_files)
    return {**plan, SNAPSHOT_DIR: snapshot_files} if snapshot_files else plan


def _delete(store: TableStore, uri: str, paths: list[str]) -> None:
    fs, root = filesystem_for(uri, store.storage_options)
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # another vacuum was first
            fs.delete_file(f"{root}/{path}")


def _vacuum_plan(store: TableStore, table: str, hours: int | None, *, force: bool) -> list[str]:
    return store.delta(table).vacuum(
        retention_hours=hours, dry_run=True, enforce_retention_duration=not force, full=True
    )


def optimize(store: TableStore, table: str, *, target_size: int | None = None) -> dict[str, Any]:
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


def lineage(store: TableStore, table: str) -> list[dict[str, Any]]:
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
