"""Audio views: waveform augmentation with librosa, seeded per op.

Each op is a pure function of its input and ``seed``: it builds its own
generators from the seed and touches no global random state, so the same call
gives the same bytes anywhere. Output is WAV PCM16 (lossless), and errors odd
clips cause in soundfile or librosa become ``AugmentError``s naming the cause.
"""

from __future__ import annotations

import io
from typing import Any

import librosa
import numpy as np
import soundfile as sf

from pipelines.augment_spec import AudioAugment
from pipelines.errors import AugmentError

# Time stretch and pitch shift run an STFT; shorter clips have no meaningful spectrum.
MIN_STFT_FRAMES = 512


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
