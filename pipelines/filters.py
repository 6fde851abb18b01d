"""The spec's ``quality`` section: which stats reject a sample, and the collect step that does it.

A filter is a threshold on one stat of ``pipelines.quality.STATS`` (``min`` /
``max``, or ``allowed`` values for ``text_lang``) or a user predicate over a
batch of stats. A sample that fails becomes a quarantine row whose type is
``Filtered:<filter name>`` and whose message holds the value, so nothing
disappears silently; its stats still go to the ``quality`` table, which is
what ``mmfp filter`` evaluates again when the thresholds change.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.errors import InputError, SpecError
from pipelines.imports import check_function_path, import_function
from pipelines.quality import CROSS_MODAL_STATS, NUMERIC_STATS, STATS
from pipelines.quarantine import error_columns

FILTERED = "Filtered:"  # the quarantine type (and ledger outcome) of a filtered sample


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatFilter(_Model):
    """Keep a sample only when ``stat`` is within [min, max] (or among ``allowed``).

    A sample without the stat's modality passes: a text threshold never refuses an
    image-only sample.
    """

    stat: str
    min: float | None = None
    max: float | None = None
    allowed: list[str] | None = Field(None, min_length=1)  # for text_lang
    name: str | None = None  # the quarantine reason's name; defaults to ``stat``

    @field_validator("stat")
    @classmethod
    def _known_stat(cls, stat: str) -> str:
        if stat not in STATS:
            raise ValueError(f"unknown stat {stat!r}; known: {', '.join(STATS)}")
        return stat

    @model_validator(mode="after")
    def _one_kind_of_bound(self) -> StatFilter:
        numeric = self.min is not None or self.max is not None
        if numeric == (self.allowed is not None):
            raise ValueError(f"filter on {self.stat}: give `min`/`max` or `allowed`, not both")
        if numeric and self.stat not in NUMERIC_STATS:
            raise ValueError(f"{self.stat} is not a number: filter it with `allowed`")
        if not numeric and self.stat in NUMERIC_STATS:
            raise ValueError(f"{self.stat} is a number: filter it with `min`/`max`")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"filter on {self.stat}: min {self.min} > max {self.max}")
        return self

    @property
    def label(self) -> str:
        return self.name or self.stat

    def reasons(self, stats: pa.Table) -> list[str | None]:
        """Per row, why it fails (the value against the bound), or None when it passes."""
        values = stats.column(self.stat).to_pylist()
        out: list[str | None] = []
        for value in values:
            reason = None
            if value is None:
                pass
            elif self.allowed is not None and value not in self.allowed:
                reason = f"{self.stat}={value!r} not in {self.allowed}"
            elif self.min is not None and value < self.min:
                reason = f"{self.stat}={value:.6g} < min {self.min:g}"
            elif self.max is not None and value > self.max:
                reason = f"{self.stat}={value:.6g} > max {self.max:g}"
            out.append(reason)
        return out


class PredicateFilter(_Model):
    """A user function ``f(stats: pa.Table) -> sequence of bool`` (True keeps the row),
    for rules a threshold cannot say (e.g. blur relative to image size)."""

    predicate: str  # "package.module:function"
    name: str | None = None  # defaults to the function's name

    @field_validator("predicate")
    @classmethod
    def _module_colon_attr(cls, path: str) -> str:
        return check_function_path(path)

    @property
    def label(self) -> str:
        return self.name or self.predicate.rpartition(":")[2].rpartition(".")[2]

    def reasons(self, stats: pa.Table) -> list[str | None]:
        keep = list(import_function(self.predicate, "quality predicate")(stats))
        if len(keep) != stats.num_rows:
            raise SpecError(
                f"quality predicate {self.predicate} returned {len(keep)} values "
                f"for {stats.num_rows} rows"
            )
        return [None if bool(k) else f"{self.predicate} returned False" for k in keep]


class QualitySpec(_Model):
    """The ``quality:`` section: stats are computed for every sample, filters reject some."""

    filters: list[StatFilter | PredicateFilter] = Field(default_factory=list)
    # a feature set with a joint encoder (clip, clap): `mmfp filter` records its samples'
    # cross-modal similarities (CROSS_MODAL_STATS) so filters can use them
    cross_modal: str | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> QualitySpec:
        names = [f.label for f in self.filters]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"filter names must be unique, repeated: {repeated} (set `name:`)")
        needs = [f.stat for f in self.filters if getattr(f, "stat", None) in CROSS_MODAL_STATS]
        if needs and self.cross_modal is None:
            raise ValueError(
                f"a filter on {needs[0]} needs `cross_modal: FEATURE_SET` (a feature set whose "
                "encoder embeds both modalities, e.g. clip) in the quality section"
            )
        return self

    def verdicts(self, stats: pa.Table) -> dict[str, list[str | None]]:
        """Per filter (by name), per row: the reason it fails, or None."""
        return {f.label: f.reasons(stats) for f in self.filters}

    def first_failure(self, stats: pa.Table) -> list[tuple[str, str] | None]:
        """Per row, the first filter it fails as (name, reason), or None when it passes all."""
        verdicts = self.verdicts(stats)
        out: list[tuple[str, str] | None] = [None] * stats.num_rows
        for name, reasons in verdicts.items():
            for i, reason in enumerate(reasons):
                if out[i] is None and reason is not None:
                    out[i] = (name, reason)
        return out


class Filtered(InputError):
    """A sample whose stats fail a quality filter; the quarantine type names the filter."""

    stage = "quality"

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name


def stat_table(batch: pa.Table) -> pa.Table:
    """The stat columns of a batch, typed as in ``STATS`` (absent ones null)."""
    return pa.table(
        {
            name: (
                batch.column(name).cast(kind)
                if name in batch.column_names
                else pa.nulls(batch.num_rows, kind)
            )
            for name, kind in STATS.items()
        }
    )


def filter_samples(batch: pa.Table, *, quality: QualitySpec) -> pa.Table:
    """Collect's quality step: new samples that fail a filter become ``Filtered:<name>`` rows
    (``status`` ``filtered``); stored samples and error rows pass unchanged."""
    if not quality.filters or batch.num_rows == 0:
        return batch
    status = batch.column("status").to_pylist()
    new = np.flatnonzero(np.array([s == "new" for s in status], dtype=bool))
    if not len(new):
        return batch
    failures = quality.first_failure(stat_table(batch.take(pa.array(new))))
    columns: dict[str, list[Any]] = {
        name: batch.column(name).to_pylist()
        for name in ("error_stage", "error_type", "error_message")
    }
    for i, failure in zip(new, failures, strict=True):
        if failure is not None:
            name, reason = failure
            error = error_columns(Filtered(name, reason))
            columns["error_stage"][i] = error["error_stage"]
            columns["error_type"][i] = FILTERED + name
            columns["error_message"][i] = error["error_message"]
            status[i] = "filtered"
    for name, values in [*columns.items(), ("status", status)]:
        index = batch.schema.get_field_index(name)
        batch = batch.set_column(index, name, pa.array(values, pa.string()))
    return batch


def is_filtered(error_types: pa.Array | pa.ChunkedArray) -> pa.Array:
    """True where a quarantine type or ledger outcome is a quality filter's."""
    return pc.fill_null(pc.starts_with(error_types, FILTERED), False)
