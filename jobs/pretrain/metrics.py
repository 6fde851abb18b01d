"""Retrieval and zero-shot metrics shared by per-epoch validation and ``jobs.evaluate``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from jobs.pretrain.config import RECALL_KS as KS


@torch.no_grad()
def embed(model: torch.nn.Module, modality: str, x: np.ndarray | torch.Tensor, *, batch: int = 512,
          device: str | torch.device = "cpu") -> torch.Tensor:  # fmt: skip
    """Normalised features of ``x`` through one tower, in batches, as float32 on CPU."""
    x = torch.as_tensor(x)
    outs = [
        model.encode(modality, x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)
    ]
    return torch.cat(outs) if outs else torch.zeros(0, 0)


def recall_at_k(queries: torch.Tensor, items: torch.Tensor, ks: Sequence[int] = KS) -> dict:
    """Fraction of queries whose own item (same row) ranks within the top k of all items.

    Ties count against the query: an item as similar as the true one ranks before it.
    Two identical captions embed identically, and counting the tie as a hit would show
    a model that cannot tell them apart as perfect on both.
    """
    sims = queries.float() @ items.float().T
    own = sims.diagonal().unsqueeze(1)
    rank = (sims >= own).sum(dim=1) - 1  # other items at least as close as the true one
    return {f"r@{k}": float((rank < k).float().mean()) for k in ks}


def class_match_at_1(
    queries: torch.Tensor, items: torch.Tensor, q_labels: np.ndarray, i_labels: np.ndarray
) -> float:
    """Fraction of labelled queries whose nearest item carries the same label: what counts
    when the pairing is by class only (a random image of the spoken digit)."""
    known = torch.as_tensor(np.asarray(q_labels) >= 0)
    if not bool(known.any()):
        return float("nan")
    nearest = (queries.float()[known] @ items.float().T).argmax(dim=1).numpy()
    return float(np.mean(np.asarray(i_labels)[nearest] == np.asarray(q_labels)[known.numpy()]))


def pair_recalls(
    feats: dict[str, torch.Tensor],
    present: dict[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
    ks: Sequence[int] = KS,
    labels: np.ndarray | None = None,
) -> dict[str, float]:
    """recall@k both ways for each pair, over the rows that have both modalities; with
    ``labels`` (codes, -1 unknown) also class-match recall@1.

    Keys look like ``image->text/r@1`` and ``image->text/class_r@1``; ``<a>-<b>/n`` is
    the number of rows used; ``mean_r@1`` and ``mean_class_r@1`` average the directions.
    """
    out: dict[str, float] = {}
    for a, b in pairs:
        rows = np.asarray(present[a]) & np.asarray(present[b])
        n = int(rows.sum())
        out[f"{a}-{b}/n"] = float(n)
        if n < 2:
            continue
        mask = torch.as_tensor(rows)
        fa, fb = feats[a][mask], feats[b][mask]
        for src, dst, q, i in ((a, b, fa, fb), (b, a, fb, fa)):
            for key, value in recall_at_k(q, i, ks).items():
                out[f"{src}->{dst}/{key}"] = value
            if labels is not None:
                kept = np.asarray(labels)[rows]
                out[f"{src}->{dst}/class_r@1"] = class_match_at_1(q, i, kept, kept)
    for name in ("r@1", "class_r@1"):
        values = [v for k, v in out.items() if k.endswith(f"/{name}") and not np.isnan(v)]
        if values:
            out[f"mean_{name}"] = float(np.mean(values))
    return out


def prototype_accuracy(
    queries: torch.Tensor,
    query_labels: Sequence[str | None],
    prototypes: torch.Tensor,
    classes: Sequence[str],
) -> tuple[float, int]:
    """Accuracy of nearest-prototype classification over queries whose label has a prototype."""
    index = {c: i for i, c in enumerate(classes)}
    rows = [i for i, lab in enumerate(query_labels) if lab in index]
    if not rows:
        return float("nan"), 0
    pred = (queries[rows] @ prototypes.T).argmax(dim=1)
    truth = torch.tensor([index[query_labels[i]] for i in rows])
    return float((pred == truth).float().mean()), len(rows)


def class_prototypes(
    feats: torch.Tensor, labels: Sequence[str | None]
) -> tuple[torch.Tensor, list[str]]:
    """Mean feature per label, re-normalised: a class's point in the shared space."""
    classes = sorted({lab for lab in labels if lab is not None})
    protos = []
    for c in classes:
        rows = [i for i, lab in enumerate(labels) if lab == c]
        protos.append(torch.nn.functional.normalize(feats[rows].mean(0), dim=0))
    return (torch.stack(protos) if protos else torch.zeros(0, feats.shape[-1])), classes


def _codes(labels: Sequence[str | None], classes: Sequence[str]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(classes)}
    return torch.tensor([index.get(lab, -1) if lab is not None else -1 for lab in labels])


def knn_accuracy(
    train: torch.Tensor,
    train_labels: Sequence[str | None],
    queries: torch.Tensor,
    query_labels: Sequence[str | None],
    k: int = 5,
) -> tuple[float, int]:
    """Accuracy of a cosine k-nearest-neighbour vote (weighted by similarity) among the
    labelled train rows, over queries whose label is a train class; (accuracy, queries)."""
    classes = sorted({lab for lab in train_labels if lab is not None})
    known, truth = _codes(train_labels, classes), _codes(query_labels, classes)
    memory, rows = train[known >= 0], truth >= 0
    if not len(memory) or not rows.any():
        return float("nan"), 0
    sims, idx = (queries[rows] @ memory.T).topk(min(k, len(memory)), dim=1)
    votes = torch.zeros(int(rows.sum()), len(classes)).scatter_add_(1, known[known >= 0][idx], sims)
    return float((votes.argmax(1) == truth[rows]).float().mean()), int(rows.sum())


def linear_probe_accuracy(
    train: torch.Tensor,
    train_labels: Sequence[str | None],
    queries: torch.Tensor,
    query_labels: Sequence[str | None],
    weight_decay: float = 1e-4,
) -> tuple[float, int]:
    """Accuracy of a logistic regression (L-BFGS, L2) fitted on the labelled train rows'
    frozen features, over queries whose label is a train class; (accuracy, queries)."""
    classes = sorted({lab for lab in train_labels if lab is not None})
    known, truth = _codes(train_labels, classes), _codes(query_labels, classes)
    x, y, rows = train[known >= 0].float(), known[known >= 0], truth >= 0
    if len(classes) < 2 or not rows.any():
        return float("nan"), 0
    weight = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y)
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted = (queries[rows].float() @ weight + bias).argmax(1)
    return float((predicted == truth[rows]).float().mean()), int(rows.sum())
