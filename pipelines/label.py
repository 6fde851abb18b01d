"""Label: decide each sample's label(s), their provenance and confidence.

Collect records the label an input came with (class folder, manifest column,
WebDataset ``.cls``); here ordered sources (those, regex/keyword rules, user
functions) pick what a sample keeps, and a closed vocabulary turns a stray label
into a quarantine row instead of a silent new class. New kinds plug in through
``LABELLERS`` plus one model in the ``LabelSource`` union; a model-backed kind
(zero-shot) overrides ``SourceLabeller.annotate`` to report its scores.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.errors import InputError, SpecError, UnknownLabel
from pipelines.imports import check_function_path, import_function
from pipelines.quarantine import with_errors
from pipelines.zeroshot import ZeroShotLabeller, ZeroShotLabels

NONE = "(none)"  # class_balance key for rows without a label or split
SPLIT_ORDER = ("train", "val", "test")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ManifestLabels(_Model):
    """Keep the label a manifest column or a WebDataset ``.cls`` member gave the input."""

    kind: Literal["manifest"]


class FolderLabels(_Model):
    """Keep the label taken from the input's class sub-folder."""

    kind: Literal["folder"]


class LabelRule(_Model):
    """``label`` when ``pattern`` matches anywhere in the sample's ``field``."""

    label: str = Field(min_length=1)
    pattern: str
    field: Literal["text"] = "text"  # the normalised caption; other fields may come later
    ignore_case: bool = True

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from e
        return pattern


class RulesLabels(_Model):
    """Regex rules and whole-word keywords over the caption; listed order is priority."""

    kind: Literal["rules"]
    rules: list[LabelRule] = Field(default_factory=list)
    keywords: dict[str, list[str]] = Field(default_factory=dict)  # label -> words (any case)

    @model_validator(mode="after")
    def _has_rules(self) -> RulesLabels:
        if not self.rules and not self.keywords:
            raise ValueError("a rules source needs `rules` or `keywords`")
        if not all(k and any(w.strip() for w in ws) for k, ws in self.keywords.items()):
            raise ValueError("each keywords entry needs a label and at least one word")
        return self

    def labels(self) -> list[str]:
        """Every label these rules can produce, in priority order."""
        return list(dict.fromkeys([r.label for r in self.rules] + list(self.keywords)))


class FunctionLabels(_Model):
    """A user function ``f(batch: pa.Table) -> list[str | list[str] | None]``, one per row."""

    kind: Literal["function"]
    path: str  # "package.module:function"; imported on the worker, not at spec load

    @field_validator("path")
    @classmethod
    def _module_colon_attr(cls, path: str) -> str:
        return check_function_path(path)


LabelSource = Annotated[
    ManifestLabels | FolderLabels | RulesLabels | FunctionLabels | ZeroShotLabels,
    Field(discriminator="kind"),
]


class LabelSpec(_Model):
    """The ``label:`` section of a pipeline spec."""

    # Priority order: for single-label the first source with a label wins.
    # Default: keep whatever label collect found (manifest / .cls, then folder).
    sources: list[LabelSource] = Field(
        default_factory=lambda: [ManifestLabels(kind="manifest"), FolderLabels(kind="folder")],
        min_length=1,
    )
    multi_label: bool = False  # true: union of all sources' labels, in priority order
    # Closed set when given: any other label makes its row an UnknownLabel error.
    vocabulary: list[Annotated[str, Field(min_length=1)]] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _zero_shot_has_labels(self) -> LabelSpec:
        for source in self.sources:
            if isinstance(source, ZeroShotLabels) and source.labels is None:
                if self.vocabulary is None:
                    raise ValueError("a zero_shot source needs `labels` or the spec's `vocabulary`")
                source.labels = list(self.vocabulary)
        return self

    @model_validator(mode="after")
    def _vocabulary_covers_rules(self) -> LabelSpec:
        if self.vocabulary is None:
            return self
        dupes = sorted({v for v in self.vocabulary if self.vocabulary.count(v) > 1})
        if dupes:
            raise ValueError(f"vocabulary repeats {dupes}")
        rules = [label for s in self.sources if isinstance(s, RulesLabels) for label in s.labels()]
        rules += [
            label for s in self.sources if isinstance(s, ZeroShotLabels) for label in s.labels
        ]
        stray = [label for label in rules if label not in self.vocabulary]
        if stray:
            raise ValueError(f"rules produce labels {stray} that are not in the vocabulary")
        return self


# --------------------------------------------------------------------------- run time


Annotations = tuple[list[list[str]], list[str | None], list[float | None]]


def _unique(labels: list[Any]) -> list[str]:
    return list(dict.fromkeys(label for label in labels if isinstance(label, str) and label))


