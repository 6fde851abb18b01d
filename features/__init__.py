"""The mmfp feature store: versioned Delta tables of samples, views and feature sets.

``FeatureStore(uri)`` opens a store (a local path or ``s3://bucket/prefix``);
read tables as Arrow, pandas or Ray Datasets at any version, query them with
DuckDB SQL, search feature sets by vector, and keep the store tidy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from features.lazy import lazy_exports

if TYPE_CHECKING:
    from features.errors import MmfpError, StoreError
    from features.metadata import ColumnMeta, EncoderMeta, FeatureSetMeta
    from features.search import search
    from features.sql import run_sql, write_result
    from features.store import FeatureStore
    from features.tables import TableStore, Version, parse_version

# name -> module, imported on first use: a worker writing Parquet files must not
# import DuckDB and the search code with the package
_PUBLIC = {
    "MmfpError": "features.errors",
    "StoreError": "features.errors",
    "ColumnMeta": "features.metadata",
    "EncoderMeta": "features.metadata",
    "FeatureSetMeta": "features.metadata",
    "search": "features.search",
    "run_sql": "features.sql",
    "write_result": "features.sql",
    "FeatureStore": "features.store",
    "TableStore": "features.tables",
    "Version": "features.tables",
    "parse_version": "features.tables",
}


__getattr__ = lazy_exports(__name__, _PUBLIC)


__all__ = [
    "ColumnMeta",
    "EncoderMeta",
    "FeatureSetMeta",
    "FeatureStore",
    "MmfpError",
    "StoreError",
    "TableStore",
    "Version",
    "parse_version",
    "run_sql",
    "search",
    "write_result",
]
