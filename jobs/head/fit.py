"""Train a fusion head in this process and write its run directory.

The inputs are embeddings (rows x width, read a batch at a time), so the head trains
in seconds to minutes on a CPU: no Ray Train run, no resume; a rerun of a name
replaces the run (swapped in whole, so a kill leaves the old one or the new one).
Each epoch scores the val split; the best epoch by fused val accuracy (ties: lower
val loss) is kept, and ``patience`` epochs without a gain stop the run.

Run directory: ``head.safetensors`` (weights), ``head.json`` (config, classes,
branch widths, feature set versions read), ``metrics.jsonl`` (per epoch),
``eval_<split>.json`` and ``confusion_<split>.png``.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from features.store import FeatureStore
from jobs.head.config import HeadConfig
from jobs.head.data import Branches, load_branches
from jobs.head.model import FusionHead
from jobs.head.report import FUSED, HeadResult, groups, plot_confusion, score, targets
from pipelines.errors import SpecError

HEAD_FILE, WEIGHTS_FILE, METRICS_FILE = "head.json", "head.safetensors", "metrics.jsonl"


def train_head(config: HeadConfig) -> HeadResult:
    store = FeatureStore(config.store, storage_options=config.storage_options)
    data = load_branches(store, config)
    splits = data.splits
    train_labels = data.labels[(splits == "train") & (data.labels != None)]  # noqa: E711
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise SpecError(
            f"a classifier needs labelled train rows of at least 2 classes; the inputs have "
            f"{len(train_labels)} labelled train rows of {len(classes)} class(es)"
        )
    y = targets(data, classes)
    rows = {s: np.flatnonzero((splits == s) & (y >= 0) & _has_any(data)) for s in SPLITS}
    selectable = groups(sorted(data.dims))
    if config.select not in selectable:
        raise SpecError(f"select: {config.select!r} is not one of {', '.join(selectable)}")
    torch.manual_seed(config.seed)
    model = FusionHead(config, data.dims, len(classes))
    best, history = _fit(model, config, data, y, rows)
    model.load_state_dict(best["state"])
    meta = {
        "config": config.public_dict(),
        "classes": classes,
        "dims": data.dims,
        "versions": data.versions,
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "stopped_early": len(history) < config.epochs,
    }
    with tempfile.TemporaryDirectory(dir=_parent(config.run_dir)) as tmp:
        staged = Path(tmp) / config.name
        staged.mkdir()
        from safetensors.torch import save_model

        save_model(model, str(staged / WEIGHTS_FILE))
        (staged / HEAD_FILE).write_text(json.dumps(meta, indent=2))
        (staged / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))
        result = _result(config.run_dir, meta)
        for split in ("val", "test"):
            _score_split(model, data, y, rows[split], split, classes, staged, result)
        _swap_in(staged, config.run_dir)
    result.files = {k: v.replace(str(staged), str(config.run_dir)) for k, v in result.files.items()}
    return result


SPLITS = ("train", "val", "test")


def _has_any(data: Branches) -> np.ndarray:
    return np.logical_or.reduce(list(data.present.values()))


def _fit(
    model: FusionHead,
    config: HeadConfig,
    data: Branches,
    y: np.ndarray,
    rows: dict[str, np.ndarray],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Epochs of AdamW with modality dropout; (the best epoch's state, per-epoch metrics)."""
    device = torch.device("cuda" if config.use_gpu and torch.cuda.is_available() else "cpu")
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    x = {b: torch.as_tensor(v, device=device) for b, v in data.x.items()}
    present = {b: torch.as_tensor(v, device=device) for b, v in data.present.items()}
    target = torch.as_tensor(y, device=device)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    best: dict[str, Any] = {"epoch": 0, "acc": -1.0, "loss": float("inf"), "state": None}
    history: list[dict[str, Any]] = []
    train = torch.as_tensor(rows["train"])
    for epoch in range(1, config.epochs + 1):
        model.train()
        total, seen = 0.0, 0
        for batch in train[torch.randperm(len(train), generator=generator)].split(
            config.batch_size
        ):
            mask = _drop_branches(
                present, batch, config.modality_dropout, generator, model.branches
            )
            logits = model({b: x[b][batch] for b in model.branches}, mask)
            loss = F.cross_entropy(logits, target[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(batch), seen + len(batch)
        val = _val(model, x, present, target, rows["val"], groups(model.branches)[config.select])
        row = {"epoch": epoch, "train_loss": total / max(seen, 1), **val}
        history.append(row)
        acc, val_loss = row.get("val_acc", 0.0), row.get("val_loss", 0.0)
        if acc > best["acc"] or (acc == best["acc"] and val_loss < best["loss"]):
            state = copy.deepcopy({k: v.cpu() for k, v in model.state_dict().items()})
            best = {"epoch": epoch, "acc": acc, "loss": val_loss, "state": state}
        elif config.patience is not None and epoch - best["epoch"] >= config.patience:
            break
    model.cpu()
    return best, history


def _drop_branches(
    present: dict[str, torch.Tensor],
    batch: torch.Tensor,
    rate: float,
    generator: torch.Generator,
    branches: list[str],
) -> dict[str, torch.Tensor]:
    """Each present branch dropped with probability ``rate``; a row keeps at least one."""
    mask = torch.stack([present[b][batch] for b in branches], dim=1)
    if rate > 0:
        kept = mask & (torch.rand(mask.shape, generator=generator) >= rate).to(mask.device)
        mask = torch.where(kept.any(1, keepdim=True), kept, mask)
    return {b: mask[:, i] for i, b in enumerate(branches)}


@torch.no_grad()
def _val(
    model: FusionHead,
    x: dict[str, torch.Tensor],
    present: dict[str, torch.Tensor],
    target: torch.Tensor,
    rows: np.ndarray,
    selected: list[str],
) -> dict[str, float]:
    """Val loss and accuracy with only the ``selected`` branches present."""
    mask = {b: present[b] & (b in selected) for b in model.branches}
    has = torch.stack(list(mask.values()), 1).any(1).cpu().numpy()
    rows = rows[has[rows]]
    if not len(rows):
        return {}
    model.eval()
    idx = torch.as_tensor(rows, device=target.device)
    logits = model(
        {b: x[b][idx] for b in model.branches}, {b: mask[b][idx] for b in model.branches}
    )
    return {
        "val_loss": float(F.cross_entropy(logits, target[idx])),
        "val_acc": float((logits.argmax(1) == target[idx]).float().mean()),
    }


def _result(run_dir: Path, meta: dict[str, Any]) -> HeadResult:
    return HeadResult(
        run_dir=str(run_dir),
        fusion=meta["config"]["fusion"],
        classes=meta["classes"],
        best_epoch=meta["best_epoch"],
        epochs=meta["epochs"],
        stopped_early=meta["stopped_early"],
    )


def _score_split(
    model: FusionHead,
    data: Branches,
    y: np.ndarray,
    rows: np.ndarray,
    split: str,
    classes: list[str],
    out: Path,
    result: HeadResult,
) -> None:
    """Accuracy of ``split`` into ``result`` and its files into ``out`` (nothing if empty)."""
    if not len(rows):
        return
    accuracy, confusion = score(model, data, y, rows, len(classes))
    result.rows[split], result.accuracy[split] = len(rows), accuracy
    report = {"split": split, "rows": len(rows), "accuracy": accuracy, "classes": classes,
              "confusion": confusion.tolist()}  # fmt: skip
    (out / f"eval_{split}.json").write_text(json.dumps(report, indent=2))
    title = f"{split}: fused accuracy {accuracy.get(FUSED, float('nan')):.3f} ({len(rows)} rows)"
    path = plot_confusion(confusion, classes, title, out / f"confusion_{split}.png")
    result.files[f"eval {split}"] = str(out / f"eval_{split}.json")
    result.files[f"confusion {split}"] = str(path)


def _parent(run_dir: Path) -> Path:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return run_dir.parent


def _swap_in(staged: Path, run_dir: Path) -> None:
    """Replace ``run_dir`` with ``staged``: renames only, so a kill leaves one whole run."""
    old = run_dir.with_name(f".{run_dir.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    if run_dir.exists():
        run_dir.rename(old)
    staged.rename(run_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_head(run_dir: Path) -> tuple[HeadConfig, FusionHead, dict[str, Any]]:
    """A trained head, its config and its recorded description."""
    from safetensors.torch import load_model

    meta = json.loads((run_dir / HEAD_FILE).read_text())
    config = HeadConfig.model_validate(meta["config"])
    model = FusionHead(config, meta["dims"], len(meta["classes"]))
    load_model(model, str(run_dir / WEIGHTS_FILE))
    return config, model.eval(), meta


def evaluate_head(
    run_dir: str | Path, *, split: str = "test", storage_options: dict[str, str] | None = None
) -> HeadResult:
    """Score a trained head on ``split`` again, reading the versions it recorded."""
    run_dir = Path(run_dir)
    config, model, meta = load_head(run_dir)
    store = FeatureStore(config.store, storage_options=storage_options)  # recorded: redacted
    data = load_branches(store, config, versions=meta["versions"])
    if data.dims != meta["dims"]:
        raise SpecError(
            f"{run_dir}: its inputs now give the branches (and widths) {data.dims}; the head "
            f"was trained on {meta['dims']}"
        )
    y = targets(data, meta["classes"])
    rows = np.flatnonzero((data.splits == split) & (y >= 0) & _has_any(data))
    if not len(rows):
        raise SpecError(f"no labelled {split!r} rows of the head's classes to evaluate")
    result = _result(run_dir, meta)
    _score_split(model, data, y, rows, split, meta["classes"], run_dir, result)
    return result
