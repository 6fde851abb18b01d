"""Model selection during training: the best validation score so far and early stopping.

Rank 0 validates; ``Selection`` remembers the best value of the chosen metric and
how many validations in a row failed to beat it by ``min_delta``. Its state goes
into every checkpoint, so a resumed run keeps counting where it stopped. Each
validated report carries ``SELECTED``: its step when it became the best so far,
else -1; Ray Train's checkpoint manager keeps checkpoints by that score
(``checkpoint_score_attribute``), so the best one survives ``keep_checkpoints``
with the same ``min_delta`` rule the selection applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from jobs.pretrain.config import SelectConfig

SELECTED = "selected_at_step"


@dataclass
class Selection:
    config: SelectConfig
    best: float | None = None
    best_step: int | None = None
    stale: int = 0  # validations in a row without an improvement

    def update(self, metrics: dict[str, Any], step: int) -> bool:
        """Record one validation's metrics; True when it is the best so far.

        A validation that could not measure the metric (NaN: e.g. no labelled row among
        the validated ones) neither improves nor counts towards ``patience``.
        """
        value = metrics.get(self.config.metric, math.nan)
        if math.isnan(value):
            return False
        sign = 1.0 if self.config.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > self.config.min_delta:
            self.best, self.best_step, self.stale = float(value), step, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        patience = self.config.patience
        return patience is not None and self.stale >= patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "stale": self.stale}

    def load(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.stale = state["best"], state["best_step"], state["stale"]

    def summary(self) -> dict[str, Any]:
        """What a report carries: the best value and step so far, and validations since."""
        return {"best_value": self.best, "best_step": self.best_step, "stale": self.stale}
