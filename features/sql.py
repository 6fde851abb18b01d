"""DuckDB SQL over a store's Delta tables, pinned to versions, with streamed output.

Naming: every table is a view under its store name (``samples``, ``_runs``,
``"features/clip"`` quoted because of the slash). A feature set is also
registered under its plain name (``clip``) unless that clashes with a base
table, and as ``features__clip``.

Versions, three ways, each explicit:

- inline: ``"samples@3"`` (or ``"samples@2024-05-01T12:00:00+00:00"``) reads
  that table at that version; one query can compare versions of a table;
- ``version={"samples": 3}`` pins named tables; a bare ``version=3`` is allowed
  only when the query reads a single store table (Delta versions of different
  tables are unrelated, so "all tables at 3" would mean nothing);
- ``as_of=<datetime | ISO string>``: every table at its last version at or
  before that time (tables created later are an error when read).

Tables are registered lazily: only the ones the query names are opened, so a
query over ``_runs`` does not read every Delta log of a large store.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal

import duckdb
import pyarrow as pa

from features.duck import connect
from features.errors import StoreError
from features.schema import FEATURES_PREFIX
from features.tables import TableStore, Version

Format = Literal["csv", "json", "parquet"]
FORMATS: tuple[str, ...] = ("csv", "json", "parquet")
BATCH_ROWS = 65_536
_MISSING = re.compile(r"Table with name (.+?) does not exist")
_SUGGESTION = re.compile(r' ?Did you mean "([^"]+)"\?')


def run_sql(
    store: TableStore,
    query: str,
    *,
    version: Version | Mapping[str, Version] = None,
    as_of: datetime | str | None = None,
) -> duckdb.DuckDBPyRelation:
    """A lazy DuckDB relation for ``query`` over the store's tables (see the module docstring).

    Nothing is read until the relation is fetched (``write_result``,
    ``.to_arrow_table()``, ``.to_arrow_reader(rows)``). Unknown tables or
    columns, SQL errors and bad versions raise ``StoreError`` with DuckDB's
    message and the store's table names.
    """
    con = connect()
    tables = store.tables()
    pins = _pins(version, tables)
    registered: dict[str, str] = {}  # SQL name -> store table it reads
    while True:
        try:
            return con.sql(query)
        except duckdb.CatalogException as e:
            match = _MISSING.search(str(e))
            sql_name = match.group(1) if match else None
            if sql_name is None or sql_name in registered:
                raise _sql_error(e, tables) from e
            table, inline = _resolve(sql_name, tables)
            if table is None:
                raise _sql_error(e, tables) from e
            at = _version_for(table, inline, pins, as_of, registered)
            con.register(sql_name, store.dataset(table, at))
            registered[sql_name] = table
        except duckdb.Error as e:
            raise _sql_error(e, tables) from e


def sql_names(table: str) -> list[str]:
    """The names a store table can be queried by (besides ``"table@version"``)."""
    if not table.startswith(FEATURES_PREFIX):
        return [table]
    plain = table[len(FEATURES_PREFIX) :]
    return [table, plain, table.replace("/", "__")]


def _resolve(sql_name: str, tables: list[str]) -> tuple[str | None, str | None]:
    """The store table (and inline version) behind a name the query used."""
    name, _, inline = sql_name.partition("@")
    for table in tables:
        if name in sql_names(table):
            # a base table wins over a feature set's plain name
            if name != table and name in tables:
                continue
            return table, inline or None
    return None, None


def _pins(version: Version | Mapping[str, Version], tables: list[str]) -> dict[str | None, Version]:
    """Version pins by store table (``None``: the bare version for a one-table query)."""
    if not isinstance(version, Mapping):
        return {} if version is None else {None: version}
    pins: dict[str | None, Version] = {}
    for name, at in version.items():
        table, _ = _resolve(name, tables)
        if table is None:
            raise StoreError(
                f"--version names unknown table {name!r} (tables: {', '.join(tables)})"
            )
        pins[table] = at
    return pins


def _version_for(
    table: str,
    inline: str | None,
    pins: dict[str | None, Version],
    as_of: datetime | str | None,
    registered: dict[str, str],
) -> Version:
    if inline is not None:
        return inline
    if table in pins:
        return pins[table]
    if None in pins:
        others = sorted({t for t in registered.values() if t != table})
        if others:
            raise StoreError(
                f"a bare version ({pins[None]!r}) applies to one table, but the query reads "
                f"{', '.join([*others, table])}; pin each as TABLE=VERSION, write "
                f'"{table}@{pins[None]}" in the query, or use --as-of'
            )
        return pins[None]
    return as_of


def _sql_error(e: duckdb.Error, tables: list[str]) -> StoreError:
    message = " ".join(str(e).split())
    # DuckDB's "did you mean" often points at its own catalog (pg_enum ...): keep store names only
    known = {n for t in tables for n in sql_names(t)}
    message = _SUGGESTION.sub(lambda m: m.group(0) if m.group(1) in known else "", message)
    names = ", ".join(n if "/" not in n else f'"{n}"' for n in tables) or "none yet"
    return StoreError(f"SQL failed: {message} (tables: {names})")


# ---- output ---------------------------------------------------------------------


def batches(relation: duckdb.DuckDBPyRelation, rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """The relation's result as record batches of at most ``rows``; DuckDB errors -> StoreError."""
    try:
        yield from relation.to_arrow_reader(rows)
    except duckdb.Error as e:
        raise StoreError(f"SQL failed: {' '.join(str(e).split())}") from e


