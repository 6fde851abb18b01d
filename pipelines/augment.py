"""Seeded augmented views of train samples: the ``views`` table.

A view is a pure function of (sample_id, view index, spec seed): every random choice comes
from a generator seeded by a hash of those, never from global state, so any worker in any
process, in any order, writes the same bytes, and ``replay_view`` regenerates one view
bit for bit. Val and test samples are never augmented. A view that cannot be made (a
1-sample clip, an empty caption) becomes a row with the error columns set and null media,
never a crashed job.

The per-modality ops live in ``pipelines.augment_ops``; this module holds the spec, the
seeds and the batch function. Heavy libraries (albumentations, librosa) are imported only
when a spec is validated or a view is made, so importing the spec stays cheap.
"""

from __future__ import annotations

import difflib
import json
import os
from datetime import UTC, datetime
from functools import cache
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.schema import VIEWS
from pipelines.errors import InputError
from pipelines.identity import short_hash

# albumentations checks PyPI for a newer version on import unless told not to: no network
# at run time (DESIGN §6). setdefault keeps a user's explicit choice.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


class AugmentError(InputError):
    """One modality of one view could not be augmented; the view becomes an error row."""

    stage = "augment"


# Transforms that need more than an image (bboxes, reference images, fonts, callables) or
# that do not return uint8 pixels, so they cannot run in a view pipeline.
_UNSUPPORTED = frozenset(
    {
        "AtLeastOneBBoxRandomCrop", "BBoxSafeRandomCrop", "RandomSizedBBoxSafeCrop",
        "RandomCropNearBBox", "CropNonEmptyMaskIfExists", "MaskDropout", "FDA",
        "HistogramMatching", "PixelDistributionAdaptation", "Mosaic", "OverlayElements",
        "TextImage", "Lambda", "Normalize", "ToFloat", "FromFloat", "ImageOnlyTransform",
        "DualTransform",
    }
)  # fmt: skip

# The default image pipeline (used when a spec does not list ``image``). Affine zoom and shift
# rather than RandomResizedCrop, because RandomResizedCrop needs a fixed output size and
# inputs come in any size: these ops keep each image's size, and encoders resize later.
DEFAULT_IMAGE_OPS: tuple[dict[str, Any], ...] = (
    {
        "name": "Affine",
        "params": {
            "scale": [0.85, 1.15],
            "keep_ratio": True,
            "translate_percent": [-0.06, 0.06],
            "rotate": [-10, 10],
            "p": 0.7,
        },
    },
    {"name": "HorizontalFlip", "params": {"p": 0.5}},
    {
        "name": "ColorJitter",
        "params": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.03, "p": 0.8},
    },
    {"name": "GaussNoise", "params": {"std_range": [0.01, 0.05], "p": 0.3}},
)


_EXAMPLES = ("HorizontalFlip", "RandomResizedCrop", "Affine", "ColorJitter", "GaussNoise")


@cache
def image_transform_names() -> tuple[str, ...]:
    """Names of the albumentations transforms a view pipeline accepts (2-D, image in/out)."""
    import albumentations as A
    from albumentations.core.transforms_interface import Transform3D

    def ok(name: str) -> bool:
        cls = getattr(A, name)
        return (
            isinstance(cls, type)
            and issubclass(cls, A.ImageOnlyTransform | A.DualTransform)
            and not issubclass(cls, Transform3D)
            and name not in _UNSUPPORTED
        )

    return tuple(sorted(n for n in dir(A) if ok(n)))


def build_transform(name: str, params: dict[str, Any]) -> Any:
    """Construct one albumentations transform in strict mode, so an unknown argument is an
    error rather than the warning albumentations gives by default."""
    import albumentations as A

    valid = image_transform_names()
    if name in _UNSUPPORTED or (name not in valid and isinstance(getattr(A, name, None), type)):
        raise ValueError(
            f"albumentations transform {name!r} cannot run in a view pipeline: it needs more "
            "than an image (bboxes, reference images, callables), is not a 2-D image transform, "
            "or does not return uint8 pixels"
        )
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"e.g. {', '.join(_EXAMPLES)}"
        raise ValueError(
            f"unknown albumentations transform {name!r}; {hint} ({len(valid)} are supported)"
        )
    try:
        return getattr(A, name)(**{**params, "strict": True})
    except (TypeError, ValueError) as e:
        raise ValueError(f"image op {name}: invalid params {params}: {e}") from e


class ImageOp(BaseModel):
    """One albumentations transform by class name, e.g. ``{name: HorizontalFlip, params:
    {p: 0.5}}``. Constructed at spec load, so a typo fails before any Ray work starts."""

    model_config = ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _constructs(self) -> ImageOp:
        build_transform(self.name, self.params)
        return self


Range = tuple[float, float]


