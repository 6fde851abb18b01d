"""CPU preprocessing for Hugging Face towers: tokenizer / image processor / feature extractor.

Every array has a fixed per-row shape (text padded to ``max_length``, audio
cropped and padded to a fixed duration), so Ray Data can re-batch rows between
the CPU tasks and the GPU actors. Model inputs are keyed ``<modality>__<name>``
and sit next to ``<modality>_mask``; masked rows hold placeholders.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.encoders import media


def text_inputs(tokenizer: Any, batch: pa.Table, *, max_length: int) -> dict[str, np.ndarray]:
    values, mask = media.texts(media.column(batch, "text"))
    encoded = tokenizer(
        values or [""], padding="max_length", truncation=True, max_length=max_length,
        return_tensors="np",
    )  # fmt: skip
    out = {f"text__{k}": np.asarray(v, np.int32)[: len(values)] for k, v in encoded.items()}
    return out | {"text_mask": mask}


def image_inputs(processor: Any, batch: pa.Table) -> dict[str, np.ndarray]:
    images = [media.decode_rgb(v) for v in media.column(batch, "image")]
    mask = np.array([img is not None for img in images], dtype=bool)
    present = [img for img in images if img is not None]
    # With no image in the batch, one black placeholder tells us the output shape.
    pixels = processor(images=present or [np.zeros((8, 8, 3), np.uint8)], return_tensors="np")
    values = np.asarray(pixels["pixel_values"], dtype=np.float32)
    out = np.zeros((len(images), *values.shape[1:]), dtype=np.float32)
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
