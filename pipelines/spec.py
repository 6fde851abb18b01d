"""PipelineSpec: the one YAML file a user writes, validated before any Ray work starts.

Relative paths in the spec resolve against the spec file's directory, so a
spec and its data can move together.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from features.storage import normalize_uri, redact
from pipelines.augment_spec import AugmentSpec
from pipelines.encode import EncodeSpec
from pipelines.errors import SpecError
from pipelines.filters import QualitySpec
from pipelines.label import LabelSpec
from pipelines.neardup import NearDupSpec

M = TypeVar("M", bound=BaseModel)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Source(_Model):
    name: str | None = None  # defaults to the last path component of `uri`
    uri: str  # local path (relative to the spec file), file://, s3://, gs://, ...
    storage_options: dict[str, str] = Field(default_factory=dict)  # deltalake-style keys

    @property
    def source_name(self) -> str:
        return self.name or self.uri.rstrip("/").rsplit("/", 1)[-1]


class DirectorySource(_Source):
    """Files grouped into samples by stem: 0007.jpg + 0007.wav + 0007.txt is one sample."""

    kind: Literal["directory"]
    class_folders: bool = False  # the first sub-folder under `uri` is the sample's label


class ManifestColumns(_Model):
    """Which manifest column holds what; set one to null when the manifest lacks it."""

    id: str | None = "id"
    text: str | None = "text"
    image: str | None = "image"  # path relative to the manifest's directory
    audio: str | None = "audio"
    label: str | None = "label"
    group: str | None = "group"


class ManifestSource(_Source):
    """A JSONL, CSV or Parquet file with one row per sample."""

    kind: Literal["manifest"]
    format: Literal["jsonl", "csv", "parquet"] | None = None  # from the extension when null
    columns: ManifestColumns = Field(default_factory=ManifestColumns)


class WebDatasetSource(_Source):
    """WebDataset-style tar shards: members ``<key>.<ext>`` grouped by key."""

    kind: Literal["webdataset"]
    pattern: str = "*.tar"  # shard file names under `uri` (a single .tar uri is read as is)


Source = Annotated[DirectorySource | ManifestSource | WebDatasetSource, Field(discriminator="kind")]


class DecodeLimits(_Model):
    """Bounds checked before decoding, so one hostile file cannot exhaust a worker."""

    max_image_pixels: int = Field(50_000_000, gt=0)  # width * height from the image header
    max_audio_seconds: float = Field(60.0, gt=0)
    max_text_chars: int = Field(20_000, gt=0)
    # bytes of one input file or tar member, checked from its size before it is read
    max_file_bytes: int = Field(256 * 2**20, gt=0)
    max_manifest_bytes: int = Field(2 * 2**30, gt=0)  # a manifest, read on the driver


class SplitSpec(_Model):
    seed: int = 0
    ratios: dict[Literal["train", "val", "test"], float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    # "group": samples sharing a group_id share a split (sample_id when there is none).
    by: Literal["group", "sample"] = "group"
    # group ids pinned to a split (held-out speakers, a test site); the rest by `ratios`
    groups: dict[Literal["train", "val", "test"], list[str]] = Field(default_factory=dict)

    @field_validator("ratios")
    @classmethod
    def _ratios_sum_to_one(cls, ratios: dict[str, float]) -> dict[str, float]:
        if any(r < 0 for r in ratios.values()):
            raise ValueError("ratios must be >= 0")
        if abs(sum(ratios.values()) - 1.0) > 1e-6:
            raise ValueError(f"ratios must sum to 1, got {sum(ratios.values()):.4f}")
        return ratios

    @model_validator(mode="after")
    def _pinned_groups(self) -> SplitSpec:
        seen: dict[str, str] = {}
        for name, groups in self.groups.items():
            for group in groups:
                if group in seen and seen[group] != name:
                    raise ValueError(f"group {group!r} is pinned to both {seen[group]} and {name}")
                seen[group] = name
        if self.groups and self.by != "group":
            raise ValueError("split.groups needs `by: group`")
        return self


class StoreSpec(_Model):
    uri: str = "mmfp-store"  # local path (relative to the spec file) or s3://bucket/prefix
    storage_options: dict[str, str] = Field(default_factory=dict)


class ResourcesSpec(_Model):
    batch_size: int = Field(32, gt=0)  # samples per decode batch
    blocks_per_cpu: int = Field(2, gt=0)  # at least this many input blocks per CPU
    rows_per_block: int = Field(512, gt=0)  # at most this many inputs per block (memory)
    # a local CLI run keeps work out of Ray (0: never): collect reads at most this many new
    # inputs in forked workers (memory holds a few batches, whatever the count); default:
    # every input on a machine of at most 8 CPUs, else 20,000 (pipelines.build.in_process) ...
    in_process_inputs: int | None = Field(None, ge=0)
    # ... augment and encode at most this many stored rows (read a block at a time;
    # a model loads once, here, and the forked workers share it); default as above
    in_process_rows: int | None = Field(None, ge=0)
    # processes such a stage forks for its per-batch steps (0: one per CPU; 1: none)
    in_process_workers: int = Field(0, ge=0)


class RefreshSpec(_Model):
    """How `mmfp refresh` treats inputs that disappeared from the sources."""

    # keep: their samples stay in the store; delete: their rows leave samples and views
    on_removed: Literal["keep", "delete"] = "keep"


class PipelineSpec(_Model):
    """A whole pipeline: where samples come from, how they split, where they are stored."""

    name: str = "mmfp"
    sources: list[Source] = Field(min_length=1)
    decode: DecodeLimits = Field(default_factory=DecodeLimits)
    split: SplitSpec = Field(default_factory=SplitSpec)
    label: LabelSpec | None = None  # none: keep the labels inputs came with
    quality: QualitySpec | None = None  # none: no stats, no filters, no quality table
    near_duplicates: NearDupSpec | None = None  # for `mmfp dedup`; none: not searched
    augment: AugmentSpec | None = None  # none: no views table
    encode: EncodeSpec | None = None  # none: no feature sets
    store: StoreSpec = Field(default_factory=StoreSpec)
    refresh: RefreshSpec = Field(default_factory=RefreshSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @model_validator(mode="after")
    def _unique_source_names(self) -> PipelineSpec:
        names = [s.source_name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {dupes} (set `name:`)")
        return self

    def resolved(self, base_dir: Path) -> PipelineSpec:
        """A copy with relative local paths made absolute against ``base_dir``."""
        data = self.model_dump()
        for source in data["sources"]:
            source["uri"] = normalize_uri(source["uri"], base_dir=str(base_dir))
        data["store"]["uri"] = normalize_uri(data["store"]["uri"], base_dir=str(base_dir))
        for config in _model_configs(data):
            # a model given as a path next to the spec; hub ids stay as they are
            if config.get("model") and (base_dir / config["model"]).exists():
                config["model"] = str((base_dir / config["model"]).resolve())
        return PipelineSpec.model_validate(data)

    def spec_hash(self) -> str:
        """Hash of the validated spec without secrets, recorded with every run."""
        data = self.model_dump(mode="json")
        if data["near_duplicates"] is None:  # added later: specs without them keep their hash
            del data["near_duplicates"]
        if data["quality"] is not None and data["quality"]["cross_modal"] is None:
            del data["quality"]["cross_modal"]
        for source in data["sources"]:
            source["storage_options"] = redact(source["storage_options"])
        data["store"]["storage_options"] = redact(data["store"]["storage_options"])
        canonical = json.dumps(data, sort_keys=True).encode()
        return hashlib.blake2b(canonical, digest_size=8).hexdigest()


def _model_configs(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every encoder config of a dumped spec: feature sets and zero-shot label sources."""
    configs = [
        c for fs in (data.get("encode") or {}).get("feature_sets", []) for c in fs["encoders"]
    ]
    for source in (data.get("label") or {}).get("sources", []):
        if source.get("kind") == "zero_shot":
            configs.append(source["encoder"])
    return configs


