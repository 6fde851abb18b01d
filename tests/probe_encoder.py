"""A user encoder (loaded by dotted path) that reports where and how often it ran."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from features.schema import list_of
from pipelines.encoders.base import Encoder

LOADS = {"count": 0}  # per process: how many times a model was loaded here


class ProbeEncoder(Encoder):
    modality = "text"

    def output_columns(self):
        return {"text_emb": (list_of(pa.float32()), (3,))}

    def preprocess(self, batch):
        texts = batch.column("text").to_pylist()
        return {"text_mask": np.array([t is not None for t in texts])}

    def load(self, device: str) -> None:
        super().load(device)
        LOADS["count"] += 1

    def encode(self, inputs):
        import ray

        in_actor = ray.get_runtime_context().get_actor_id() is not None
        row = [float(os.getpid()), float(in_actor), float(LOADS["count"])]
        n = len(inputs["text_mask"])
        return {"text_emb": np.tile(np.array(row, np.float32), (n, 1)), **inputs}


class ForkProbeEncoder(ProbeEncoder):
    """Reports, per row, the process that ran the forward, its parent, the one that loaded
    the model, torch's threads there and the loads that process saw: a stage run in the CLI process
    must load once there and run forwards in forked workers on one thread each."""

    loaded_in = 0

    def output_columns(self):
        return {"text_emb": (list_of(pa.float32()), (5,))}

    def load(self, device: str) -> None:
        super().load(device)
        ForkProbeEncoder.loaded_in = os.getpid()

    def encode(self, inputs):
        import torch

        row = [os.getpid(), os.getppid(), self.loaded_in, torch.get_num_threads(), LOADS["count"]]
        n = len(inputs["text_mask"])
        return {"text_emb": np.tile(np.array(row, np.float32), (n, 1)), **inputs}
