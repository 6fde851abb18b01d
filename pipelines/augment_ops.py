"""Per-modality augmentation ops: bytes (or a caption) and a seed in, new bytes and a record out.

Each op is a pure function of its input and ``seed``: it builds its own generators from the
seed and touches no global random state, so the same call gives the same bytes anywhere.
Outputs are lossless (PNG, WAV PCM16) so replayed views compare equal byte for byte. Errors
that odd inputs cause in OpenCV, albumentations, soundfile or librosa are turned into
``AugmentError`` naming the modality and the cause; anything else is a bug and propagates.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import librosa
import numpy as np
import soundfile as sf

from pipelines.augment import AugmentError, build_transform

if TYPE_CHECKING:
    from pipelines.augment import AudioAugment, ImageOp, TextAugment

# Time stretch and pitch shift run an STFT; shorter clips have no meaningful spectrum.
MIN_STFT_FRAMES = 512
_MAX_RECORDED_ARRAY = 16  # larger arrays (noise maps) are recorded by shape, not values
_PUNCT = (".", ",", "!", "?", ";")


def _jsonable(value: Any) -> Any:
    """Applied albumentations params as plain JSON values (numpy scalars, tuples, arrays)."""
    if isinstance(value, np.ndarray):
        if value.size <= _MAX_RECORDED_ARRAY:
            return _jsonable(value.tolist())
        return {"ndarray": list(value.shape), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """16-bit and float images scaled to uint8: albumentations' pixel ops expect uint8."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return np.round(img / 257.0).astype(np.uint8)
    if img.dtype.kind == "f":
        return np.round(np.clip(np.nan_to_num(img), 0.0, 1.0) * 255).astype(np.uint8)
    raise AugmentError(f"image: unsupported pixel type {img.dtype}")


def _compose(ops: Sequence[ImageOp], seed: int) -> Any:
    """A fresh pipeline per view, seeded with ``seed`` (a reused one carries its RNG state
    from call to call, so a view would depend on the views made before it).

    ``Compose(seed=s)`` gives every transform the *same* seed, so their draws are identical
    streams: with p=0.5 each, all ops fire together or not at all. Each transform is therefore
    reseeded with its own derived seed after the Compose has set them.
    """
    import albumentations as A  # here, after pipelines.augment turned its update check off

    transforms = [build_transform(op.name, op.params) for op in ops]
    # Alpha rides along as the mask: geometric ops move it with the pixels, colour ops leave
    # it alone; linear interpolation keeps soft edges soft.
    compose = A.Compose(
        transforms, seed=seed, save_applied_params=True, mask_interpolation=cv2.INTER_LINEAR
    )
    for i, transform in enumerate(transforms):
        transform.set_random_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
    return compose


def augment_image(data: bytes, *, ops: Sequence[ImageOp], seed: int) -> tuple[bytes, dict]:
    """Decode, augment with the albumentations ``ops``, encode as PNG.

    Grayscale inputs become 3-channel BGR (colour ops need 3 channels); BGRA inputs keep
    their alpha, transformed as a mask. Returns the PNG and a record: the op names, the
    params of the ops that fired, the seed, and the input and output shapes.
    """
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        raise AugmentError(f"image: OpenCV cannot decode {len(data)} bytes: {e}") from e
    if img is None:
        raise AugmentError(f"image: OpenCV cannot decode {len(data)} bytes")
    img = _to_uint8(img)
    input_shape = list(img.shape)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    alpha = None
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    elif img.shape[2] == 4:
        img, alpha = np.ascontiguousarray(img[:, :, :3]), np.ascontiguousarray(img[:, :, 3])
    elif img.shape[2] != 3:
        raise AugmentError(f"image: {img.shape[2]} channels; expected 1, 3 or 4")
    from albumentations.augmentations.crops.transforms import CropSizeError  # not a ValueError

    targets = {"image": img} if alpha is None else {"image": img, "mask": alpha}
    try:
        out = _compose(ops, seed)(**targets)
    except (cv2.error, ValueError, CropSizeError) as e:
        names = [op.name for op in ops]
        raise AugmentError(f"image: {names} failed on a {input_shape} image: {e}") from e
    pixels = out["image"]
    if alpha is not None:
        pixels = np.dstack([pixels, out["mask"]])
    ok, buf = cv2.imencode(".png", pixels)
    if not ok:
        raise AugmentError(f"image: OpenCV cannot encode a {list(pixels.shape)} PNG")
    record = {
        "seed": seed,
        "ops": [op.name for op in ops],
        "applied": [{"name": n, "params": _jsonable(p)} for n, p in out["applied_transforms"]],
        "input_shape": input_shape,
        "output_shape": list(pixels.shape),
    }
    return buf.tobytes(), record