class SourceLabeller:
    """One label source at run time: the extension point for new kinds.

    A kind implements ``labels_for`` (labels per row, best first). ``annotate``
    adds provenance and confidence; a kind whose labels carry scores overrides it.
    """

    confidence: ClassVar[float] = 1.0  # given and rule labels are taken as certain

    def __init__(self, source: Any) -> None:
        self.source = source

    @property
    def name(self) -> str:
        return self.source.kind

    def labels_for(self, batch: pa.Table) -> list[list[str]]:
        raise NotImplementedError

    def annotate(self, batch: pa.Table) -> Annotations:
        labels = self.labels_for(batch)
        return labels, [self.source.kind] * len(labels), [self.confidence] * len(labels)


class _CollectedLabeller(SourceLabeller):
    """Keeps the labels collect recorded, when their ``label_source`` is one of ``origins``."""

    origins: ClassVar[tuple[str, ...]] = ()

    def labels_for(self, batch: pa.Table) -> list[list[str]]:
        cols = [batch.column(c).to_pylist() for c in ("label", "labels", "label_source")]
        return [
            _unique(many or [one]) if origin in self.origins else []
            for one, many, origin in zip(*cols, strict=True)
        ]

    def annotate(self, batch: pa.Table) -> Annotations:
        labels, _, confidences = super().annotate(batch)
        return labels, batch.column("label_source").to_pylist(), confidences


class ManifestLabeller(_CollectedLabeller):
    origins = ("manifest", "webdataset")  # provenance stays the input's own kind


class FolderLabeller(_CollectedLabeller):
    origins = ("folder",)


class RulesLabeller(SourceLabeller):
    def __init__(self, source: RulesLabels) -> None:
        super().__init__(source)
        self.rules: list[tuple[str, str, re.Pattern[str]]] = [
            (r.label, r.field, re.compile(r.pattern, re.IGNORECASE if r.ignore_case else 0))
            for r in source.rules
        ]
        for label, words in source.keywords.items():
            # Whole words: not glued to other word characters; inner spaces match any run.
            alts = "|".join(r"\s+".join(map(re.escape, w.split())) for w in words if w.strip())
            self.rules.append((label, "text", re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.I)))

    def labels_for(self, batch: pa.Table) -> list[list[str]]:
        fields = {f: batch.column(f).to_pylist() for f in {field for _, field, _ in self.rules}}
        return [
            _unique(
                [label for label, f, rx in self.rules if fields[f][i] and rx.search(fields[f][i])]
            )
            for i in range(batch.num_rows)
        ]


class FunctionLabeller(SourceLabeller):
    def __init__(self, source: FunctionLabels) -> None:
        super().__init__(source)
        self._fn: Callable[[pa.Table], Any] | None = None

    @property
    def name(self) -> str:
        return f"function {self.source.path}"

    def function(self) -> Callable[[pa.Table], Any]:
        """Import the user function once per worker; a bad path is a ``SpecError``."""
        if self._fn is None:
            self._fn = import_function(self.source.path, "label function")
        return self._fn

    def labels_for(self, batch: pa.Table) -> list[list[str]]:
        result = list(self.function()(batch))
        if len(result) != batch.num_rows:
            raise SpecError(f"{self.name} returned {len(result)} labels for {batch.num_rows} rows")
        out = []
        for value in result:
            many = [value] if value is None or isinstance(value, str) else value
            if not isinstance(many, list | tuple) or not all(
                v is None or isinstance(v, str) for v in many
            ):
                raise SpecError(f"{self.name} returned {value!r}; want str, list[str] or None")
            out.append(_unique(list(many)))
        return out


# The registry: kind -> run-time class. Add a kind here and to the LabelSource union.
# kind -> run-time labeller (built from its spec section); a kind needs `annotate(batch)`
LABELLERS: dict[str, Callable[[Any], Any]] = {
    "manifest": ManifestLabeller,
    "folder": FolderLabeller,
    "rules": RulesLabeller,
    "function": FunctionLabeller,
    "zero_shot": ZeroShotLabeller,
}


