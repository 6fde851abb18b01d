"""Decode and validate one modality's bytes, refusing bad input with an ``InputError``.

Limits are checked before the expensive step: an image's pixel count from its
header before decoding, audio duration from its header before reading frames,
text length right after UTF-8 decoding.
"""

from __future__ import annotations

import io
import os
import tempfile
import unicodedata
import warnings
from dataclasses import dataclass

import numpy as np

from pipelines import errors

IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff"})
AUDIO_EXTS = frozenset({"wav", "flac", "ogg", "mp3", "aif", "aiff", "opus", "m4a"})
TEXT_EXTS = frozenset({"txt"})


def modality_of(ext: str) -> str | None:
    """``"image"``, ``"audio"``, ``"text"`` or ``None`` for a file extension (no dot)."""
    ext = ext.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in TEXT_EXTS:
        return "text"
    return None


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # as decoded (H, W[, C]), dtype kept: the identity hashes these
    format: str
    width: int
    height: int
    channels: int


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32 (frames, channels)
    format: str
    sample_rate: int
    channels: int
    duration: float


def decode_image(data: bytes, *, max_pixels: int) -> DecodedImage:
    import cv2
    from PIL import Image, UnidentifiedImageError

    cv2.utils.logging.setLogLevel(
        cv2.utils.logging.LOG_LEVEL_SILENT
    )  # silent: a refused image becomes a quarantine row, not stderr noise

    if not data:
        raise errors.EmptyFile("zero-byte image")
    # Our own bound (max_pixels) replaces Pillow's global decompression-bomb guard.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as header:
            fmt, (width, height) = (header.format or "unknown").lower(), header.size
    except UnidentifiedImageError as e:
        raise errors.ImageDecodeError("unrecognised image format") from e
    except Exception as e:  # Pillow's plugins raise anything on hostile headers
        raise errors.ImageDecodeError(f"unreadable image header: {_one_line(e)}") from e
    if width * height > max_pixels:
        raise errors.ImageTooLarge(
            f"header declares {width}x{height} = {width * height} pixels "
            f"> decode.max_image_pixels={max_pixels}"
        )
    try:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise errors.ImageDecodeError(f"OpenCV could not decode the {fmt}: {_one_line(e)}") from e
    if pixels is None:
        if _looks_truncated(data, fmt):
            raise errors.TruncatedImage(
                f"{fmt} data ends before its end marker ({len(data)} bytes)"
            )
        raise errors.ImageDecodeError(f"OpenCV could not decode the {fmt} ({len(data)} bytes)")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise errors.NonFiniteMedia(f"{fmt} pixels are NaN or infinite")
    channels = 1 if pixels.ndim == 2 else int(pixels.shape[2])
    return DecodedImage(pixels, fmt, int(pixels.shape[1]), int(pixels.shape[0]), channels)


def _looks_truncated(data: bytes, fmt: str) -> bool:
    tail = data.rstrip(b"\x00")[-16:]
    if fmt == "jpeg":
        return not tail.endswith(b"\xff\xd9")
    if fmt == "png":
        return b"IEND" not in tail
    return False


def decode_audio(data: bytes, *, max_seconds: float, ext: str = "") -> DecodedAudio:
    """soundfile first; librosa (audioread) for the formats libsndfile cannot read."""
    import soundfile as sf

    if not data:
        raise errors.EmptyFile("zero-byte audio")
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, TypeError) as e:
        return _decode_audio_fallback(data, max_seconds=max_seconds, ext=ext, first_error=e)
    if info.frames <= 0 or info.samplerate <= 0:
        raise errors.EmptyAudio(f"{info.format} with {info.frames} frames")
    _check_duration(info.frames / info.samplerate, max_seconds)
    try:
        samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as e:
        raise errors.AudioDecodeError(f"unreadable frames: {_soundfile_reason(e)}") from e
    if samples.shape[0] == 0:
        raise errors.EmptyAudio(f"{info.format} decoded to no frames")
    _check_finite(samples)
    return DecodedAudio(
        samples,
        info.format.lower(),
        int(sample_rate),
        int(samples.shape[1]),
        samples.shape[0] / sample_rate,
    )


def _decode_audio_fallback(
    data: bytes, *, max_seconds: float, ext: str, first_error: Exception
) -> DecodedAudio:
    import librosa

    # audioread wants a path; the file is ours and short-lived. Not a frame past the
    # limit is decoded: a longer file is refused by what the bounded read returns.
    with tempfile.NamedTemporaryFile(suffix=f".{ext or 'bin'}", delete=False) as tmp:
        tmp.write(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # librosa's audioread notice
            warnings.simplefilter("ignore", UserWarning)  # "PySoundFile failed": we know
            samples, sample_rate = librosa.load(
                tmp.name, sr=None, mono=False, duration=max_seconds + 1.0
            )
        _check_duration(np.atleast_2d(samples).shape[-1] / sample_rate, max_seconds)
    except errors.InputError:
        raise
    except Exception as e:
        raise errors.AudioDecodeError(
            f"neither soundfile ({_soundfile_reason(first_error)}) nor librosa "
            f"({type(e).__name__}) could decode it"
        ) from e
    finally:
        os.unlink(tmp.name)
    samples = np.atleast_2d(samples).T.astype(np.float32)  # librosa gives (channels, frames)
    if samples.shape[0] == 0:
        raise errors.EmptyAudio("decoded to no frames")
    _check_finite(samples)
    return DecodedAudio(
        samples,
        ext or "unknown",
        int(sample_rate),
        samples.shape[1],
        samples.shape[0] / sample_rate,
    )


def _soundfile_reason(error: Exception) -> str:
    # LibsndfileError's str() names the BytesIO object; its error_string does not.
    return getattr(error, "error_string", None) or str(error)


def _check_finite(samples: np.ndarray) -> None:
    # a NaN sample passes every format check and then breaks every encoder that reads it
    if not np.isfinite(samples).all():
        raise errors.NonFiniteMedia("audio samples are NaN or infinite")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]


def _check_duration(seconds: float, max_seconds: float) -> None:
    if seconds > max_seconds:
        raise errors.AudioTooLong(f"{seconds:.1f} s > decode.max_audio_seconds={max_seconds:g}")


def decode_text(data: bytes | str, *, max_chars: int) -> str:
    """UTF-8 (strict), Unicode NFC, whitespace runs collapsed: the normalised caption."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise errors.TextDecodeError(f"not valid UTF-8: {e}") from e
    text = " ".join(unicodedata.normalize("NFC", data).split())
    if not text:
        raise errors.EmptyText("empty after whitespace normalisation")
    if len(text) > max_chars:
        raise errors.TextTooLong(f"{len(text)} characters > decode.max_text_chars={max_chars}")
    return text
