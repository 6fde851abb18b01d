"""FusionHead: classify a row from the branches it has.

- ``early``: the branches concatenated (an absent one is zeros, with a presence flag
  per branch) through one MLP.
- ``late``: an MLP per branch; the fused logits are the mean over the present branches
  (an ensemble when several inputs share a modality).
- ``attention``: each branch projected to ``width`` plus a learned branch embedding; a
  learned query attends over the present branches (multi-head), then an MLP.
"""

from __future__ import annotations

import torch
from torch import nn

from jobs.head.config import HeadConfig


def mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Module:
    if hidden == 0:
        return nn.Linear(d_in, d_out)
    return nn.Sequential(
        nn.LayerNorm(d_in),
        nn.Linear(d_in, hidden),
        nn.GELU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, d_out),
    )


class FusionHead(nn.Module):
    def __init__(self, config: HeadConfig, dims: dict[str, int], classes: int) -> None:
        super().__init__()
        self.fusion, self.branches = config.fusion, sorted(dims)
        h, p = config.hidden, config.dropout
        if self.fusion == "early":
            self.classifier = mlp(sum(dims.values()) + len(dims), h, classes, p)
        elif self.fusion == "late":
            self.per_branch = nn.ModuleDict({b: mlp(dims[b], h, classes, p) for b in self.branches})
        else:
            w = config.width
            self.project = nn.ModuleDict({b: nn.Linear(dims[b], w) for b in self.branches})
            self.branch_embedding = nn.Parameter(torch.zeros(len(dims), w))
            self.query = nn.Parameter(torch.randn(1, 1, w) * 0.02)
            self.attend = nn.MultiheadAttention(w, config.heads, dropout=p, batch_first=True)
            self.classifier = mlp(w, h, classes, p)

    def forward(self, x: dict[str, torch.Tensor], present: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits (rows x classes); every row must have at least one present branch."""
        mask = torch.stack([present[b] for b in self.branches], dim=1)  # rows x branches
        if self.fusion == "early":
            parts = [x[b] * present[b][:, None] for b in self.branches]
            return self.classifier(torch.cat([*parts, mask.float()], dim=1))
        if self.fusion == "late":
            logits = torch.stack([self.per_branch[b](x[b]) for b in self.branches], dim=1)
            weights = mask.float() / mask.sum(1, keepdim=True).clamp(min=1)
            return (logits * weights[:, :, None]).sum(1)
        tokens = torch.stack([self.project[b](x[b]) for b in self.branches], dim=1)
        tokens = tokens + self.branch_embedding
        query = self.query.expand(len(tokens), -1, -1)
        pooled, _ = self.attend(query, tokens, tokens, key_padding_mask=~mask)
        return self.classifier(pooled[:, 0])