def write_result(
    relation: duckdb.DuckDBPyRelation,
    fmt: Format,
    out: str | Path | IO[bytes],
    *,
    batch_rows: int = BATCH_ROWS,
) -> int:
    """Stream the result to ``out`` (a path or a binary file); returns rows written.

    ``csv`` has a header row; ``json`` is JSON Lines (one object per row, binary
    as base64, times as ISO 8601). Batches are written as DuckDB produces them,
    so memory stays bounded.
    """
    if fmt not in FORMATS:
        raise StoreError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    sink, close = _open_sink(out)
    try:
        return _WRITERS[fmt](batches(relation, batch_rows), sink)
    finally:
        if close:
            sink.close()
        else:
            sink.flush()


def _open_sink(out: str | Path | IO[bytes]) -> tuple[IO[bytes], bool]:
    if isinstance(out, str | Path):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        return open(out, "wb"), True  # noqa: SIM115 (closed by write_result)
    return out, False


def _write_csv(stream: Iterator[pa.RecordBatch], sink: IO[bytes]) -> int:
    import pyarrow.csv as pacsv

    rows, writer = 0, None
    for batch in stream:
        batch = _csv_safe(batch)
        writer = writer or pacsv.CSVWriter(sink, batch.schema)
        writer.write_batch(batch)
        rows += batch.num_rows
    if writer is not None:
        writer.close()
    return rows


def _csv_safe(batch: pa.RecordBatch) -> pa.RecordBatch:
    """CSV has no lists or structs: nested columns become JSON text, binary base64."""
    columns = []
    for column in batch.columns:
        if pa.types.is_nested(column.type) or pa.types.is_binary(column.type):
            column = pa.array([_json_text(v) for v in column.to_pylist()], pa.string())
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _write_json(stream: Iterator[pa.RecordBatch], sink: IO[bytes]) -> int:
    rows = 0
    for batch in stream:
        lines = [json.dumps(r, default=_json_default) for r in batch.to_pylist()]
        if lines:
            sink.write(("\n".join(lines) + "\n").encode())
        rows += batch.num_rows
    return rows


def _write_parquet(stream: Iterator[pa.RecordBatch], sink: IO[bytes]) -> int:
    import pyarrow.parquet as pq

    rows, writer = 0, None
    for batch in stream:
        writer = writer or pq.ParquetWriter(sink, batch.schema, compression="zstd")
        writer.write_batch(batch)
        rows += batch.num_rows
    if writer is not None:
        writer.close()
    return rows


_WRITERS = {"csv": _write_csv, "json": _write_json, "parquet": _write_parquet}
