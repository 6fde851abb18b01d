"""Per-sample quality statistics, computed where collect has the media decoded.

Each function takes what ``pipelines.decode`` already made (text, pixel array,
float audio) so a build decodes every input once. The stats are the usual
curation signals (Data-Juicer's text and image stats, common audio checks);
which of them reject a sample is the spec's ``quality.filters``
(``pipelines.filters``). ``STATS`` names every stat and its Arrow type (the
``quality`` table's columns, ``features.schema.QUALITY_STATS``): the names a
filter may use.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from features.schema import QUALITY_STATS

STATS: dict[str, pa.DataType] = {f.name: f.type for f in QUALITY_STATS}
NUMERIC_STATS = [name for name, kind in STATS.items() if not pa.types.is_string(kind)]
# measured after encoding, by `mmfp filter` (``pipelines.build.refilter``), not in collect:
# a build's filters pass a sample on them until then
CROSS_MODAL_STATS = [name for name in STATS if name.endswith("_similarity")]
REPEAT_N = 3
CLIP_LEVEL = 0.999
FRAME_SECONDS = 0.025
SILENCE_BELOW_DB = 40.0  # a frame this far under the loudest frame is silence
FLOOR_DB = -100.0  # what a digital-silence signal measures
_OPPONENT = np.array([[0, -1, 1], [-1, 0.5, 0.5]], np.float32)  # rows: rg, yb over B, G, R


def text_stats(text: str) -> dict[str, Any]:
    """Length, character classes, repetition and language of one caption or document."""
    chars = len(text)
    words = re.findall(r"\w+", text.lower())
    letters = sum(c.isalpha() for c in text)
    out: dict[str, Any] = {
        "text_chars": chars,
        "text_words": len(words),
        "text_alpha_ratio": letters / chars if chars else 0.0,
        "text_digit_ratio": sum(c.isdigit() for c in text) / chars if chars else 0.0,
        "text_upper_ratio": sum(c.isupper() for c in text) / letters if letters else 0.0,
        "text_space_ratio": sum(c.isspace() for c in text) / chars if chars else 0.0,
        "text_special_ratio": (
            sum(unicodedata.category(c)[0] in "PSC" for c in text) / chars if chars else 0.0
        ),
        "text_repeat_ratio": repeat_ratio(words),
    }
    lang, score = language_of(text)
    out.update(text_lang=lang, text_lang_score=score)
    return out


def repeat_ratio(words: list[str], n: int = REPEAT_N) -> float:
    """The share of word n-grams that occur more than once (Data-Juicer's word repetition):
    0 for text with no repeated phrase, near 1 for text that says one phrase over and over."""
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return sum(c for c in grams.values() if c > 1) / total if total else 0.0


_IDENTIFIER: Any = None


def language_of(text: str) -> tuple[str | None, float]:
    """(ISO 639-1 code, probability) from py3langid's model, which ships in its wheel
    (no download); ``(None, 0.0)`` for text with no letters."""
    global _IDENTIFIER
    if not any(c.isalpha() for c in text):
        return None, 0.0
    if _IDENTIFIER is None:  # ~0.5 s to load, once per worker
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lang, prob = _IDENTIFIER.classify(text)
    return str(lang), float(prob)


def image_stats(pixels: np.ndarray) -> dict[str, Any]:
    """Size, blur, brightness, colourfulness and perceptual hash of decoded pixels
    (OpenCV order: grey, BGR or BGRA; 8- or 16-bit)."""
    import cv2

    bgr, grey = colour_and_grey(pixels)
    height, width = grey.shape
    return {
        "image_width": width,
        "image_height": height,
        "image_aspect": width / height,
        "image_blur": float(cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))[1][0, 0] ** 2),
        "image_brightness": float(grey.mean()) / 255.0,
        "image_colourfulness": 0.0 if bgr is None else colourfulness(bgr),
        "image_phash": perceptual_hash(grey),
    }


def colour_and_grey(pixels: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(BGR or None for a grey image, grey), both uint8, from any decoded pixels."""
    import cv2

    image = _as_uint8(pixels)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return None, image
    bgr = image[:, :, :3]
    return bgr, cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)


def grey_thumbnail(pixels: np.ndarray) -> np.ndarray:
    """The 32x32 float32 grey thumbnail that pHash and the image fingerprint transform."""
    import cv2

    grey = colour_and_grey(pixels)[1]
    return cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        return (pixels >> 8).astype(np.uint8)
    return np.clip(pixels.astype(np.float64) * 255.0, 0, 255).astype(np.uint8)  # float in 0..1


def colourfulness(bgr: np.ndarray) -> float:
    """Hasler & Suesstrunk's colourfulness metric over the opponent channels
    rg = R - G and yb = (R + G) / 2 - B (one ``cv2.transform``: a third of NumPy's time)."""
    import cv2

    opponent = cv2.transform(bgr.astype(np.float32), _OPPONENT)  # (H, W, 2): rg, yb
    mean, std = (v[:, 0] for v in cv2.meanStdDev(opponent))
    return float(np.hypot(std[0], std[1]) + 0.3 * np.hypot(mean[0], mean[1]))


def perceptual_hash(grey: np.ndarray) -> str:
    """pHash: the 8x8 lowest frequencies of a 32x32 DCT, each bit set when above their median
    (the DC term left out). Re-encoding or resizing an image moves few bits."""
    import cv2

    low = cv2.dct(grey_thumbnail(grey))[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def audio_stats(samples: np.ndarray, sample_rate: int) -> dict[str, Any]:
    """Duration, level, clipping, silence and an SNR estimate of float audio
    (frames x channels, full scale 1.0), channels averaged."""
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    mono = mono.astype(np.float64)
    frame = max(1, int(sample_rate * FRAME_SECONDS))
    count = max(1, len(mono) // frame)
    framed = np.resize(mono, count * frame).reshape(count, frame) if len(mono) else np.zeros((1, 1))
    power = np.mean(framed**2, axis=1)
    level = _db(power)
    loudest = level.max()
    quiet, loud = np.percentile(power, 10), np.percentile(power, 95)
    peak = np.abs(samples).max(axis=1) if samples.ndim == 2 else np.abs(samples)
    return {
        "audio_duration": len(mono) / sample_rate,
        "audio_rms_db": float(_db(np.mean(mono**2) if len(mono) else 0.0)),
        "audio_clip_ratio": float(np.mean(peak >= CLIP_LEVEL)) if len(peak) else 0.0,
        "audio_silence_ratio": float(np.mean(level < loudest - SILENCE_BELOW_DB)),
        "audio_snr_db": float(_db(loud) - _db(quiet)),
    }


def _db(power: Any) -> Any:
    """Power to dB relative to full scale, floored at ``FLOOR_DB``."""
    return np.maximum(10.0 * np.log10(np.maximum(power, 1e-30)), FLOOR_DB)


def sample_stats(
    text: str | None, pixels: np.ndarray | None, audio: np.ndarray | None, sample_rate: int | None
) -> dict[str, Any]:
    """Every stat of the modalities a sample has (the others stay null)."""
    out: dict[str, Any] = {}
    if text is not None:
        out |= text_stats(text)
    if pixels is not None:
        out |= image_stats(pixels)
    if audio is not None and sample_rate:
        out |= audio_stats(audio, sample_rate)
    return out
