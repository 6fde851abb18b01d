"""A Ray Data sink that writes several store tables from one stream, one commit each.

Workers write Parquet files straight under each table's directory and return
Delta ``AddAction``s; the driver commits every table once, in
``on_write_complete``. Files of a job that dies before that are never
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
from features.schema import TABLE_SCHEMAS, conform
from features.store import FeatureStore

# route(block) -> ({table name: rows for it}, {outcome: count}); it decides which
# rows go where and counts the ones that go nowhere (e.g. already stored).
Router = Callable[[pa.Table], tuple[dict[str, pa.Table], dict[str, int]]]


class StoreSink(Datasink):
    """Route each block to store tables, write Parquet per table, commit once per table."""

    def __init__(
        self,
        store: FeatureStore,
        router: Router,
        *,
        run_id: str,
        tables: list[str],
        properties: dict[str, dict[str, str]] | None = None,
        deferred: tuple[str, ...] = (),
        base_versions: dict[str, int | None] | None = None,
        schemas: dict[str, pa.Schema] | None = None,
    ):
        self.store = store
        # tables whose files are written but left for the caller to commit (in
        # ``pending``), so one table can take rows from several stages in one commit
        self.deferred = deferred
        self.pending: dict[str, list[AddAction]] = {}
        # the version each table had when the run read it: keys committed by other
        # writers after it are dropped from this run's files at commit time
        self.base_versions = base_versions or {}
        # feature sets bring their own schema; the fixed tables use features.schema's
        self.schemas = {name: (schemas or {}).get(name) or TABLE_SCHEMAS[name] for name in tables}
        self.properties = properties or {}  # table -> metadata set when created
        self.router = router
        self.run_id = run_id
        self.tables = tables
        self.versions: dict[str, int] = {}
        self.counts: Counter[str] = Counter()

    def on_write_start(self, schema: Any = None) -> None:
        # Create missing tables before workers write into their directories.
        for name in self.tables:
            self.store.ensure_table(name, self.schemas[name], properties=self.properties.get(name))

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        parts: dict[str, list[pa.Table]] = {name: [] for name in self.tables}
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
        actions: dict[str, list[AddAction]] = {name: [] for name in self.tables}
        for result in write_result.write_returns:
            self.counts.update(result["counts"])
            for name, action in result["actions"].items():
                actions[name].append(action)
        for name, table_actions in actions.items():
            if name in self.deferred:
                self.pending[name] = table_actions
                continue
            version = self.store.commit(
                name,
                table_actions,
                run_id=self.run_id,
                base_version=self.base_versions.get(name),
            )
            if version is not None:
                self.versions[name] = version
