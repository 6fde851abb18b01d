"""A learning-rate range test (``mmfp train CONFIG --find-lr``): the run's own step, with
the learning rate raised exponentially from ``start`` to ``end`` over ``steps`` batches of
the train split, in this process. The loss curve (smoothed) says where training is
fastest: the suggestion is the rate with the steepest fall, before the loss blows up
(Smith, "Cyclical learning rates"; fastai's ``lr_find``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jobs.pretrain.config import TrainConfig
from pipelines.errors import SpecError

SMOOTHING = 0.9  # exponential moving average of the loss
DIVERGED = 4.0  # stop once the smoothed loss exceeds this times its minimum


@dataclass
class LrCurve:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed, bias-corrected

    @property
    def steepest(self) -> float:
        """The rate where the smoothed loss falls fastest per log-step of the rate."""
        if len(self.losses) < 3:
            raise SpecError("the range test needs at least 3 steps before the loss diverged")
        slope = np.gradient(np.asarray(self.losses), np.log(np.asarray(self.lrs)))
        upto = int(np.argmin(self.losses)) + 1  # after the minimum the curve only climbs
        return float(self.lrs[int(np.argmin(slope[: max(upto, 2)]))])

    @property
    def at_minimum(self) -> float:
        return float(self.lrs[int(np.argmin(self.losses))])


def find_lr(
    config: TrainConfig, *, steps: int = 100, start: float = 1e-6, end: float = 1.0
) -> LrCurve:
    """Run the range test on ``config``'s feature set (train split, original rows)."""
    import pyarrow as pa
    import torch

    from features.store import FeatureStore
    from jobs.pretrain.arrays import row_filter, to_tensors
    from jobs.pretrain.data import (
        check_towers,
        feature_set_info,
        tower_inputs,
        with_recorded_vocabulary,
    )
    from jobs.pretrain.step import Stepper

    if not 0 < start < end:
        raise SpecError(f"--find-lr needs 0 < start < end, got {start} and {end}")
    store = FeatureStore(config.store, storage_options=config.storage_options)
    info = feature_set_info(store, config.feature_set, config.version)
    check_towers(info, config)
    config = with_recorded_vocabulary(info, config)
    inputs = tower_inputs(info, config)
    # the test draws steps x batch_size rows at most: only those are read and densified
    dataset = store.dataset(info.table, info.version)
    train = row_filter("train", include_views=False)
    available = dataset.count_rows(filter=train)
    if available < config.batch_size:
        raise SpecError(
            f"feature set {info.name!r} v{info.version} has {available} train rows: fewer "
            f"than one batch of {config.batch_size}"
        )
    rng = np.random.default_rng(config.seed)
    wanted = min(available, steps * config.batch_size)
    picked = np.sort(rng.choice(available, size=wanted, replace=False))
    columns = sorted({"split", "view", "label", *(c for c, _, _ in inputs.values())})
    table = dataset.take(pa.array(picked), columns=columns, filter=train)
    data = to_tensors(table, inputs=inputs, split="train", include_views=False, labels=True)
    rows = len(data["label"])
    device = torch.device("cuda" if torch.cuda.is_available() and config.use_gpu else "cpu")
    shapes = {c: info.shape(c) for c, _, _ in inputs.values()}
    stepper = Stepper(config, shapes, total_steps=steps, device=device)
    factor = (end / start) ** (1 / max(1, steps - 1))
    curve, average, best = LrCurve(), 0.0, math.inf
    for i in range(steps):
        lr = start * factor**i
        for group in stepper.optimizer.param_groups:
            group["lr"] = lr
        idx = rng.choice(rows, size=config.batch_size, replace=False)
        stepper.running = {}
        stepper.train_step({k: torch.as_tensor(v[idx]).to(device) for k, v in data.items()})
        loss = stepper.running["loss"]
        if not math.isfinite(loss):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        smoothed = average / (1 - SMOOTHING ** (i + 1))
        curve.lrs.append(lr)
        curve.losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > DIVERGED * best:
            break
    return curve


def plot_curve(curve: LrCurve, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(curve.lrs, curve.losses)
    ax.axvline(curve.steepest, color="tab:green", linestyle="--", label="steepest fall")
    ax.axvline(curve.at_minimum, color="tab:red", linestyle=":", label="minimum")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)", title="LR range test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
