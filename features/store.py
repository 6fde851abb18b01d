"""FeatureStore: a directory or object-storage prefix of Delta tables.

Reads go through deltalake (Arrow, pandas, DuckDB) or Ray Data's
``read_delta``; writes are Parquet files written by Ray workers and committed
by the driver as one Delta transaction per table per run (see ``sink.py``), so
a killed job leaves the previous version intact.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError
from deltalake.transaction import AddAction, RemoveAction, Transaction

from features.commit import ROWS_KEY, RUN_ID_KEY, commit_run
from features.errors import StoreError
from features.schema import TABLE_SCHEMAS, conform, table_keys
from features.storage import filesystem_for, join_uri, normalize_uri

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

Version = int | datetime | str | None


class FeatureStore:
    """Versioned Delta tables under one root: ``samples``, ``quarantine``, ``_runs``, ...

    ``version`` arguments take a Delta version number, a ``datetime`` or an
    ISO-8601 string (time travel to the last version at or before it).
    """

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.uri = normalize_uri(uri)
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"FeatureStore({self.uri!r})"

    def table_uri(self, name: str) -> str:
        return join_uri(self.uri, *name.split("/"))

    # ---- reading -----------------------------------------------------------

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.table_uri(name), storage_options=self.storage_options)

    def tables(self) -> list[str]:
        """Names of the Delta tables in the store (``features/<name>`` included)."""
        fs, root = filesystem_for(self.uri, self.storage_options)
        names = [*_subdirs(fs, root), *(f"features/{n}" for n in _subdirs(fs, f"{root}/features"))]
        return sorted(n for n in names if self.exists(n))

    def delta(self, name: str, version: Version = None) -> DeltaTable:
        """The ``deltalake.DeltaTable`` for ``name`` at ``version`` (latest by default)."""
        try:
            dt = DeltaTable(self.table_uri(name), storage_options=self.storage_options)
        except TableNotFoundError as e:
            known = ", ".join(self.tables()) or "none yet"
            raise StoreError(f"no table {name!r} in store {self.uri} (tables: {known})") from e
        if version is not None:
            try:
                dt.load_as_version(version)
            except Exception as e:
                raise StoreError(
                    f"table {name!r} has no version {version!r} "
                    f"(versions 0..{dt.version()}; see `mmfp store history {name}`)"
                ) from e
        return dt

    def version(self, name: str) -> int | None:
        """Latest version of ``name``, or ``None`` when the table does not exist yet."""
        return self.delta(name).version() if self.exists(name) else None

    def to_arrow(
        self,
        name: str,
        version: Version = None,
        *,
        columns: list[str] | None = None,
        filter: Any = None,
    ) -> pa.Table:
        dt = self.delta(name, version)
        _check_columns(name, dt, columns)
        return dt.to_pyarrow_dataset().to_table(columns=columns, filter=filter)

    def to_pandas(
        self, name: str, version: Version = None, *, columns: list[str] | None = None
    ) -> pd.DataFrame:
        return self.to_arrow(name, version, columns=columns).to_pandas()

    def table(
        self, name: str, version: Version = None, *, columns: list[str] | None = None
    ) -> ray.data.Dataset:
        """A Ray Dataset over ``name`` at a pinned version, read by Ray workers in parallel."""
        import ray.data

        dt = self.delta(name, version)
        _check_columns(name, dt, columns)
        return ray.data.read_delta(
            self.table_uri(name),
            version=dt.version(),
            storage_options=self.storage_options or None,
            columns=columns,
        )

    def history(self, name: str) -> list[dict[str, Any]]:
        """One dict per version, newest first: version, time, operation, rows added, run id."""
        rows = []
        for entry in self.delta(name).history():
            metrics = entry.get("operationMetrics") or {}
            rows.append(
                {
                    "version": entry.get("version"),
                    "timestamp": datetime.fromtimestamp(entry["timestamp"] / 1000).astimezone(),
                    "operation": entry.get("operation"),
                    "rows_added": _int(metrics.get("num_added_rows", entry.get(ROWS_KEY))),
                    "files_added": metrics.get("num_added_files"),
                    "run_id": entry.get(RUN_ID_KEY),
                }
            )
        return rows

    def sql(self, query: str) -> pa.Table:
        """DuckDB SQL over the store's tables at their latest versions, named as in ``tables()``."""
        import duckdb

        con = duckdb.connect()
        for name in self.tables():
            con.register(name.replace("/", "__"), self.delta(name).to_pyarrow_dataset())
        try:
            return con.sql(query).to_arrow_table()
        except duckdb.Error as e:
            raise StoreError(f"SQL failed: {e}") from e

    # ---- writing -----------------------------------------------------------

    def ensure_table(
        self,
        name: str,
        schema: pa.Schema | None = None,
        *,
        properties: dict[str, str] | None = None,
    ) -> DeltaTable:
        """Open ``name``, creating it empty with its explicit schema when it does not exist.

        ``properties`` (table metadata such as a label vocabulary) go into the
        create commit; on an existing table they are set only when they changed.
        """
        if self.exists(name):
            if properties:
                self.set_properties(name, properties)
            return self.delta(name)
        return DeltaTable.create(
            self.table_uri(name),
            schema=schema or TABLE_SCHEMAS[name],
            mode="ignore",
            name=name.replace("/", "__"),
            configuration=properties,
            raise_if_key_not_exists=False,
            storage_options=self.storage_options,
        )

    def commit(
        self,
        name: str,
        actions: list[AddAction],
        *,
        run_id: str,
        base_version: int | None = None,
        removes: Sequence[RemoveAction] = (),
        transaction: Transaction | None = None,
    ) -> int | None:
        """Commit Parquet files already written under the table as one Delta version.

        Rows whose key (``TABLE_KEYS``) another writer committed since
        ``base_version`` are dropped first, so concurrent runs never duplicate
        a key. Returns the new version, or ``None`` (and no commit) when there
        is nothing to add or remove.
        """
        if not actions and not removes:
            return None
        return commit_run(
            self.ensure_table(name),
            self.storage_options,
            actions,
            run_id=run_id,
            keys=table_keys(name),
            base_version=base_version,
            removes=removes,
            transaction=transaction,
        )

    def append(
        self,
        name: str,
        table: pa.Table,
        *,
        run_id: str,
        transaction: Transaction | None = None,
    ) -> int | None:
        """Append a small driver-side Arrow table (run records) as one commit."""
        if table.num_rows == 0:
            return None
        self.ensure_table(name)
        write_deltalake(
            self.table_uri(name),
            conform(table, TABLE_SCHEMAS[name]),
            mode="append",
            storage_options=self.storage_options,
            commit_properties=CommitProperties(
                custom_metadata={RUN_ID_KEY: run_id, ROWS_KEY: str(table.num_rows)},
                app_transactions=[transaction] if transaction else None,
            ),
        )
        return self.delta(name).version()

    def set_properties(self, name: str, properties: dict[str, str]) -> None:
        """Record table-level metadata (e.g. a label vocabulary); commits only on change."""
        dt = self.delta(name)
        current = dt.metadata().configuration
        if any(current.get(k) != v for k, v in properties.items()):
            dt.alter.set_table_properties(properties, raise_if_not_exists=False)

    def properties(self, name: str, version: Version = None) -> dict[str, str]:
        return dict(self.delta(name, version).metadata().configuration)

    def column_values(self, name: str, column: str, version: Version = None) -> pa.Array:
        """One column at a version (e.g. the committed ids a run anti-joins against)."""
        if not self.exists(name):
            return pa.array([], pa.string())
        return self.to_arrow(name, version, columns=[column]).column(column).combine_chunks()


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _subdirs(fs: pafs.FileSystem, path: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [i.base_name for i in infos if i.type == pafs.FileType.Directory]


def _check_columns(name: str, dt: DeltaTable, columns: list[str] | None) -> None:
    if not columns:
        return
    have = [f.name for f in dt.schema().fields]
    missing = [c for c in columns if c not in have]
    if missing:
        raise StoreError(f"table {name!r} has no column(s) {missing}; columns: {', '.join(have)}")
