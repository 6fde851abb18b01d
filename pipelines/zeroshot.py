"""Zero-shot labels from a joint embedding model (CLIP for images, CLAP for audio).

Each label becomes a text prompt ("a photo of a {label}"); a sample's label is
the prompt its image (or audio) embedding is closest to, with the softmax
probability as ``label_confidence``. Listed after the other label sources, it
labels only what they left unlabelled.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.encoders import EncoderConfig, encoder_class, get_encoder
from pipelines.encoders.base import Encoder, device_for_actor


class ZeroShotLabels(BaseModel):
    """``{kind: zero_shot, encoder: {name: clip, model: PATH}, labels: [...]}``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["zero_shot"]
    encoder: EncoderConfig  # a joint model that embeds `modality` and text in one space
    labels: list[str] | None = Field(None, min_length=2)  # default: the spec's vocabulary
    prompt: str = "a photo of a {label}"
    modality: Literal["image", "audio"] = "image"
    min_confidence: float = Field(0.0, ge=0, le=1)  # below it the row gets no label
    logit_scale: float = Field(100.0, gt=0)  # CLIP's temperature for the softmax

    @model_validator(mode="after")
    def _joint_model(self) -> ZeroShotLabels:
        modalities = encoder_class(self.encoder.name).modality
        if not (isinstance(modalities, tuple) and {self.modality, "text"} <= set(modalities)):
            raise ValueError(
                f"zero_shot needs a joint {self.modality}+text encoder (clip for images, "
                f"clap for audio); {self.encoder.name!r} embeds {modalities}"
            )
        if "{label}" not in self.prompt:
            raise ValueError(f"prompt {self.prompt!r} must contain {{label}}")
        return self


class ZeroShotLabeller:
    """Run-time side: the model loads once per process (the build runs it in an actor pool)."""

    name = "zero_shot"

    def __init__(self, source: ZeroShotLabels) -> None:
        self.source = source
        self._encoder: Encoder | None = None
        self._prompts: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"source": self.source, "_encoder": None, "_prompts": None}

    def ready(self) -> tuple[Encoder, np.ndarray]:
        """The model and the labels' prompt embeddings, loaded on first call (a process that
        forks workers calls it first, so they share the model)."""
        if self._encoder is None:
            encoder = get_encoder(self.source.encoder)
            encoder.load(device_for_actor())
            texts = [self.source.prompt.format(label=label) for label in self.source.labels or []]
            prompts = encoder.embed_texts(texts).astype(np.float32)
            self._prompts = prompts / np.linalg.norm(prompts, axis=1, keepdims=True)
            self._encoder = encoder
        assert self._prompts is not None
        return self._encoder, self._prompts

    def annotate(
        self, batch: pa.Table
    ) -> tuple[list[list[str]], list[str | None], list[float | None]]:
        encoder, prompts = self.ready()
        modality = self.source.modality
        outputs = encoder.encode(encoder.preprocess(batch.select([modality])))
        emb = np.asarray(outputs[f"{modality}_emb"], np.float32)
        present = np.asarray(outputs[f"{modality}_mask"], bool)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        logits = self.source.logit_scale * (emb / np.maximum(norms, 1e-12)) @ prompts.T
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        best = probs.argmax(axis=1)
        labels: list[list[str]] = []
        confidences: list[float | None] = []
        for i, index in enumerate(best):
            confident = present[i] and probs[i, index] >= self.source.min_confidence
            labels.append([self.source.labels[index]] if confident and self.source.labels else [])
            confidences.append(float(probs[i, index]) if confident else None)
        return labels, [self.name] * len(labels), confidences
