"""CPU preprocessing for Hugging Face towers: tokenizer / image processor / feature extractor.

Every array has a fixed per-row shape (text padded to ``max_length``, audio
cropped and padded to a fixed duration), so Ray Data can re-batch rows between
the CPU tasks and the GPU actors. Model inputs are keyed ``<modality>__<name>``
and sit next to ``<modality>_mask``; masked rows hold placeholders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipelines.encoders import media

if TYPE_CHECKING:
    import torch


def text_inputs(tokenizer: Any, batch: pa.Table, *, max_length: int) -> dict[str, np.ndarray]:
    values, mask = media.texts(media.column(batch, "text"))
    encoded = tokenizer(
        values or [""], padding="max_length", truncation=True, max_length=max_length,
        return_tensors="np",
    )  # fmt: skip
    out = {f"text__{k}": np.asarray(v, np.int32)[: len(values)] for k, v in encoded.items()}
    return out | {"text_mask": mask}


@dataclass(frozen=True)
class PixelScale:
    """An image processor's last two steps, ``x * rescale`` then ``(x - mean) / std``.

    Preprocessing ships the resized, cropped uint8 pixels and the model's device applies
    this: a quarter of the bytes between the CPU tasks and the accelerator (150 KB a row
    at 224 px, against 602 KB of float32), and none of the processor's float arithmetic
    on the CPUs that have to keep the accelerator fed.
    """

    rescale: float
    mean: tuple[float, ...]  # one per channel, or one for all
    std: tuple[float, ...]

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 -> the processor's float32 ``pixel_values``, where they are."""
        import torch

        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device)
        return (pixels.float() * self.rescale - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def pixel_scale(processor: Any) -> PixelScale | None:
    """``processor``'s rescale + normalise, or None if it cannot be moved to the device.

    Trusted only when applying it to the processor's own uint8 output (rescale and
    normalise off) reproduces the processor's float output on a probe image; a processor
    that pads, reorders or resizes in float after that point keeps the float32 path.
    """
    try:
        rescale = float(processor.rescale_factor) if processor.do_rescale else 1.0
        normalize = bool(processor.do_normalize)
        mean = _floats(processor.image_mean) if normalize else (0.0,)
        std = _floats(processor.image_std) if normalize else (1.0,)
    except (AttributeError, TypeError, ValueError):
        return None
    probe = np.random.default_rng(0).integers(0, 256, (61, 47, 3), dtype=np.uint8)
    try:
        full = processor(images=[probe], return_tensors="np")["pixel_values"]
        raw = processor(
            images=[probe], do_rescale=False, do_normalize=False, return_tensors="np"
        )["pixel_values"]  # fmt: skip
    except (TypeError, ValueError, KeyError):
        return None
    full, raw = np.asarray(full, np.float32), np.asarray(raw)
    channels = raw.shape[1] if raw.ndim == 4 else 0
    if raw.dtype != np.uint8 or full.shape != raw.shape or len(mean) not in (1, channels):
        return None
    if len(std) != len(mean) or min(std) <= 0:
        return None
    import torch

    scale = PixelScale(rescale, mean, std)  # checked by the very code the device runs
    if not np.allclose(scale.apply(torch.from_numpy(raw)).numpy(), full, rtol=0, atol=1e-4):
        return None
    return scale


def _floats(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in np.atleast_1d(np.asarray(value, np.float64)))


def image_inputs(
    processor: Any, batch: pa.Table, scale: PixelScale | None = None
) -> dict[str, np.ndarray]:
    """The processor's ``pixel_values``: uint8 before its rescale and normalisation when
    ``scale`` (from ``pixel_scale``) will do them on the device, else its float32 output."""
    images = [media.decode_rgb(v) for v in media.column(batch, "image")]
    mask = np.array([img is not None for img in images], dtype=bool)
    present = [img for img in images if img is not None]
    # With no image in the batch, one black placeholder tells us the output shape.
    kwargs = {"do_rescale": False, "do_normalize": False} if scale else {}
    pixels = processor(
        images=present or [np.zeros((8, 8, 3), np.uint8)], return_tensors="np", **kwargs
    )
    values = np.asarray(pixels["pixel_values"], dtype=np.uint8 if scale else np.float32)
    out = np.zeros((len(images), *values.shape[1:]), dtype=values.dtype)
    out[mask] = values[: int(mask.sum())]
    return {"image__pixel_values": out, "image_mask": mask}


def audio_inputs(extractor: Any, batch: pa.Table, *, max_seconds: float) -> dict[str, np.ndarray]:
    """Extractor features for audio cropped to ``max_seconds`` (from the start, never at random).

    ``audio_fraction`` is the share of the padded input that is real audio, which
    mean pooling uses to ignore padding frames whatever the model's frame rate.
    """
    rate = int(extractor.sampling_rate)
    limit = round(max_seconds * rate)
    # CLAP's extractor crops longer audio at random: never give it more than it keeps.
    limit = min(limit, int(getattr(extractor, "nb_max_samples", limit)))
    waves = [media.decode_mono(v, rate) for v in media.column(batch, "audio")]
    mask = np.array([w is not None for w in waves], dtype=bool)
    present = [w[:limit] for w in waves if w is not None] or [np.zeros(rate // 10, np.float32)]
    kwargs: dict[str, Any] = {"sampling_rate": rate, "return_tensors": "np"}
    padded = _padded_samples(extractor, limit)
    if _raw_waveform(extractor):  # wav2vec2 family: we choose the fixed length
        kwargs |= {"padding": "max_length", "max_length": limit, "truncation": True}
    features = extractor(present, **kwargs)
    out: dict[str, np.ndarray] = {}
    for key, value in features.items():
        value = np.asarray(value)
        if key == "is_longer":  # CLAP: nothing is longer after our crop; stable and per-row
            value = np.zeros_like(value, dtype=bool)
        full = np.zeros((len(waves), *value.shape[1:]), dtype=value.dtype)
        full[mask] = value[: int(mask.sum())]
        out[f"audio__{key}"] = full
    lengths = np.array([min(len(w), limit) if w is not None else 0 for w in waves])
    out["audio_fraction"] = np.minimum(lengths / max(padded, 1), 1.0).astype(np.float32)
    return out | {"audio_mask": mask}


def _raw_waveform(extractor: Any) -> bool:
    from transformers import Wav2Vec2FeatureExtractor

    return isinstance(extractor, Wav2Vec2FeatureExtractor)


def _padded_samples(extractor: Any, limit: int) -> int:
    """How many samples the extractor's fixed-size output spans."""
    if _raw_waveform(extractor):
        return limit
    n_samples = getattr(extractor, "n_samples", None)  # Whisper: always chunk_length seconds
    if isinstance(n_samples, int):
        return n_samples
    return limit
