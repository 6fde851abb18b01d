"""Contrastive losses over modality pairs, with negatives from every worker's batch.

Each worker gathers all workers' features and computes the same global loss
(CLIP / open_clip style, ``local_loss=False``). ``all_gather`` carries no
gradient, so the gathered copy of a worker's own rows is replaced by its local
tensor: the gradient of the global loss w.r.t. local features is then exact. DDP
averages the workers' parameter gradients, so towers get 1/world of the global
loss's gradient (the logit scale all of it): a constant factor AdamW is insensitive
to, as in open_clip. Rows missing a modality are masked: a pair (a, b) only uses
rows that have both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

LOSSES = ("infonce", "siglip")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """Every worker's rows of ``x`` in rank order; the local slice keeps its autograd graph.

    All workers must pass tensors of the same shape (the trainer drops ragged last batches).
    """
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts)


def gather_mask(mask: torch.Tensor) -> torch.Tensor:
    """``gather_with_local_grad`` for boolean masks (some backends cannot gather bools)."""
    return gather_with_local_grad(mask.to(torch.uint8)).bool()


def infonce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): cross-entropy over rows and columns of the similarity matrix."""
    logits = scale * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def siglip(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Sigmoid loss (SigLIP): every (i, j) is a binary match / no-match, summed, per row."""
    logits = scale * a @ b.T + bias
    sign = 2 * torch.eye(len(a), device=a.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(sign * logits).sum() / len(a)


def contrastive_loss(
    features: dict[str, torch.Tensor],
    present: dict[str, torch.Tensor],
    pairs: Sequence[tuple[str, str]],
    *,
    kind: str,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss over the pairs that have >= 2 rows with both modalities, and per-pair values.

    ``features`` are this worker's normalised features (one tensor per modality,
    same row order); ``present`` the boolean masks of rows that have the modality.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")
    every = {m: gather_with_local_grad(f.float()) for m, f in features.items()}
    masks = {m: gather_mask(present[m]) for m in features}
    # Zero-weighted terms keep every tower and the scale in the graph, so DDP sees a
    # gradient for each parameter even when a batch has no valid row for some pair.
    total = sum(f.sum() * 0.0 for f in every.values()) + scale * 0.0
    if bias is not None:
        total = total + bias * 0.0
    stats: dict[str, float] = {}
    used = 0
    for ma, mb in pairs:
        valid = masks[ma] & masks[mb]
        if int(valid.sum()) < 2:
            continue
        a, b = every[ma][valid], every[mb][valid]
        if kind == "infonce":
            value = infonce(a, b, scale)
        else:
            if bias is None:
                raise ValueError("siglip needs a bias")
            value = siglip(a, b, scale, bias)
        stats[f"loss_{ma}_{mb}"] = float(value.detach())
        total = total + value
        used += 1
    return total / max(used, 1), stats
