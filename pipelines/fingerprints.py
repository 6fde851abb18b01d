"""Perceptual fingerprints for near-duplicate search, one per modality.

Image and audio fingerprints are unit vectors compared by cosine, so one search
(``pipelines.pairs.cosine_pairs``) serves them and a feature set's embeddings
alike; text gets MinHash signatures compared by agreement (``minhash_pairs``).
Each is chosen to survive what a copy goes through and to separate different
recordings of the same thing (measured on spoken-digits-dev: README, BENCHMARKS):

- image: pHash's 8x8 lowest DCT frequencies of the 32x32 thumbnail, for the luma
  and both chroma planes (YCrCb), kept as real numbers (the DC terms dropped, so
  brightness does not count, and contrast cancels in the cosine). What pHash's
  median cut throws away tells two handwritten sevens apart, and the chroma
  planes a shape whose colour differs from its background more than its grey.
- audio: a 32x32 log-mel picture of the whole clip at 8 kHz, floored 40 dB under
  its loudest cell and centred, so gain, resampling and a noise floor below the
  speech do not move it.
- text: MinHash over character 5-grams of the case-folded, NFKC-normalised text
  with whitespace collapsed: a copy with changed spacing or case is identical.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.decode import decode_audio, decode_image
from pipelines.errors import InputError
from pipelines.pairs import vectors_column

AUDIO_RATE = 8000  # the fingerprint's band: telephone speech and up
AUDIO_MELS = 32
AUDIO_FRAMES = 32
AUDIO_TOP_DB = 40.0
SHINGLE = 5
NUM_PERM = 128
MINHASH_SEED = 1
_SPACE = re.compile(r"\s+")


def image_fingerprint(pixels: np.ndarray) -> np.ndarray:
    """A unit vector of 3 x 63 DCT coefficients (see the module docstring)."""
    import cv2

    from pipelines.quality import colour_and_grey

    bgr, grey = colour_and_grey(pixels)
    colour = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR) if bgr is None else bgr
    small = cv2.resize(
        cv2.cvtColor(colour, cv2.COLOR_BGR2YCrCb), (32, 32), interpolation=cv2.INTER_AREA
    )
    planes = np.moveaxis(small.astype(np.float32), 2, 0)
    low = np.concatenate([cv2.dct(p)[:8, :8].flatten()[1:] for p in planes])
    if not np.abs(low).max() > 1e-3:  # a flat image (blank page, placeholder): all alike
        return _unit(np.ones_like(low))
    return _unit(low)


def audio_fingerprint(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """A unit vector of the clip's centred 32x32 log-mel picture (see the module docstring)."""
    import cv2
    import librosa

    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    mono = np.asarray(mono, np.float32)
    if sample_rate != AUDIO_RATE:
        mono = librosa.resample(mono, orig_sr=sample_rate, target_sr=AUDIO_RATE)
    if len(mono) < 256:
        mono = np.pad(mono, (0, 256 - len(mono)))
    mel = librosa.feature.melspectrogram(
        y=mono, sr=AUDIO_RATE, n_fft=256, hop_length=80, n_mels=AUDIO_MELS, fmax=AUDIO_RATE / 2
    )
    if not mel.any():  # digital silence: every silent clip is the same
        return _unit(np.ones(AUDIO_MELS * AUDIO_FRAMES, np.float32))
    db = librosa.power_to_db(mel, ref=np.max, top_db=AUDIO_TOP_DB)
    picture = cv2.resize(db, (AUDIO_FRAMES, AUDIO_MELS), interpolation=cv2.INTER_AREA).flatten()
    return _unit(picture - picture.mean())


def normalise_text(text: str) -> str:
    """What two copies of one text share: NFKC, case-folded, whitespace collapsed."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def text_signature(text: str, num_perm: int = NUM_PERM) -> np.ndarray:
    """MinHash (datasketch) of the normalised text's character 5-grams, as uint32."""
    from datasketch import MinHash

    norm = normalise_text(text)
    grams = {norm[i : i + SHINGLE] for i in range(max(1, len(norm) - SHINGLE + 1))}
    minhash = MinHash(num_perm=num_perm, seed=MINHASH_SEED)
    minhash.update_batch([g.encode("utf-8") for g in grams])
    return minhash.hashvalues.astype(np.uint32)


def _fingerprint(
    modality: str, value: Any, kind: str | None, max_pixels: int, max_seconds: float
) -> np.ndarray:
    if modality == "image":
        return image_fingerprint(decode_image(value, max_pixels=max_pixels).pixels)
    if modality == "audio":
        audio = decode_audio(value, max_seconds=max_seconds, ext=kind or "")
        return audio_fingerprint(audio.samples, audio.sample_rate)
    return text_signature(value)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def fingerprint_batch(
    batch: pa.Table, *, modality: str, max_image_pixels: int, max_audio_seconds: float
) -> pa.Table:
    """``sample_id`` and ``fingerprint`` of each row of ``samples`` that has ``modality``
    (rows without it are left out; stored media decoded once, within the spec's limits: a
    stored file the limits refuse now, e.g. after ``max_image_pixels`` was lowered, is
    left out rather than failing the search)."""
    ids = batch.column("sample_id").to_pylist()
    values = batch.column(modality).to_pylist()
    formats = batch.column("audio_format").to_pylist() if modality == "audio" else [None] * len(ids)
    out_ids: list[str] = []
    prints: list[Any] = []
    for sample_id, value, kind in zip(ids, values, formats, strict=True):
        if value is None:
            continue
        try:
            print_ = _fingerprint(modality, value, kind, max_image_pixels, max_audio_seconds)
        except InputError:
            continue
        out_ids.append(sample_id)
        prints.append(print_)
    column = vectors_column(prints, pa.uint32() if modality == "text" else pa.float32())
    return pa.table({"sample_id": pa.array(out_ids, pa.string()), "fingerprint": column})