class AudioAugment(BaseModel):
    """Waveform augmentation. Each random op is applied to a view with probability ``p``,
    drawn independently per op; a range set to ``null`` turns that op off. Order: resample,
    time stretch, pitch shift, crop/pad, time shift, gain, noise, clip to [-1, 1]."""

    model_config = ConfigDict(extra="forbid")

    sample_rate: int = Field(16000, ge=1000, le=384000)  # every view is resampled to this
    mono: bool = True  # downmix; False keeps the input's channels
    crop_seconds: float | None = Field(None, gt=0)  # random crop / zero-pad to fixed length
    time_shift_max: float = Field(0.1, ge=0)  # seconds, either way; the gap is zero-filled
    gain_db: Range | None = (-6.0, 6.0)
    noise_snr_db: Range | None = (10.0, 30.0)  # white noise relative to the clip's power
    time_stretch: Range | None = (0.9, 1.1)  # rate: > 1 is faster (shorter)
    pitch_shift: Range | None = (-2.0, 2.0)  # semitones
    p: float = Field(0.5, ge=0, le=1)  # probability of each op above, per view

    @field_validator("gain_db", "noise_snr_db", "time_stretch", "pitch_shift")
    @classmethod
    def _ordered(cls, value: Range | None) -> Range | None:
        if value is not None and value[0] > value[1]:
            raise ValueError(f"range {list(value)} must be [low, high] with low <= high")
        return value

    @field_validator("time_stretch")
    @classmethod
    def _positive_rate(cls, value: Range | None) -> Range | None:
        if value is not None and value[0] <= 0:
            raise ValueError(f"time_stretch rates {list(value)} must be > 0")
        return value


class TextAugment(BaseModel):
    """Cheap, local caption noise (no models, no network): word dropout, word swaps, case
    and punctuation noise, then one paraphrase template drawn uniformly."""

    model_config = ConfigDict(extra="forbid")

    word_delete_p: float = Field(0.1, ge=0, lt=1)  # per word; at least one word always stays
    word_swaps: int = Field(1, ge=0)  # random pairs of words exchanged
    templates: list[str] = Field(
        default_factory=lambda: ["{text}", "a photo of {text}", "an example of {text}"]
    )
    case_noise_p: float = Field(0.05, ge=0, le=1)  # per word: lower, UPPER or Capitalised
    punct_noise_p: float = Field(0.05, ge=0, le=1)  # per word: add or drop trailing punctuation

    @field_validator("templates")
    @classmethod
    def _has_slot(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if "{text}" not in t]
        if bad:
            raise ValueError(f"templates {bad} lack the {{text}} slot for the caption")
        return value


class AugmentSpec(BaseModel):
    """The ``augment:`` section of a pipeline spec.

    ``image`` defaults to ``DEFAULT_IMAGE_OPS``; ``image: []`` keeps pixels as they are (still
    re-encoded as PNG). ``audio: null`` / ``text: null`` copy that modality into the views
    unchanged.
    """

    model_config = ConfigDict(extra="forbid")

    views_per_sample: int = Field(2, ge=1, le=1000)
    seed: int = Field(0, ge=0, lt=2**63)  # stored in the views' ``seed`` column (int64)
    image: list[ImageOp] = Field(
        default_factory=lambda: [ImageOp.model_validate(op) for op in DEFAULT_IMAGE_OPS]
    )
    audio: AudioAugment | None = Field(default_factory=AudioAugment)
    text: TextAugment | None = Field(default_factory=TextAugment)


def view_seed(sample_id: str, view: int, seed: int, modality: str) -> int:
    """The 64-bit seed of one modality of one view. Hashed, not added, so neighbouring views
    or seeds share no stream, and modalities of one view vary independently."""
    return int(short_hash("augment", sample_id, view, seed, modality, size=8), 16)