def _shift(y: np.ndarray, frames: int) -> np.ndarray:
    """Move the clip ``frames`` later (earlier if negative), zero-filling the gap."""
    out = np.zeros_like(y)
    if frames >= 0:
        out[:, frames:] = y[:, : y.shape[1] - frames]
    else:
        out[:, :frames] = y[:, -frames:]
    return out


def _audio_ops(y: np.ndarray, sr: int, spec: AudioAugment, seed: int) -> tuple[np.ndarray, dict]:
    """Apply the random ops to a (channels, frames) clip; each op draws from its own
    generator, so turning one op off does not change what the others do."""
    record: dict[str, Any] = {}

    def rng(op: int) -> np.random.Generator:
        return np.random.default_rng([seed, op])

    def stft(y: np.ndarray) -> dict[str, int]:  # librosa's 2048 window, or one that fits
        n_fft = min(2048, 1 << (y.shape[1].bit_length() - 1))
        return {"n_fft": n_fft, "hop_length": n_fft // 4}

    if spec.time_stretch is not None and (g := rng(0)).random() < spec.p:
        rate = float(g.uniform(*spec.time_stretch))
        y = librosa.effects.time_stretch(y, rate=rate, **stft(y))
        record["time_stretch"] = rate
    if spec.pitch_shift is not None and (g := rng(1)).random() < spec.p:
        steps = float(g.uniform(*spec.pitch_shift))
        y = librosa.effects.pitch_shift(y, sr=sr, n_steps=steps, **stft(y))
        record["pitch_shift"] = steps
    if spec.crop_seconds is not None:  # always: it fixes the output length
        g, target, n = rng(2), max(1, round(spec.crop_seconds * sr)), y.shape[1]
        start = int(g.integers(0, abs(n - target) + 1))
        if n >= target:
            y = y[:, start : start + target]
        else:
            y = np.pad(y, ((0, 0), (start, target - n - start)))
        record["crop"] = {"start" if n >= target else "pad_before": start, "frames": target}
    if spec.time_shift_max > 0 and (g := rng(3)).random() < spec.p:
        frames = round(g.uniform(-spec.time_shift_max, spec.time_shift_max) * sr)
        frames = int(np.clip(frames, -y.shape[1], y.shape[1]))
        y = _shift(y, frames)
        record["time_shift_frames"] = frames
    if spec.gain_db is not None and (g := rng(4)).random() < spec.p:
        db = float(g.uniform(*spec.gain_db))
        y = y * 10 ** (db / 20)
        record["gain_db"] = db
    if spec.noise_snr_db is not None and (g := rng(5)).random() < spec.p:
        snr = float(g.uniform(*spec.noise_snr_db))
        power = float(np.mean(np.square(y, dtype=np.float64)))
        # A silent clip has no SNR to keep: it stays silent.
        std = np.sqrt(power / 10 ** (snr / 10)) if power > 0 else 0.0
        y = y + g.normal(0.0, std, y.shape)
        record["noise_snr_db"] = snr
    return np.clip(y, -1.0, 1.0).astype(np.float32), record


def augment_audio(data: bytes, *, spec: AudioAugment, seed: int) -> tuple[bytes, int, float, dict]:
    """Decode, downmix (if ``spec.mono``), resample to ``spec.sample_rate``, augment, clip,
    encode as WAV PCM16. Returns (wav, sample rate, duration in seconds, record)."""
    try:
        y, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.SoundFileError, ValueError) as e:
        raise AugmentError(f"audio: soundfile cannot decode {len(data)} bytes: {e}") from e
    y = y.T  # (channels, frames): the layout librosa works in
    if y.shape[1] == 0:
        raise AugmentError("audio: the clip has no frames")
    channels_in = y.shape[0]
    if spec.mono:
        y = y.mean(axis=0, keepdims=True)
    try:
        if sr != spec.sample_rate:
            y = librosa.resample(y, orig_sr=sr, target_sr=spec.sample_rate, axis=-1)
        needs_stft = spec.time_stretch is not None or spec.pitch_shift is not None
        if needs_stft and y.shape[1] < MIN_STFT_FRAMES:
            raise AugmentError(
                f"audio: {y.shape[1]} frames at {spec.sample_rate} Hz is too short; time "
                f"stretch and pitch shift need at least {MIN_STFT_FRAMES} (set them to null "
                "to augment such clips)"
            )
        y, record = _audio_ops(y, spec.sample_rate, spec, seed)
    except (ValueError, librosa.ParameterError) as e:
        raise AugmentError(f"audio: augmenting a {y.shape} clip failed: {e}") from e
    if y.shape[1] == 0:
        raise AugmentError("audio: no frames left after augmentation")
    buf = io.BytesIO()
    sf.write(buf, y.T, spec.sample_rate, format="WAV", subtype="PCM_16")
    duration = y.shape[1] / spec.sample_rate
    record |= {"seed": seed, "input_sample_rate": sr, "input_channels": channels_in}
    record |= {"channels": y.shape[0], "frames": y.shape[1]}
    return buf.getvalue(), spec.sample_rate, duration, record


