"""The ``augment:`` section of a pipeline spec: image ops, audio and text augmentation.

Image ops are albumentations transforms by class name, constructed when the
spec is validated (``pipelines.augment_image.build_transform``), so a typo
fails before any Ray work starts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.augment_image import build_transform

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
