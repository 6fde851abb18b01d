"""Augmentations applied to training batches on the device, seeded per step and worker.

What small-footprint speech and small image models use so a model does not learn
one speaker's voice or one writer's stroke: SpecAugment (time and frequency masks)
plus a random time shift and gain on log-mel spectrograms, and a random
translation on pixels. They run on the dense tensors the store already holds,
after ingest, so every epoch sees new variants of the same stored rows; the
generator is seeded from (seed, step, rank), so a resumed run draws the same ones.
"""

from __future__ import annotations

import torch

from jobs.pretrain.config import AudioAugment, TrainAugment


def augment_batch(
    batch: dict[str, torch.Tensor], config: TrainAugment, *, seed: int, step: int, rank: int
) -> dict[str, torch.Tensor]:
    """``batch`` with ``x_audio`` / ``x_image`` replaced by augmented copies."""
    generator = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFF_FFFF)
    out = dict(batch)
    if config.audio is not None and "x_audio" in batch and batch["x_audio"].dim() == 3:
        out["x_audio"] = augment_logmel(batch["x_audio"], config.audio, generator)
    if config.image is not None and "x_image" in batch and batch["x_image"].dim() == 4:
        out["x_image"] = shift_images(batch["x_image"], config.image.shift, generator)
    return out


def _ints(generator: torch.Generator, high: int, size: int) -> torch.Tensor:
    return torch.randint(0, max(1, high + 1), (size,), generator=generator)


def augment_logmel(x: torch.Tensor, cfg: AudioAugment, generator: torch.Generator) -> torch.Tensor:
    """Gain (dB added to every bin), time shift (right, silence in), then SpecAugment masks
    filled with each spectrogram's mean, on voiced frames only: a frequency mask across
    the padding would make silence look like speech to per-utterance normalisation."""
    n, mels, frames = x.shape
    floor = x.amin(dim=(1, 2), keepdim=True)  # the padding / silence level of each row
    gain = (torch.rand(n, generator=generator) * 2 - 1) * cfg.gain_db
    x = torch.maximum(x + gain.view(n, 1, 1).to(x), floor)
    if cfg.shift:
        shifts = _ints(generator, cfg.shift, n)
        index = torch.arange(frames).view(1, frames) - shifts.view(n, 1)
        keep = (index >= 0).to(x.device)
        gathered = x.gather(2, index.clamp(min=0).to(x.device).view(n, 1, frames).expand_as(x))
        x = torch.where(keep.view(n, 1, frames), gathered, floor)
    floor = x.amin(dim=(1, 2), keepdim=True)
    voiced = (x > floor + 1e-3).any(dim=1, keepdim=True)  # (n, 1, frames)
    mean = x.mean(dim=(1, 2), keepdim=True)
    for axis, size, count, width in ((2, frames, cfg.time_masks, cfg.time_width),
                                     (1, mels, cfg.freq_masks, cfg.freq_width)):  # fmt: skip
        for _ in range(count):
            widths = _ints(generator, width, n)
            starts = (torch.rand(n, generator=generator) * (size - widths).clamp(min=0)).long()
            pos = torch.arange(size).view(1, size)
            hit = (pos >= starts.view(n, 1)) & (pos < (starts + widths).view(n, 1))
            shape = (n, 1, size) if axis == 2 else (n, size, 1)
            x = torch.where(hit.view(shape).to(x.device) & voiced, mean, x)
    return x


def shift_images(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels each way, zeros (the mean) in."""
    if not shift:
        return x
    n, _, h, w = x.shape
    dy, dx = (_ints(generator, 2 * shift, n) - shift for _ in range(2))
    ys = (torch.arange(h).view(1, h) - dy.view(n, 1)).to(x.device)
    xs = (torch.arange(w).view(1, w) - dx.view(n, 1)).to(x.device)
    inside = ((ys >= 0) & (ys < h)).view(n, 1, h, 1) & ((xs >= 0) & (xs < w)).view(n, 1, 1, w)
    rows = x.gather(2, ys.clamp(0, h - 1).view(n, 1, h, 1).expand(-1, x.shape[1], -1, w))
    moved = rows.gather(3, xs.clamp(0, w - 1).view(n, 1, 1, w).expand(-1, x.shape[1], h, -1))
    return torch.where(inside, moved, torch.zeros_like(moved))
