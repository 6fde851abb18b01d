"""Batch columns to decoded media for encoders: RGB uint8 images and mono float audio.

Samples reaching an encoder were validated by collect, so a value that still
fails to decode here is treated like a missing modality (its row's mask is
False, its features null) and logged, rather than failing the whole batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import errors

log = logging.getLogger(__name__)


def column(batch: pa.Table | Mapping[str, Sequence[Any]], name: str) -> list[Any]:
    """A column as Python values; an absent column is all ``None`` (modality missing)."""
    if isinstance(batch, pa.Table):
        if name in batch.column_names:
            return batch.column(name).to_pylist()
        return [None] * batch.num_rows
    if name in batch:
        return list(batch[name])
    rows = len(next(iter(batch.values()))) if batch else 0
    return [None] * rows


def decode_rgb(data: bytes | None) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB, whatever the file's depth or channels; None if undecodable."""
    import cv2

    if not data:
        return None
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if pixels is None:
        log.warning("encoder input: an image (%d bytes) did not decode; row left null", len(data))
        return None
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def decode_mono(data: bytes | None, sample_rate: int) -> np.ndarray | None:
    """Float32 mono waveform at ``sample_rate``; None if undecodable."""
    if not data:
        return None
    from pipelines.decode import decode_audio

    try:
        audio = decode_audio(bytes(data), max_seconds=float("inf"))
    except errors.InputError as e:
        log.warning("encoder input: audio did not decode (%s); row left null", e)
        return None
    wave = audio.samples.mean(axis=1, dtype=np.float32)
    if audio.sample_rate != sample_rate:
        import librosa

        wave = librosa.resample(wave, orig_sr=audio.sample_rate, target_sr=sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


def texts(values: list[Any]) -> tuple[list[str], np.ndarray]:
    """Texts with ``""`` for missing rows, and the mask of rows that have text."""
    mask = np.array([isinstance(v, str) and bool(v.strip()) for v in values], dtype=bool)
    return [v if ok else "" for v, ok in zip(values, mask, strict=True)], mask
