"""The forward loop every model encoder shares: masked rows, devices, autocast, norms.

Only the rows that have the modality go through the model (in chunks of the
configured batch size); the others get zeros, which ``Encoder.to_arrow`` turns
into nulls. On CUDA, host arrays are pinned and copied without blocking, and
the forward runs under bf16 autocast; the result always comes back float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def to_device(array: np.ndarray, device: str) -> torch.Tensor:
    """Integers become int64 (embedding lookups), floats float32; bools and uint8 (pixels,
    scaled on the device by the encoder) stay as they are."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.startswith("cuda"):
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    if tensor.is_floating_point():
        return tensor.float()
    return tensor if tensor.dtype in (torch.bool, torch.uint8) else tensor.long()


def autocast(device: str) -> contextlib.AbstractContextManager[object]:
    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_rows(
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    inputs: dict[str, np.ndarray],
    mask: np.ndarray,
    *,
    dim: int,
    device: str,
    batch_size: int,
    normalize: bool,
) -> np.ndarray:
    """``forward`` over the rows where ``mask`` is True -> (rows, dim) float32, zeros elsewhere."""
    import torch

    out = np.zeros((len(mask), dim), dtype=np.float32)
    index = np.flatnonzero(mask)
    for start in range(0, len(index), batch_size):
        rows = index[start : start + batch_size]
        tensors = {k: to_device(v[rows], device) for k, v in inputs.items()}
        with torch.inference_mode(), autocast(device):
            emb = forward(tensors)
        emb = emb.float().flatten(1)
        if normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        out[rows] = emb.cpu().numpy()
    return out


def split_inputs(inputs: dict[str, np.ndarray], modality: str) -> dict[str, np.ndarray]:
    """The model inputs of one modality: keys ``<modality>__<name>`` -> ``<name>``."""
    prefix = f"{modality}__"
    return {k[len(prefix) :]: v for k, v in inputs.items() if k.startswith(prefix)}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where ``mask`` is 1 (sentence-transformers pooling)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
