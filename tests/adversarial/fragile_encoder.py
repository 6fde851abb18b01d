"""User encoders (loaded by dotted path) that fail on some rows, as real ones do on odd data."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from features.schema import list_of
from pipelines.encoders.base import Encoder


def _texts(batch: pa.Table) -> list[str | None]:
    return (
        batch.column("text").to_pylist()
        if "text" in batch.column_names
        else [None] * batch.num_rows
    )


class FailsInPreprocess(Encoder):
    """Length features; raises on any caption that contains "boom" (a CPU-side failure)."""

    modality = "text"
    needs_model = False

    def output_columns(self):
        return {"text_len": (list_of(pa.float32()), (1,))}

    def preprocess(self, batch):
        texts = _texts(batch)
        if any(t and "boom" in t for t in texts):
            raise ValueError("cannot featurize a caption that says boom")
        lengths = np.array([[len(t or "")] for t in texts], np.float32)
        return {"text_len": lengths, "text_mask": np.array([t is not None for t in texts])}

    def encode(self, inputs):
        return inputs


class FailsInForward(Encoder):
    """A 'model' whose forward pass raises on rows whose length feature is 13 (GPU-side)."""

    modality = "text"

    def output_columns(self):
        return {"text_emb": (list_of(pa.float32()), (2,))}

    def preprocess(self, batch):
        texts = _texts(batch)
        lengths = np.array([[len(t or "")] for t in texts], np.float32)
        return {"text__len": lengths, "text_mask": np.array([t is not None for t in texts])}

    def encode(self, inputs):
        lengths, mask = inputs["text__len"], inputs["text_mask"]
        if (lengths[mask.astype(bool)] == 13).any():
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        emb = np.concatenate([lengths, np.ones_like(lengths)], axis=1)
        return {"text_emb": emb / np.linalg.norm(emb, axis=1, keepdims=True), "text_mask": mask}


class CountsCalls(FailsInForward):
    """``FailsInForward`` that counts, per process, the rows each step was given."""

    rows = {"preprocess": 0, "encode": 0}

    def preprocess(self, batch):
        CountsCalls.rows["preprocess"] += batch.num_rows
        return super().preprocess(batch)

    def encode(self, inputs):
        CountsCalls.rows["encode"] += len(inputs["text_mask"])
        return super().encode(inputs)
