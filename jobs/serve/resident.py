"""What a serving replica holds: each served feature set's embedding columns at one
version, in memory, swapped whole when a newer version is committed.

``refresh`` loads a newer version beside the one being served and then replaces the
mapping in one assignment: a request that started on the old version finishes on it,
the next one sees the new version, and none waits for the load.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from features.ann import AnnIndex, read_index
from features.errors import StoreError
from features.metadata import FeatureSetMeta, feature_table
from features.schema import FEATURES_PREFIX
from features.search import ResidentColumn, ResidentSamples
from features.tables import TableStore


class NotServed(StoreError):
    """A feature set, column or row this service does not have (HTTP 404)."""


@dataclass(frozen=True)
class Served:
    """One feature set at one version, with its embedding columns in memory."""

    name: str
    version: int
    columns: dict[str, ResidentColumn]
    indexes: dict[str, AnnIndex] = field(default_factory=dict)  # column -> its ANN index

    def column(self, name: str | None) -> ResidentColumn:
        if name is None and len(self.columns) == 1:
            return next(iter(self.columns.values()))
        if name not in self.columns:
            known = ", ".join(sorted(self.columns)) or "none"
            raise NotServed(f"{self.name} v{self.version}: no embedding column {name!r} ({known})")
        return self.columns[name]

    def index(self, store: TableStore, column: ResidentColumn) -> AnnIndex:
        """This version's ANN index of ``column``, read on first use (a 400 when the
        version has none: `mmfp store index` builds it)."""
        name = column.column.column
        if name not in self.indexes:
            self.indexes[name] = read_index(store, column.column)
        return self.indexes[name]


class ServedStore:
    """The served feature sets of one store (all of them unless named)."""

    def __init__(self, store: TableStore, feature_sets: list[str] | None = None) -> None:
        self.store = store
        self.named = feature_sets
        self.served: dict[str, Served] = {}  # replaced whole by refresh, never changed in place
        self.samples = ResidentSamples.load(store)  # what hits show of their samples
        self.refresh()
        missing = sorted(set(feature_sets or []) - set(self.served))
        if missing:
            raise StoreError(f"{store.uri} has no feature set {missing[0]!r} to serve")

    def names(self) -> list[str]:
        if self.named is not None:
            return list(self.named)
        prefix = FEATURES_PREFIX
        return sorted(t[len(prefix) :] for t in self.store.tables() if t.startswith(prefix))

    def refresh(self) -> list[str]:
        """Load every feature set whose latest version is newer than the served one, then
        swap them in; returns the names that changed (and ``samples`` when it did)."""
        changed = []
        if self.store.exists("samples") and self.store.version("samples") != self.samples.version:
            self.samples = ResidentSamples.load(self.store)  # one assignment, like the sets
            changed.append("samples")
        current = dict(self.served)
        for name in self.names():
            table = feature_table(name)
            latest = self.store.version(table)
            if latest is None or (name in current and current[name].version == latest):
                continue
            meta = FeatureSetMeta.of(self.store, self.store.delta(table, latest), table=table)
            held = current[name].columns if name in current else {}
            columns = {  # an append reads only its new files
                c: held[c].at(self.store, latest)
                if c in held
                else ResidentColumn.load(self.store, name, c, latest)
                for c in meta.embeddings()
            }
            current[name] = Served(name, latest, columns)
            changed.append(name)
        self.served = current  # one assignment: the swap
        return changed

    def get(self, name: str) -> Served:
        served = self.served.get(name)
        if served is None:
            known = ", ".join(sorted(self.served)) or "none"
            raise NotServed(f"feature set {name!r} is not served here (served: {known})")
        return served

    def versions(self) -> dict[str, int]:
        return {name: s.version for name, s in self.served.items()}
