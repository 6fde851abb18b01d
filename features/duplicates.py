"""The ``duplicates`` table: near duplicates marked, never deleted, and left out on request.

``mmfp dedup`` writes the whole table at once (one Delta version per search;
earlier searches stay in its history). Readers that take
``exclude_duplicates`` leave out a marked sample only while the sample it
duplicates is still stored, so a kept sample that was later filtered or
removed brings its duplicates back instead of losing the content altogether.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError

from features.errors import StoreError
from features.schema import DUPLICATES, conform
from features.tables import RUN_ID_KEY, TableStore, Version

TABLE = "duplicates"
SAMPLES_VERSION_KEY = "mmfp.samples_version"  # commit metadata: the samples version searched


def duplicate_rows(
    marks: pa.Table, splits: Mapping[str, str | None], *, samples_version: int, run_id: str
) -> pa.Table:
    """``marks`` (sample_id, duplicate_of, method, score) as rows of the table: with both
    samples' splits (``splits``: sample id -> split), the samples version searched and
    the run."""
    count = marks.num_rows
    columns = {
        "split": [splits.get(s) for s in marks.column("sample_id").to_pylist()],
        "duplicate_of_split": [splits.get(s) for s in marks.column("duplicate_of").to_pylist()],
        "samples_version": [samples_version] * count,
        "run_id": [run_id] * count,
        "found_at": [datetime.now(UTC)] * count,
    }
    rows = marks
    for name, values in columns.items():
        rows = rows.append_column(name, pa.array(values, DUPLICATES.field(name).type))
    return conform(rows, DUPLICATES)


def write_duplicates(
    store: TableStore, rows: pa.Table, *, samples_version: int, run_id: str
) -> int:
    """Replace the table with ``rows`` as one commit; returns its version. A search of an
    older samples version than the one already marked is refused (it would hide what a
    newer search found)."""
    store.ensure_table(TABLE)
    dt = store.delta(TABLE)  # the snapshot checked is the one the commit must still see
    newest = marked_version(dt)
    if newest is not None and newest > samples_version:
        raise StoreError(
            f"duplicates already mark samples version {newest}; this search read version "
            f"{samples_version}: run it again on the latest version"
        )
    try:
        write_deltalake(
            dt,
            rows,
            mode="overwrite",
            commit_properties=CommitProperties(
                custom_metadata={RUN_ID_KEY: run_id, SAMPLES_VERSION_KEY: str(samples_version)}
            ),
        )
    except CommitFailedError as e:
        raise StoreError(
            "another `mmfp dedup` committed while this one ran; nothing was written by this "
            "one: run it again"
        ) from e
    return store.version(TABLE)


def marked_version(dt: DeltaTable) -> int | None:
    """The samples version the table's latest commit marked (None: never searched)."""
    value = dt.history(1)[0].get(SAMPLES_VERSION_KEY)
    return int(value) if value is not None else None


def excluded_ids(
    store: TableStore, samples_version: Version = None, duplicates_version: Version = None
) -> pa.Array:
    """Sample ids a reader leaves out: marked duplicates (at ``duplicates_version``, default
    latest) whose kept sample is stored at ``samples_version`` too (empty when nothing was
    ever searched). A reader that records what it read pins both versions first."""
    if not store.exists(TABLE):
        return pa.array([], pa.string())
    marks = store.to_arrow(TABLE, duplicates_version, columns=["sample_id", "duplicate_of"])
    stored = store.column_values("samples", "sample_id", samples_version)
    both = pc.and_(
        pc.is_in(marks.column("sample_id"), value_set=stored),
        pc.is_in(marks.column("duplicate_of"), value_set=stored),
    )
    return marks.filter(both).column("sample_id").combine_chunks()


def leakage(marks: pa.Table) -> dict[str, int]:
    """Marked duplicates whose kept sample is in another split, per ``split<-kept split``:
    what a train/test split would leak without ``exclude_duplicates``."""
    pairs = zip(
        marks.column("split").to_pylist(),
        marks.column("duplicate_of_split").to_pylist(),
        strict=True,
    )
    counts = Counter(f"{a}<-{b}" for a, b in pairs if a != b)
    return dict(sorted(counts.items()))


def summary(store: TableStore) -> dict[str, object] | None:
    """Counts for ``mmfp store stats`` of the latest marks (None: never searched)."""
    return summarise(store.to_arrow(TABLE)) if store.exists(TABLE) else None


def summarise(marks: pa.Table) -> dict[str, object]:
    """Rows of the table (stored, or about to be): how many are marked, per method and
    split, the samples version searched, and the cross-split leaks (``leakage``)."""
    versions = marks.column("samples_version").unique().to_pylist()
    return {
        "marked": marks.num_rows,
        "samples_version": versions[0] if versions else None,
        "by_method": _counted(marks.column("method").to_pylist()),
        "by_split": _counted(marks.column("split").to_pylist()),
        "cross_split": leakage(marks),
    }


def _counted(values: list[str | None]) -> dict[str, int]:
    return dict(sorted(Counter(str(v) for v in values).items()))
