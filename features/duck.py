"""The one door to DuckDB: every SQL reader of the store opens its connection here.

Tables reach DuckDB only as registered Arrow datasets. The connection cannot
scan Python variables that share a table's name, cannot read or write files,
attach databases or load extensions, and its settings are locked, so a query
string cannot turn any of that back on.
"""

from __future__ import annotations

import duckdb

_SETTINGS = (
    "SET python_enable_replacements = false",  # no scans of the caller's Python variables
    "SET autoinstall_known_extensions = false",  # never download an extension
    "SET autoload_known_extensions = false",
    # no read_csv('/etc/...'), COPY TO, ATTACH, INSTALL (enable_external_access = false
    # would do too, but it needs the process's working directory, which Ray may have removed)
    "SET disabled_filesystems = 'LocalFileSystem'",
    "SET lock_configuration = true",  # and a query cannot SET any of it back
)


def connect(tables: dict[str, object] | None = None) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory connection with ``tables`` (SQL name -> Arrow object) registered."""
    con = duckdb.connect()
    for setting in _SETTINGS:
        con.execute(setting)
    for name, data in (tables or {}).items():
        con.register(name, data)
    return con
