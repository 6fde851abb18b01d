"""A sink that writes several store tables from one stream, as Parquet files only.

Each call routes its blocks to their tables, writes one Parquet file per table
straight under the table's directory, and returns Delta ``AddAction``s; the
sink gathers them in ``files`` for the run to commit (``features.commit``).
On Ray, ``features.ray_sink`` runs the same ``write`` in the tasks of a Ray Data
``Datasink``; a run in the CLI process calls it directly, without importing Ray.
It never commits: files of a job that dies before the commit are never
referenced by the log, so readers never see them and ``vacuum`` removes them.
Ray's own ``write_delta`` commits one table per dataset; a pipeline stage
that produces samples and quarantine rows in one pass needs several.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa
from deltalake.transaction import AddAction

from features.commit import write_file
from features.schema import conform
from features.tables import TableStore

# route(block) -> ({table name: rows for it}, {outcome: count}); it decides which
# rows go where and counts the ones that go nowhere (e.g. already stored).
Router = Callable[[pa.Table], tuple[dict[str, pa.Table], dict[str, int]]]


class StoreSink:
    """Route each block to store tables and write one Parquet file per table and call."""

    def __init__(
        self, store: TableStore, router: Router, *, run_id: str, schemas: dict[str, pa.Schema]
    ) -> None:
        self.store = store
        self.router = router
        self.run_id = run_id
        self.schemas = schemas  # table -> the schema its files are cast to
        self.files: dict[str, list[AddAction]] = {name: [] for name in schemas}
        self.counts: Counter[str] = Counter()

    def write(self, blocks: Iterable[pa.Table]) -> dict[str, Any]:
        """One file per table for ``blocks``; returns what ``record`` takes."""
        parts: dict[str, list[pa.Table]] = {name: [] for name in self.schemas}
        counts: Counter[str] = Counter()
        for block in blocks:
            routed, block_counts = self.router(block)
            counts.update(block_counts)
            for name, rows in routed.items():
                if rows.num_rows:
                    parts[name].append(rows)
        actions = {
            name: self._write_file(name, pa.concat_tables(tables))
            for name, tables in parts.items()
            if tables
        }
        return {"actions": actions, "counts": dict(counts)}

    def _write_file(self, name: str, rows: pa.Table) -> AddAction:
        rows = conform(rows, self.schemas[name])
        return write_file(self.store.table_uri(name), self.store.storage_options, rows, self.run_id)

    def record(self, result: dict[str, Any]) -> None:
        """Take one ``write`` call's files and counts (Ray's tasks, or a run in process)."""
        self.counts.update(result["counts"])
        for name, action in result["actions"].items():
            self.files[name].append(action)
