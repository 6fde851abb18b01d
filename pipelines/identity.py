"""Content identities: the same sample gets the same id in every run, on every worker."""

from __future__ import annotations

import hashlib

import numpy as np


def sample_id(
    *,
    text: str | None = None,
    pixels: np.ndarray | None = None,
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
) -> str:
    """BLAKE2b-128 of the normalised content of every modality a sample has.

    Hashes decoded content, not file bytes: the same pixels as PNG or BMP, the
    same PCM as WAV or FLAC, and the same caption with other whitespace are one
    sample. Each part is tagged with its modality and shape so that no two
    different samples can concatenate to the same stream.
    """
    h = hashlib.blake2b(digest_size=16)
    if text is not None:
        encoded = text.encode("utf-8")
        h.update(b"text\0%d\0" % len(encoded))
        h.update(encoded)
    if pixels is not None:
        h.update(f"image\0{pixels.dtype.str}\0{pixels.shape}\0".encode())
        h.update(np.ascontiguousarray(pixels).data)
    if audio is not None:
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        h.update(f"audio\0{sample_rate}\0{audio.shape}\0".encode())
        h.update(audio.data)
    return h.hexdigest()


def stable_unit_interval(*parts: object) -> float:
    """A number in [0, 1) that depends only on ``parts``: the basis of hash splits."""
    key = "\x1f".join(str(p) for p in parts).encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def short_hash(*parts: object, size: int = 16) -> str:
    key = "\x1f".join(str(p) for p in parts).encode()
    return hashlib.blake2b(key, digest_size=size).hexdigest()
