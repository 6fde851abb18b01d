"""TableStore: the Delta tables under one root, opened at versions, read as Arrow or Ray.

This is the core every reader and writer builds on, and the one owner of
version resolution: every command and function that takes a version passes it
to ``TableStore.delta``, which accepts a version number (``3`` or ``"3"``), a
``datetime`` or an ISO-8601 string (time travel to the last version at or
before that time). ``features.store.FeatureStore`` is the public class: this
core plus the questions users ask (SQL, search, maintenance).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from deltalake import DeltaTable
from deltalake import Field as DeltaField
from deltalake.exceptions import DeltaError, TableNotFoundError

from features.errors import StoreError
from features.schema import TABLE_SCHEMAS
from features.storage import filesystem_for, join_uri, normalize_uri

if TYPE_CHECKING:  # pyarrow.dataset imports pandas (0.2-0.3 s): deltalake loads it on a read
    import pandas as pd
    import pyarrow.dataset as pads
    import ray.data

Version = int | datetime | str | None

RUN_ID_KEY = "mmfp.run_id"  # commit metadata: the run that wrote a version
ROWS_KEY = "mmfp.rows"  # rows a commit added; delta-rs records no metrics for raw add actions


def string_field(name: str) -> pc.Expression:
    """A string column in a read filter. Files that another Delta writer rewrote
    (delta-rs ``delete`` / ``update`` / ``merge``) store strings as ``string_view``, which
    a filter cannot compare with a string literal; the cast reads both kinds alike."""
    return pc.field(name).cast(pa.string())


def parse_version(version: int | datetime | str) -> int | datetime:
    """A version number or a time: ``"3"`` -> 3, ISO-8601 text -> an aware ``datetime``.

    A naive time is local time.
    """
    if isinstance(version, str):
        text = version.strip()
        if text.isdigit():
            return int(text)
        try:
            version = datetime.fromisoformat(text)
        except ValueError as e:
            raise StoreError(
                f"bad version or time {version!r}: give a version number or an ISO 8601 time "
                "such as 2024-05-01T12:00:00+00:00"
            ) from e
    if isinstance(version, datetime):
        return version if version.tzinfo else version.astimezone()
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise StoreError(f"bad version {version!r}: a version is a number >= 0 or a time")
    return version


class TableStore:
    """Versioned Delta tables under one root: ``samples``, ``quarantine``, ``_runs``, ...

    ``version`` arguments take anything ``parse_version`` reads; ``None`` is latest.
    """

    def __init__(self, uri: str, *, storage_options: dict[str, str] | None = None) -> None:
        self.uri = normalize_uri(uri)
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def table_uri(self, name: str) -> str:
        return join_uri(self.uri, *name.split("/"))

    # ---- opening -------------------------------------------------------------

    def exists(self, name: str) -> bool:
        return DeltaTable.is_deltatable(self.table_uri(name), storage_options=self.storage_options)

    def tables(self) -> list[str]:
        """Names of the Delta tables in the store (``features/<name>`` included)."""
        fs, root = filesystem_for(self.uri, self.storage_options)
        names = [*_subdirs(fs, root), *(f"features/{n}" for n in _subdirs(fs, f"{root}/features"))]
        return sorted(n for n in names if self.exists(n))

    def delta(self, name: str, version: Version = None) -> DeltaTable:
        """The ``deltalake.DeltaTable`` for ``name`` at ``version`` (latest by default).

        A time before the table's first commit is refused (delta-rs would load
        version 0, and a read "as of" then must not see rows that did not exist).
        """
        try:
            dt = DeltaTable(self.table_uri(name), storage_options=self.storage_options)
        except TableNotFoundError as e:
            known = ", ".join(self.tables()) or "none yet"
            raise StoreError(f"no table {name!r} in store {self.uri} (tables: {known})") from e
        if version is None:
            return dt
        at = parse_version(version)
        latest = dt.version()
        if isinstance(at, datetime):
            created = _commit_time(dt.history()[-1])
            if at < created:
                raise StoreError(
                    f"table {name!r} did not exist at {at:%Y-%m-%d %H:%M:%S%z} "
                    f"(created {created:%Y-%m-%d %H:%M:%S%z})"
                )
        elif at > latest:
            raise StoreError(
                f"table {name!r} has no version {at} "
                f"(versions 0..{latest}; see `mmfp store history {name}`)"
            )
        try:
            dt.load_as_version(at)
        except Exception as e:  # delta-rs raises several types for a version it cannot load
            raise StoreError(
                f"table {name!r} has no version {version!r} "
                f"(versions 0..{latest}; see `mmfp store history {name}`): {e}"
            ) from e
        return dt

    def version(self, name: str) -> int | None:
        """Latest version of ``name``, or ``None`` when the table does not exist yet."""
        return self.delta(name).version() if self.exists(name) else None

    def dataset(self, name: str, version: Version = None) -> pads.Dataset:
        """The version's Parquet files as a pyarrow dataset, read through pyarrow's own
        filesystem (local or S3): it scans large columns (embeddings) about twice as fast
        as deltalake's default Python filesystem handler."""
        return self.dataset_of(name, self.delta(name, version))

    def dataset_of(self, name: str, dt: DeltaTable) -> pads.Dataset:
        """``dataset`` for a ``DeltaTable`` already opened at its version."""
        fs, root = filesystem_for(self.table_uri(name), self.storage_options)
        return dt.to_pyarrow_dataset(filesystem=pafs.SubTreeFileSystem(root, fs))

    # ---- reading -------------------------------------------------------------

    def to_arrow(
        self,
        name: str,
        version: Version = None,
        *,
        columns: list[str] | None = None,
        filter: Any = None,
    ) -> pa.Table:
        return self.scanner(name, version, columns=columns, filter=filter).to_table()

    def scanner(
        self,
        name: str,
        version: Version = None,
        *,
        columns: list[str] | None = None,
        filter: Any = None,
        **options: Any,
    ) -> pads.Scanner:
        """``to_arrow`` as a stream of record batches (``to_batches``): a reader holds a
        few batches, not the table (``options``: pyarrow's, e.g. its read-ahead)."""
        dt = self.delta(name, version)
        _check_columns(name, dt, columns)
        return self.dataset_of(name, dt).scanner(columns=columns, filter=filter, **options)

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

    def column_values(self, name: str, column: str, version: Version = None) -> pa.Array:
        """One column at a version; empty when the table does not exist yet."""
        if not self.exists(name):
            return pa.array([], pa.string())
        return self.to_arrow(name, version, columns=[column]).column(column).combine_chunks()

    def history(self, name: str) -> list[dict[str, Any]]:
        """One dict per version, newest first: version, time, operation, rows added, run id."""
        rows = []
        for entry in self.delta(name).history():
            metrics = entry.get("operationMetrics") or {}
            rows.append(
                {
                    "version": entry.get("version"),
                    "timestamp": _commit_time(entry),
                    "operation": entry.get("operation"),
                    "rows_added": _int(metrics.get("num_added_rows", entry.get(ROWS_KEY))),
                    "files_added": metrics.get("num_added_files"),
                    "run_id": entry.get(RUN_ID_KEY),
                }
            )
        return rows

    def properties(self, name: str, version: Version = None) -> dict[str, str]:
        return dict(self.delta(name, version).metadata().configuration)

    # ---- creating ------------------------------------------------------------

    def ensure_table(
        self,
        name: str,
        schema: pa.Schema | None = None,
        *,
        properties: dict[str, str] | None = None,
    ) -> DeltaTable:
        """Open ``name``, creating it empty with its explicit schema when it does not exist.

        ``properties`` (table metadata such as a label vocabulary) go into the
        create commit; on an existing table they are set only when they changed. A
        store's own table made by an older mmfp gets the columns added since.
        """
        if self.exists(name):
            if properties:
                self.set_properties(name, properties)
            if name in TABLE_SCHEMAS:
                self._add_new_columns(name, TABLE_SCHEMAS[name])
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

    def _add_new_columns(self, name: str, schema: pa.Schema) -> None:
        """Add ``schema``'s nullable columns the table lacks (older rows read as null)."""
        dt = self.delta(name)
        have = set(dt.schema().to_arrow().names)
        new = [f for f in schema if f.name not in have and f.nullable]
        if not new:
            return
        try:
            dt.alter.add_columns([DeltaField.from_arrow(f) for f in new])
        except DeltaError:  # a second writer added them first: fine when they are there now
            if not set(f.name for f in new) <= set(self.delta(name).schema().to_arrow().names):
                raise

    def set_properties(self, name: str, properties: dict[str, str]) -> None:
        """Record table-level metadata (e.g. a label vocabulary); commits only on change."""
        dt = self.delta(name)
        current = dt.metadata().configuration
        if any(current.get(k) != v for k, v in properties.items()):
            dt.alter.set_table_properties(properties, raise_if_not_exists=False)


def _commit_time(entry: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(entry["timestamp"] / 1000).astimezone()


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
