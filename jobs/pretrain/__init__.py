"""Contrastive pretraining (CLIP / ImageBind-style) on a feature set of the store, with Ray Train.

``load_config`` reads the YAML; ``run_training`` trains and returns the Ray Train
``Result``; ``jobs.evaluate.evaluate`` scores a checkpoint.
"""

from __future__ import annotations

from jobs.pretrain.config import TrainConfig, load_config, parse_config
from jobs.pretrain.train import run_training

__all__ = ["TrainConfig", "load_config", "parse_config", "run_training"]
