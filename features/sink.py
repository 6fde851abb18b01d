"""A Ray Data sink that writes several store tables from one stream, as Parquet files only.

Workers route each block to its tables, write one Parquet file per table
straight under the table's directory, and return Delta ``AddAction``s; the
sink gathers them in ``files`` for the run to commit (``features.commit``).
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
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from features.commit import write_file
from features.schema import conform
from features.tables import TableStore

# route(block) -> ({table name: rows for it}, {outcome: count}); it decides which
# rows go where and counts the ones that go nowhere (e.g. already stored).
Router = Callable[[pa.Table], tuple[dict[str, pa.Table], dict[str, int]]]


class StoreSink(Datasink):
    """Route each block to store tables and write one Parquet file per table and task."""

    def __init__(
        self, store: TableStore, router: Router, *, run_id: str, schemas: dict[str, pa.Schema]
    ) -> None:
        self.store = store
        self.router = router
        self.run_id = run_id
        self.schemas = schemas  # table -> the schema its files are cast to
        self.files: dict[str, list[AddAction]] = {name: [] for name in schemas}
        self.counts: Counter[str] = Counter()

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        parts: dict[str, list[pa.Table]] = {name: [] for name in self.schemas}
        counts: Counter[str] = Counter()
        for block in blocks:
            routed, block_counts = self.router(BlockAccessor.for_block(block).to_arrow())
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

    def on_write_complete(self, write_result: Any) -> None:
        for result in write_result.write_returns:
            self.record(result)

    def record(self, result: dict[str, Any]) -> None:
        """Take one ``write`` call's files and counts (Ray's tasks, or a run in process)."""
        self.counts.update(result["counts"])
        for name, action in result["actions"].items():
            self.files[name].append(action)
