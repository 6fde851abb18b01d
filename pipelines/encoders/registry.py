"""The encoder registry: built-in names plus ``"package.module:Class"`` for user encoders.

Built-ins import nothing heavy at module level (torch, transformers, cv2 and
librosa load inside the methods that use them), so they sit in a plain dict.
User encoders are imported only when a spec names them.
"""

from __future__ import annotations

import importlib

from pipelines.encoders.base import Encoder, EncoderConfig
from pipelines.encoders.hf import HFAudio, HFImage, HFText
from pipelines.encoders.joint import Clap, Clip
from pipelines.encoders.model_inputs import AudioLogMel, ImagePixels, TextIds
from pipelines.errors import SpecError

ENCODERS: dict[str, type[Encoder]] = {
    "image_pixels": ImagePixels,
    "audio_logmel": AudioLogMel,
    "text_ids": TextIds,
    "hf_text": HFText,
    "hf_image": HFImage,
    "hf_audio": HFAudio,
    "clip": Clip,
    "clap": Clap,
}
# Built-in encoders that live above the library (they need the trainer's towers):
# resolved by import path on first use, like a user encoder, so the library never
# imports jobs/ and a Ray worker finds them from the name alone.
ENCODER_PATHS: dict[str, str] = {"checkpoint": "jobs.pretrain.encoder:Trained"}


def is_builtin(name: str) -> bool:
    """True for mmfp's own encoders: a store naming one needs no trust to import it."""
    return name in ENCODERS or name in ENCODER_PATHS


def encoder_class(name: str) -> type[Encoder]:
    """The class for a registry name or a ``module:Class`` dotted path."""
    if name in ENCODERS:
        return ENCODERS[name]
    name = ENCODER_PATHS.get(name, name)
    known = ", ".join(sorted([*ENCODERS, *ENCODER_PATHS]))
    if ":" not in name:
        raise SpecError(
            f"unknown encoder {name!r}; known encoders: {known}. "
            "HINT: a user encoder is named by its import path, 'package.module:ClassName'"
        )
    module_name, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"cannot import encoder {name!r}: {e}; known encoders: {known}") from e
    if not (isinstance(cls, type) and issubclass(cls, Encoder)):
        raise SpecError(f"encoder {name!r} is not a subclass of pipelines.encoders.Encoder")
    return cls


def get_encoder(config: EncoderConfig) -> Encoder:
    """Construct the configured encoder (reads model configs, loads no weights)."""
    return encoder_class(config.name)(config)
