"""FeatureStore: a directory or object-storage prefix of Delta tables, and what you ask of it.

The public entry point of the store (``from features import FeatureStore``):
``TableStore``'s tables, versions and reads (``features.tables``), plus SQL,
vector search, stats and maintenance, each a thin call into the module that
owns it, imported on first use (a build never loads DuckDB or the search code).
Versions are a number, a ``datetime`` or an ISO-8601 string everywhere
(``features.tables.parse_version``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from features.tables import TableStore, Version

if TYPE_CHECKING:
    from features.maintenance import TableDiff
    from features.metadata import FeatureSetMeta


class FeatureStore(TableStore):
    """Versioned Delta tables under one root: ``samples``, ``quarantine``, ``views``,
    ``features/<name>``, ``_runs``; read with ``to_arrow`` / ``to_pandas`` / ``table`` (Ray),
    queried with ``sql`` and ``search``."""

    def sql(
        self,
        query: str,
        *,
        version: Version | Mapping[str, Version] = None,
        as_of: datetime | str | None = None,
    ) -> pa.Table:
        """DuckDB SQL over the store's tables (``samples``, ``clip`` or ``"features/clip"``,
        ``"samples@3"`` for a version); see ``features.sql.run_sql``."""
        from features.sql import run_sql

        return run_sql(self, query, version=version, as_of=as_of).to_arrow_table()

    def search(
        self,
        feature_set: str,
        *,
        vector: Any = None,
        sample_id: str | None = None,
        k: int = 10,
        where: str | None = None,
        column: str | None = None,
        version: Version = None,
        method: Literal["exact", "ann"] = "exact",
        cache: bool = False,
    ) -> pa.Table:
        """Top-``k`` rows of a feature set by cosine similarity to ``vector`` or to a stored
        sample's own embedding; see ``features.search.search``."""
        from features.search import search as search_feature_set

        return search_feature_set(
            self,
            feature_set,
            column=column,
            vector=vector,
            sample_id=sample_id,
            k=k,
            where=where,
            version=version,
            method=method,
            cache=cache,
        )

    def feature_set(self, name: str, version: Version = None) -> FeatureSetMeta:
        """The description of a feature set at a version: encoders, column shapes, lineage."""
        from features.metadata import FeatureSetMeta, feature_table

        table = feature_table(name)
        return FeatureSetMeta.of(self, self.delta(table, version), table=table)

    def build_index(self, feature_set: str, column: str | None = None, **options: Any) -> dict:
        """Build and tune the ANN index of a feature-set version; see ``features.ann``."""
        from features.ann import build_index

        return build_index(self, feature_set, column, **options)

    def stats(self, table: str = "samples", version: Version = None) -> dict[str, Any]:
        """Counts per split / label / modality, media histograms, quarantine reasons."""
        from features.stats import stats

        return stats(self, table, version)

    def embedding_map(self, feature_set: str, out_png: str | Path, **options: Any) -> Path:
        """A PNG of a 2-D PCA of a feature set's embeddings, coloured by label."""
        from features.stats import embedding_map

        return embedding_map(self, feature_set, out_png=out_png, **options)

    def diff(self, table: str, v1: Version, v2: Version = None) -> TableDiff:
        """Rows added and removed between two versions of a table, by key."""
        from features.maintenance import diff

        return diff(self, table, v1, v2)

    def lineage(self, table: str) -> list[dict[str, Any]]:
        """Each version of a table with the run, spec and code version that wrote it."""
        from features.maintenance import lineage

        return lineage(self, table)

    def vacuum(self, **options: Any) -> dict[str, list[str]]:
        """Files no version within the retention window needs; a dry run unless told."""
        from features.maintenance import vacuum

        return vacuum(self, **options)

    def optimize(self, table: str, **options: Any) -> dict[str, Any]:
        """Compact a table's small files (one commit, same rows)."""
        from features.maintenance import optimize

        return optimize(self, table, **options)