def augment_text(text: str, *, spec: TextAugment, seed: int) -> tuple[str, dict]:
    """Word dropout, swaps, case and punctuation noise, then a paraphrase template.

    Works on whitespace-separated words; at least one word of the caption always survives.
    """
    words = text.split()
    if not words:
        raise AugmentError("text: the caption is empty")
    rng = np.random.default_rng(seed)
    keep = rng.random(len(words)) >= spec.word_delete_p
    if not keep.any():
        keep[rng.integers(len(words))] = True
    record: dict[str, Any] = {"seed": seed, "deleted": np.flatnonzero(~keep).tolist()}
    words = [w for w, k in zip(words, keep, strict=True) if k]
    swaps = []
    for _ in range(spec.word_swaps if len(words) > 1 else 0):
        i, j = (int(v) for v in rng.choice(len(words), size=2, replace=False))
        words[i], words[j] = words[j], words[i]
        swaps.append([i, j])
    case, punct = {}, {}
    for i, word in enumerate(words):
        if rng.random() < spec.case_noise_p:
            style = ("lower", "upper", "capitalize")[int(rng.integers(3))]
            words[i] = getattr(word, style)()
            case[str(i)] = style
        if rng.random() < spec.punct_noise_p:
            stripped = words[i].rstrip("".join(_PUNCT))
            if stripped and stripped != words[i]:
                words[i], punct[str(i)] = stripped, "-"
            else:
                mark = _PUNCT[int(rng.integers(len(_PUNCT)))]
                words[i], punct[str(i)] = words[i] + mark, mark
    template = spec.templates[int(rng.integers(len(spec.templates)))] if spec.templates else None
    out = " ".join(words)
    if template is not None:
        out = template.replace("{text}", out)  # replace, not format: captions may hold braces
    record |= {"swaps": swaps, "case": case, "punct": punct, "template": template}
    return out, record
