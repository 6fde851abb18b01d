"""Joint encoders: two towers, one embedding space (``clip``: image+text, ``clap``: audio+text).

Both towers' embeddings come from one model load, so ``image_emb`` (or
``audio_emb``) and ``text_emb`` of a row are directly comparable, and
``embed_texts`` puts free text (label prompts, search queries) in that space.
In transformers 5.x ``get_*_features`` return a ``BaseModelOutputWithPooling``
whose ``pooler_output`` is the projected embedding (CLAP's already L2-normalised).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.encoders import hf_inputs, hub
from pipelines.encoders.base import EncoderConfig
from pipelines.encoders.hf import HFEncoder, HFParams, accepted
from pipelines.errors import SpecError

if TYPE_CHECKING:
    import torch


class JointParams(HFParams):
    max_length: int = Field(77, gt=0)  # text tokens (CLIP's context); capped by the model


class Clip(HFEncoder):
    """CLIP (and CLIP-architecture checkpoints): ``image_emb`` + ``text_emb``."""

    modality = ("image", "text")
    Params = JointParams
    params: JointParams

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        cfg = self.hf_config
        if cfg.model_type != "clip":
            raise SpecError(
                f"encoder {config.name!r}: expected a CLIP model, got {cfg.model_type!r}"
            )
        self.dims = {"image_emb": cfg.projection_dim, "text_emb": cfg.projection_dim}
        self.max_length = hub.text_length(cfg.text_config, self.params.max_length)

    def build_model(self, device: str) -> Any:
        from transformers import CLIPModel

        return hub.load_model(CLIPModel, self.model_path, device, revision=self.revision)[0]

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        text = hf_inputs.text_inputs(self.tokenizer(), batch, max_length=self.max_length)
        return text | self.image_inputs(batch)

    def encode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "image_emb": self.run(inputs, "image", self._image),
            "text_emb": self.run(inputs, "text", self._text),
            "image_mask": inputs["image_mask"],
            "text_mask": inputs["text_mask"],
        }

    def _image(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model().get_image_features(pixel_values=self.pixel_values(t)).pooler_output

    def _text(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.model()
        return model.get_text_features(**accepted(model.get_text_features, t)).pooler_output


class ClapParams(JointParams):
    max_seconds: float = Field(10.0, gt=0)  # cropped from the start; CLAP trained on 10 s


class Clap(HFEncoder):
    """CLAP: ``audio_emb`` + ``text_emb`` (both L2-normalised by the model itself)."""

    modality = ("audio", "text")
    Params = ClapParams
    params: ClapParams

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        cfg = self.hf_config
        if cfg.model_type != "clap":
            raise SpecError(
                f"encoder {config.name!r}: expected a CLAP model, got {cfg.model_type!r}"
            )
        self.dims = {"audio_emb": cfg.projection_dim, "text_emb": cfg.projection_dim}
        self.max_length = hub.text_length(cfg.text_config, self.params.max_length)

    def build_model(self, device: str) -> Any:
        from transformers import ClapModel

        return hub.load_model(ClapModel, self.model_path, device, revision=self.revision)[0]

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        text = hf_inputs.text_inputs(self.tokenizer(), batch, max_length=self.max_length)
        audio = hf_inputs.audio_inputs(
            self.feature_extractor(), batch, max_seconds=self.params.max_seconds
        )
        return text | audio

    def encode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "audio_emb": self.run(inputs, "audio", self._audio),
            "text_emb": self.run(inputs, "text", self._text),
            "audio_mask": inputs["audio_mask"],
            "text_mask": inputs["text_mask"],
        }

    def _audio(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.model()
        return model.get_audio_features(**accepted(model.get_audio_features, t)).pooler_output

    def _text(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.model()
        return model.get_text_features(**accepted(model.get_text_features, t)).pooler_output