ERROR_FIELDS = (
    pa.field("error_stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
)
# What ``make_views`` returns: the views table plus the error columns. Good rows have null
# errors and go to ``views`` (``schema.conform(t.drop(...), VIEWS)``); error rows go to quarantine.
VIEW_ERRORS_SCHEMA = pa.schema([*VIEWS, *ERROR_FIELDS])

_MEDIA = ("text", "image", "image_width", "image_height", "audio", "audio_sample_rate")
_MEDIA += ("audio_duration", "transforms")
# the samples columns a view is made from (what the build reads back from the store)
VIEW_INPUT_COLUMNS = (
    "sample_id", "split", "modalities", "text", "image", "audio", "label", "labels",
    "audio_sample_rate", "audio_duration",
)  # fmt: skip


def replay_view(sample_row: dict[str, Any], view: int, spec: AugmentSpec) -> dict[str, Any]:
    """Make view ``view`` of one samples row: a views row without ``created_at``/``run_id``.

    Each modality the row has is augmented with its own seed; if any fails, the whole view is
    an error row (media null), because a view missing one modality would silently train a
    different pair. The error message names every failed modality.
    """
    from pipelines.augment_ops import augment_audio, augment_image, augment_text

    sid = sample_row["sample_id"]
    row: dict[str, Any] = {
        "sample_id": sid,
        "view": view,
        "split": sample_row.get("split"),
        "seed": spec.seed,
        "modalities": sample_row.get("modalities"),
        "label": sample_row.get("label"),
        "labels": sample_row.get("labels"),
        **dict.fromkeys(_MEDIA),
        **{f.name: None for f in ERROR_FIELDS},
    }
    media: dict[str, Any] = {}
    records: dict[str, Any] = {}
    errors: list[AugmentError] = []

    def seed_of(modality: str) -> int:
        return view_seed(sid, view, spec.seed, modality)

    if sample_row.get("image") is not None:
        try:
            png, records["image"] = augment_image(
                sample_row["image"], ops=spec.image, seed=seed_of("image")
            )
            h, w = records["image"]["output_shape"][:2]
            media |= {"image": png, "image_width": w, "image_height": h}
        except AugmentError as e:
            errors.append(e)
    if sample_row.get("audio") is not None:
        if spec.audio is None:
            records["audio"] = {"passthrough": True}
            media["audio"] = sample_row["audio"]
            for key in ("audio_sample_rate", "audio_duration"):
                media[key] = sample_row.get(key)
        else:
            try:
                wav, sr, duration, records["audio"] = augment_audio(
                    sample_row["audio"], spec=spec.audio, seed=seed_of("audio")
                )
                media |= {"audio": wav, "audio_sample_rate": sr, "audio_duration": duration}
            except AugmentError as e:
                errors.append(e)
    if sample_row.get("text") is not None:
        if spec.text is None:
            records["text"] = {"passthrough": True}
            media["text"] = sample_row["text"]
        else:
            try:
                media["text"], records["text"] = augment_text(
                    sample_row["text"], spec=spec.text, seed=seed_of("text")
                )
            except AugmentError as e:
                errors.append(e)
    if errors:
        return row | {
            "error_stage": AugmentError.stage,
            "error_type": type(errors[0]).__name__,
            "error_message": "; ".join(str(e) for e in errors),
        }
    return row | media | {"transforms": json.dumps(records, sort_keys=True)}


def __getattr__(name: str) -> Any:
    """Re-export the per-modality ops lazily, so ``import pipelines.augment`` stays light."""
    if name in ("augment_image", "augment_audio", "augment_text"):
        from pipelines import augment_ops

        return getattr(augment_ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_views(
    batch: pa.Table,
    *,
    spec: AugmentSpec,
    run_id: str,
    created_at: datetime | None = None,
) -> pa.Table:
    """Views of the train rows of a samples batch, ``spec.views_per_sample`` per sample, as a
    ``VIEW_ERRORS_SCHEMA`` table. Val/test rows yield nothing; bad inputs yield error rows.

    ``created_at`` defaults to now; pass it to make the whole table reproducible.
    """
    import pyarrow.compute as pc

    empty = pa.Table.from_pylist([], schema=VIEW_ERRORS_SCHEMA)
    if batch.num_rows == 0:
        return empty
    train = batch.filter(pc.equal(batch["split"], "train"))  # null split: not train
    train = train.select([c for c in VIEW_INPUT_COLUMNS if c in train.column_names])
    stamp = created_at or datetime.now(UTC)
    rows = [
        replay_view(sample, view, spec) | {"created_at": stamp, "run_id": run_id}
        for sample in train.to_pylist()
        for view in range(spec.views_per_sample)
    ]
    return pa.Table.from_pylist(rows, schema=VIEW_ERRORS_SCHEMA) if rows else empty


def make_missing_views(
    batch: pa.Table,
    *,
    spec: AugmentSpec,
    run_id: str,
    existing: frozenset[tuple[str, int]],
) -> pa.Table:
    """``make_views`` for the samples that lack some of their views; existing views are skipped.

    ``existing`` holds the (sample_id, view) pairs already stored at ``spec.seed``, so
    a rerun makes nothing and a larger ``views_per_sample`` adds only the new indices.
    """
    wanted = range(spec.views_per_sample)
    ids = batch.column("sample_id").to_pylist()
    todo = [any((sid, v) not in existing for v in wanted) for sid in ids]
    views = make_views(batch.filter(pa.array(todo, pa.bool_())), spec=spec, run_id=run_id)
    if not existing or views.num_rows == 0:
        return views
    keys = zip(views.column("sample_id").to_pylist(), views.column("view").to_pylist(), strict=True)
    keep = [key not in existing for key in keys]
    return views.filter(pa.array(keep, pa.bool_())) if not all(keep) else views
