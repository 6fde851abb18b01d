"""Contrastive losses over modality pairs, with negatives from every worker's batch.

Each worker gathers all workers' features and computes the same global loss
(CLIP / open_clip style, ``local_loss=False``). ``all_gather`` carries no
gradient, so the gathered copy of a worker's own rows is replaced by its local
tensor: the gradient of the global loss w.r.t. local features is then exact. DDP
averages the workers' parameter gradients, so towers get 1/world of the global
loss's gradient (the logit scale all of it): a constant factor AdamW is insensitive
to, as in open_clip. Rows missing a modality are masked: a pair (a, b) only uses
rows that have both.

False negatives: within a batch several rows may carry the same caption (or the same
image); classic InfoNCE pushes row i's caption away from row j's image although they
are the same caption. With ``duplicates="positive"`` rows whose input in either
modality of the pair is identical are positives of each other (multi-positive InfoNCE
with soft targets, as UniCL; SigLIP's labels likewise). With labels, an optional
supervised term makes every same-label row a positive (cross-modal SupCon).
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


def infonce(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, positives: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) over rows and columns of the similarity matrix; with
    ``positives`` (a boolean matrix, diagonal set) each row's target spreads evenly over
    its positives (multi-positive InfoNCE, soft targets)."""
    logits = scale * a @ b.T
    if positives is None:
        target = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    p = positives.to(logits.dtype)
    rows = -(p / p.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    cols = -(p.T / p.T.sum(1, keepdim=True) * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return (rows + cols) / 2


def siglip(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid loss (SigLIP): every (i, j) is a binary match / no-match, summed, per row."""
    logits = scale * a @ b.T + bias
    if positives is None:
        positives = torch.eye(len(a), device=a.device, dtype=torch.bool)
    sign = 2 * positives.to(logits.dtype) - 1
    return -F.logsigmoid(sign * logits).sum() / len(a)


_PROBES: dict[tuple[int, str], torch.Tensor] = {}


def input_keys(x: torch.Tensor) -> torch.Tensor:
    """One float64 per row, equal for identical rows: the row projected on a fixed random
    vector (comparing whole rows pairwise would cost batch^2 x row size)."""
    flat = x.reshape(len(x), -1).double()
    probe = _PROBES.get((flat.shape[1], str(flat.device)))
    if probe is None:
        generator = torch.Generator().manual_seed(flat.shape[1])
        probe = torch.rand(flat.shape[1], generator=generator, dtype=torch.float64)
        probe = _PROBES.setdefault((flat.shape[1], str(flat.device)), probe.to(flat.device))
    return flat @ probe


def same_key(keys: torch.Tensor) -> torch.Tensor:
    """Pairs of rows whose keys match (identical inputs), up to float summation order."""
    return (keys[:, None] - keys[None, :]).abs() <= 1e-9 * (keys.abs()[:, None] + 1.0)


def contrastive_loss(
    features: dict[str, torch.Tensor],
    present: dict[str, torch.Tensor],
    pairs: Sequence[tuple[str, str]],
    *,
    kind: str,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    keys: dict[str, torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    supervised_weight: float = 0.0,
    any_modality: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean loss over the pairs that have >= 2 rows with both modalities, and per-pair values.

    ``features`` are this worker's normalised features (one tensor per modality,
    same row order); ``present`` the boolean masks of rows that have the modality.
    ``keys`` (``input_keys`` per modality) make rows with an identical input in the pair's
    modalities positives (in any modality both rows have, with ``any_modality``);
    ``labels`` (int64, -1 unknown) with ``supervised_weight`` add a term where every
    same-label row is a positive.
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")
    if kind == "siglip" and bias is None:
        raise ValueError("siglip needs a bias")
    every = {m: gather_with_local_grad(f.float()) for m, f in features.items()}
    masks = {m: gather_mask(present[m]) for m in features}
    every_key = {m: gather_with_local_grad(k) for m, k in (keys or {}).items()}
    every_label = gather_with_local_grad(labels) if labels is not None else None
    # Zero-weighted terms keep every tower and the scale in the graph, so DDP sees a
    # gradient for each parameter even when a batch has no valid row for some pair.
    total = sum(f.sum() * 0.0 for f in every.values()) + scale * 0.0
    if bias is not None:
        total = total + bias * 0.0
    stats: dict[str, float] = {}
    used = 0
    for ma, mb in pairs:
        valid = masks[ma] & masks[mb]
        n = int(valid.sum())
        if n < 2:
            continue
        a, b = every[ma][valid], every[mb][valid]
        positives = torch.eye(n, dtype=torch.bool, device=a.device)
        for m in every_key if any_modality else (ma, mb):
            if m in every_key:
                both = masks[m][valid]  # an absent modality's zeros are not an input
                same = same_key(every_key[m][valid]) & both[:, None] & both[None, :]
                positives |= same
        if every_key:  # how many false negatives the duplicates rule took out
            stats[f"positives_{ma}_{mb}"] = float(positives.sum()) / n
        value = _pair_loss(kind, a, b, scale, bias, positives)
        stats[f"loss_{ma}_{mb}"] = float(value.detach())
        if every_label is not None and supervised_weight > 0:
            known = every_label[valid]
            same = (known[:, None] == known[None, :]) & (known[:, None] >= 0)
            supervised = _pair_loss(kind, a, b, scale, bias, positives | same)
            stats[f"supcon_{ma}_{mb}"] = float(supervised.detach())
            value = value + supervised_weight * supervised
        total = total + value
        used += 1
    return total / max(used, 1), stats


def _pair_loss(
    kind: str,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    positives: torch.Tensor,
) -> torch.Tensor:
    only_diagonal = bool(positives.sum() == len(positives))
    given = None if only_diagonal else positives
    if kind == "infonce":
        return infonce(a, b, scale, given)
    assert bias is not None
    return siglip(a, b, scale, bias, given)