def read_yaml_mapping(path: Path, *, what: str, expected: str) -> dict[str, Any]:
    """A YAML file's top-level mapping, or a ``SpecError`` that says what is wrong with it."""
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise SpecError(f"{what} not found: {path}") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise SpecError(f"{path} must hold a YAML mapping with {expected}")
    return raw


def load_spec(path: str | Path) -> PipelineSpec:
    """Read and validate a spec file; raise ``SpecError`` naming every bad field."""
    path = Path(path)
    raw = read_yaml_mapping(path, what="spec file", expected="at least `sources:`")
    return parse_spec(raw, origin=str(path)).resolved(path.resolve().parent)


def parse_spec(raw: dict[str, Any], *, origin: str = "<spec>") -> PipelineSpec:
    return validated(PipelineSpec, raw, origin)


def validated(model: type[M], raw: Any, origin: str, what: str = "spec") -> M:
    """``raw`` as ``model`` (a spec, a train or head config), or a ``SpecError`` that
    names every bad field."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, origin, what)) from e


def format_validation_error(error: ValidationError, origin: str, what: str = "spec") -> str:
    """One line per problem: the field path, what is wrong, and the allowed values."""
    lines = [f"invalid {what} {origin}:"]
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the spec reference in the README)"
        ctx = err.get("ctx") or {}
        if "expected" in ctx and str(ctx["expected"]) not in msg:
            msg = f"{msg} (allowed: {ctx['expected']})"
        lines.append(f"  {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def write_spec(spec: PipelineSpec, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
