"""Score a fusion head: fused, per-modality and (for ensembles) per-input accuracy, and a
confusion matrix picture. Per-modality accuracy is the head itself with only that
modality's branches present, so early, late and attention fusion compare alike."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jobs.head.data import Branches, modality_of
from jobs.head.model import FusionHead

FUSED = "fused"


@dataclass
class HeadResult:
    """What a head run measured and where it wrote it."""

    run_dir: str
    fusion: str
    classes: list[str]
    best_epoch: int
    epochs: int
    stopped_early: bool
    rows: dict[str, int] = field(default_factory=dict)  # split -> rows scored
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> group -> acc
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def targets(data: Branches, classes: list[str]) -> np.ndarray:
    """Class index per row; -1 for no label or one the head was not trained on."""
    code = {c: i for i, c in enumerate(classes)}
    return np.array([code.get(label, -1) for label in data.labels], np.int64)


def groups(branches: list[str]) -> dict[str, list[str]]:
    """fused: every branch; each modality: its branches; each branch of an ensemble alone."""
    by_modality: dict[str, list[str]] = {}
    for b in branches:
        by_modality.setdefault(modality_of(b), []).append(b)
    out = {FUSED: list(branches), **by_modality}
    for members in by_modality.values():
        if len(members) > 1:
            out |= {b: [b] for b in members}
    return out


@torch.no_grad()
def predict(model: FusionHead, data: Branches, rows: np.ndarray, only: list[str]) -> np.ndarray:
    """Predicted classes of ``rows`` with only the branches ``only`` present (-1: none is)."""
    model.eval()
    present = {b: data.present[b][rows] & (b in only) for b in model.branches}
    has_any = np.logical_or.reduce([present[b] for b in model.branches])
    out = np.full(len(rows), -1, np.int64)
    if has_any.any():
        x = {b: torch.as_tensor(data.x[b][rows][has_any]) for b in model.branches}
        mask = {b: torch.as_tensor(present[b][has_any]) for b in model.branches}
        out[has_any] = model(x, mask).argmax(1).numpy()
    return out


def score(
    model: FusionHead, data: Branches, y: np.ndarray, rows: np.ndarray, classes: int
) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy per group over the labelled ``rows`` that have the group, and the fused
    confusion matrix (true class x predicted class)."""
    accuracy, confusion = {}, np.zeros((classes, classes), np.int64)
    for name, members in groups(model.branches).items():
        predicted = predict(model, data, rows, members)
        scored = predicted >= 0
        if scored.any():
            accuracy[name] = float((predicted[scored] == y[rows][scored]).mean())
        if name == FUSED:
            np.add.at(confusion, (y[rows][scored], predicted[scored]), 1)
    return accuracy, confusion


def plot_confusion(confusion: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    size = 2.5 + 0.45 * k
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    top = confusion.max() if confusion.size else 0
    for (i, j), n in np.ndenumerate(confusion):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                    color="white" if n > top / 2 else "black")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
