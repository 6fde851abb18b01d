"""Augmentations applied to training batches on the device, seeded per step and worker.

What small-footprint speech and small image models use so a model does not learn
one speaker's voice or one writer's stroke: SpecAugment (time and frequency masks)
plus a random time shift, gain and vocal tract length warp on log-mel spectrograms,
a random affine transform (rotation, zoom, translation) on pixels, and random token
deletion on token ids (a caption with a word or a letter missing still names the
same thing).
They run on the dense tensors the store already holds, after ingest, so every epoch
sees new variants of the same stored rows; the generator is seeded from (seed, step,
rank), so a resumed run draws the same ones.
"""

from __future__ import annotations

import math

import torch

from jobs.pretrain.config import AudioAugment, ImageAugment, TextAugment, TrainAugment
from jobs.pretrain.model import voiced_frames


def augment_batch(
    batch: dict[str, torch.Tensor],
    config: TrainAugment,
    *,
    seed: int,
    step: int,
    rank: int,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """``batch`` with ``x_audio`` / ``x_image`` / ``x_text`` (token ids) replaced by
    augmented copies."""
    generator = torch.Generator().manual_seed(hash((seed, step, rank)) & 0x7FFF_FFFF)
    out = dict(batch)
    if config.audio is not None and "x_audio" in batch and batch["x_audio"].dim() == 3:
        out["x_audio"] = augment_logmel(batch["x_audio"], config.audio, generator)
    if config.image is not None and "x_image" in batch and batch["x_image"].dim() == 4:
        out["x_image"] = affine_images(batch["x_image"], config.image, generator)
    text = batch.get("x_text")
    if config.text is not None and text is not None and not text.is_floating_point():
        out["x_text"] = drop_tokens(text, config.text, generator, pad_id)
    return out


def drop_tokens(
    ids: torch.Tensor, cfg: TextAugment, generator: torch.Generator, pad_id: int
) -> torch.Tensor:
    """Delete each non-pad token with chance ``drop``; the rest close up, pads fill the end.
    A row keeps at least its first token."""
    real = ids != pad_id
    dropped = real & (torch.rand(ids.shape, generator=generator) < cfg.drop).to(ids.device)
    dropped[:, 0] = False
    order = torch.argsort((dropped | ~real).int(), dim=1, stable=True)
    kept = ~(dropped | ~real).gather(1, order)
    return torch.where(kept, ids.gather(1, order), torch.full_like(ids, pad_id))


def _ints(generator: torch.Generator, high: int, size: int) -> torch.Tensor:
    return torch.randint(0, max(1, high + 1), (size,), generator=generator)


def augment_logmel(x: torch.Tensor, cfg: AudioAugment, generator: torch.Generator) -> torch.Tensor:
    """Vocal tract length warp (``warp``), gain (dB added to every bin), time shift (right,
    silence in), then SpecAugment masks filled with each spectrogram's mean, on voiced
    frames only: a frequency mask across the padding would make silence look like speech
    to per-utterance normalisation."""
    n, mels, frames = x.shape
    floor = x.amin(dim=(1, 2), keepdim=True)  # the padding / silence level of each row
    if cfg.warp:
        x = warp_mels(x, floor, cfg.warp, generator)
    gain = (torch.rand(n, generator=generator) * 2 - 1) * cfg.gain_db
    x = torch.maximum(x + gain.view(n, 1, 1).to(x), floor)
    if cfg.shift:
        shifts = _ints(generator, cfg.shift, n)
        index = torch.arange(frames).view(1, frames) - shifts.view(n, 1)
        keep = (index >= 0).to(x.device)
        gathered = x.gather(2, index.clamp(min=0).to(x.device).view(n, 1, frames).expand_as(x))
        x = torch.where(keep.view(n, 1, frames), gathered, floor)
    voiced = voiced_frames(x)  # (n, 1, frames)
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


def warp_mels(
    x: torch.Tensor, floor: torch.Tensor, warp: float, generator: torch.Generator
) -> torch.Tensor:
    """Each (mels, frames) row with its mel axis stretched by a factor in ``1 +- warp``
    from the lowest bin (VTLP): bin m takes the value at m / factor, bilinear; what comes
    from above the top bin is silence (``floor``), and silence stays exactly silence."""
    import torch.nn.functional as F

    n, mels, frames = x.shape
    factor = 1 + (torch.rand(n, generator=generator) * 2 - 1) * warp
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1.0  # time untouched
    theta[:, 1, 1] = 1 / factor  # grid y in [-1, 1]: output y reads (y + 1) / factor - 1
    theta[:, 1, 2] = 1 / factor - 1
    grid = F.affine_grid(theta.to(x), [n, 1, mels, frames], align_corners=False)
    above = (x - floor).unsqueeze(1)
    out = F.grid_sample(above, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(1) + floor


def affine_images(x: torch.Tensor, cfg: ImageAugment, generator: torch.Generator) -> torch.Tensor:
    """A random rotation (up to ``rotate`` degrees), zoom (``1 +- scale``) and translation
    (up to ``shift`` pixels) per image, bilinear, zeros (the normalised mean) outside."""
    if not (cfg.shift or cfg.rotate or cfg.scale):
        return x
    import torch.nn.functional as F

    n, _, h, w = x.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(cfg.rotate)
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * cfg.scale
    dy, dx = ((_ints(generator, 2 * cfg.shift, n) - cfg.shift).float() for _ in range(2))
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output to input coordinates in [-1, 1]: a shift of d pixels is 2d/size
    theta = torch.stack(
        [torch.stack([cos, -sin, -2 * dx / w], 1), torch.stack([sin, cos, -2 * dy / h], 1)], 1
    ).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
