"""Contrastive pretraining (CLIP / ImageBind-style) on a feature set of the store, with Ray Train.

``load_config`` reads the YAML; ``run_training`` trains and returns the Ray Train
``Result``; ``jobs.evaluate.evaluate`` scores a checkpoint. Names are imported
lazily: Ray Data tasks import ``jobs.pretrain.arrays`` and must not pay for torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainConfig", "load_config", "parse_config", "run_training"]


def __getattr__(name: str) -> Any:
    if name in ("TrainConfig", "load_config", "parse_config"):
        from jobs.pretrain import config

        return getattr(config, name)
    if name == "run_training":
        from jobs.pretrain.train import run_training

        return run_training
    raise AttributeError(name)
