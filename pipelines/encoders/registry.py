"""The encoder registry: built-in names plus ``"package.module:Class"`` for user encoders.

Built-ins import nothing heavy at module level (torch, transformers, cv2 and
librosa load inside the methods that use them), so they sit in a plain dict.
Encoders that live above the library (``checkpoint`` needs the trainer's towers) or
in another installed package register a name in the ``mmfp.encoders`` entry-point
group (``pyproject.toml``): the library never imports jobs/, and a Ray worker finds
them from the name alone. User encoders are imported only when a spec names them.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import EntryPoint, entry_points

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
ENTRY_POINT_GROUP = "mmfp.encoders"


@functools.cache
def registered() -> dict[str, EntryPoint]:
    """Encoder names installed packages register (``mmfp.encoders`` entry points)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in ENCODERS}


def is_builtin(name: str) -> bool:
    """True for mmfp's own encoders: a store naming one needs no trust to import it.

    Names another installed package registers are not: a store could name one that
    the reader never meant to run.
    """
    ep = registered().get(name)
    return name in ENCODERS or (ep is not None and ep.dist is not None and ep.dist.name == "mmfp")


def encoder_class(name: str) -> type[Encoder]:
    """The class for a registry name, a registered entry point or a ``module:Class`` path."""
    if name in ENCODERS:
        return ENCODERS[name]
    ep = registered().get(name)
    name = ep.value if ep is not None else name
    known = ", ".join(sorted([*ENCODERS, *registered()]))
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