def _out_of_vocabulary(label: str, origin: str | None, vocabulary: list[str]) -> str:
    close = difflib.get_close_matches(label, vocabulary, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    shown = ", ".join(repr(v) for v in vocabulary[:5]) + (", ..." if len(vocabulary) > 5 else "")
    return (
        f"label {label!r} (from {origin}) is not in the vocabulary; {hint}"
        f"allowed: {shown} ({len(vocabulary)} in all)"
    )


class Labeller:
    """The label stage as a Ray callable class: holds only the spec.

    Source labellers (compiled regexes, imported functions) are built lazily on
    the worker and dropped when pickled.
    """

    def __init__(self, spec: LabelSpec) -> None:
        self.spec = spec
        self._sources: list[SourceLabeller] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "_sources": None}

    @property
    def needs_model(self) -> bool:
        """True when a source loads a model: the build then runs this stage in actors."""
        return any(isinstance(s, ZeroShotLabels) for s in self.spec.sources)

    @property
    def sources(self) -> list[SourceLabeller]:
        if self._sources is None:
            self._sources = [LABELLERS[s.kind](s) for s in self.spec.sources]
        return self._sources

    def load(self) -> None:
        """Load the sources' models now: a process that forks workers does, to share them."""
        for source in self.sources:
            if isinstance(source, ZeroShotLabeller):
                source.ready()

    def check(self) -> None:
        """Import every label function now, so a bad path fails on the driver before Ray work."""
        for source in self.sources:
            if isinstance(source, FunctionLabeller):
                source.function()

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        has_errors = "error_type" in batch.column_names
        ok = pc.is_null(batch.column("error_type")).to_pylist() if has_errors else [True] * n
        idx = [i for i, good in enumerate(ok) if good]
        if not idx:
            return batch
        sub = batch if len(idx) == n else batch.take(idx)
        results = []
        for source in self.sources:
            labels, origins, confidences = source.annotate(sub)
            if len(labels) != sub.num_rows:
                raise SpecError(
                    f"{source.name} returned {len(labels)} labels for {sub.num_rows} rows"
                )
            results.append((labels, origins, confidences))

        cols = {c: batch.column(c).to_pylist() for c in ("label", "labels", "label_source")}
        cols["label_confidence"] = batch.column("label_confidence").to_pylist()
        vocabulary = self.spec.vocabulary
        allowed = set(vocabulary or ())
        refused: dict[int, InputError] = {}
        for j, i in enumerate(idx):
            chosen: dict[str, tuple[str | None, float | None]] = {}
            for labels, origins, confidences in results:
                for label in labels[j]:
                    chosen.setdefault(label, (origins[j], confidences[j]))
                if chosen and not self.spec.multi_label:
                    break
            picked = list(chosen)[: None if self.spec.multi_label else 1]
            stray = [label for label in picked if vocabulary is not None and label not in allowed]
            if stray:
                message = _out_of_vocabulary(stray[0], chosen[stray[0]][0], vocabulary or [])
                if not has_errors:
                    raise UnknownLabel(message)
                refused[i] = UnknownLabel(message)
                continue
            first = chosen[picked[0]] if picked else (None, None)
            cols["label"][i] = picked[0] if picked else None
            cols["labels"][i] = picked
            cols["label_source"][i], cols["label_confidence"][i] = first
        for name, values in cols.items():
            index = batch.schema.get_field_index(name)
            batch = batch.set_column(
                index, batch.schema.field(index), pa.array(values, batch.schema.field(index).type)
            )
        return with_errors(batch, refused)


def label_batch(batch: pa.Table, *, spec: LabelSpec) -> pa.Table:
    """Label one batch: ``Labeller(spec)(batch)`` for callers without an actor."""
    return Labeller(spec)(batch)


def label_vocabulary(spec: LabelSpec | None) -> list[str] | None:
    """The labels a spec can produce when that set is known, else None.

    The closed vocabulary when set; otherwise the rule labels when rules are the
    only source; manifest, folder and function labels are open-ended.
    """
    if spec is None:
        return None
    if spec.vocabulary is not None:
        return list(spec.vocabulary)
    if all(isinstance(s, RulesLabels) for s in spec.sources):
        return list(dict.fromkeys(label for s in spec.sources for label in s.labels()))
    return None


def class_balance(table: pa.Table) -> dict[str, dict[str, int]]:
    """Count of each primary ``label`` per split, ``(none)`` for missing; error rows skipped.

    Splits come train / val / test first; labels by descending count, then name;
    ``(none)`` last in both, so the table reads as a report.
    """
    if "error_type" in table.column_names:
        table = table.filter(pc.is_null(table.column("error_type")))
    grouped = table.select(["split", "label"]).group_by(["split", "label"])
    counts = grouped.aggregate([([], "count_all")]).to_pylist()
    balance: dict[str, dict[str, int]] = {}
    for row in counts:
        split = balance.setdefault(row["split"] or NONE, {})
        split[row["label"] or NONE] = split.get(row["label"] or NONE, 0) + row["count_all"]

    def split_key(name: str) -> tuple[bool, int, str]:
        order = SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER)
        return (name == NONE, order, name)

    return {
        split: dict(sorted(balance[split].items(), key=lambda kv: (kv[0] == NONE, -kv[1], kv[0])))
        for split in sorted(balance, key=split_key)
    }
