"""Single-tower Hugging Face encoders: ``hf_text``, ``hf_image``, ``hf_audio``.

Each reads its model's config at construction (output width known before any
weights load), preprocesses with the checkpoint's own tokenizer / processor /
feature extractor, and loads weights once per actor in ``load``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.encoders import hf_inputs, hub
from pipelines.encoders.base import Encoder, EncoderConfig, EncoderParams, device_for_actor
from pipelines.encoders.runtime import forward_rows, mean_pool, split_inputs
from pipelines.errors import SpecError

if TYPE_CHECKING:
    import torch


class HFParams(EncoderParams):
    revision: str | None = None  # hub revision; pin a commit hash for a reproducible identity


class HFEncoder(Encoder):
    """Shared plumbing: config read up front, lazy processors, one model per actor."""

    Params: ClassVar[type[EncoderParams]] = HFParams

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        if not config.model:
            raise SpecError(
                f"encoder {config.name!r} needs `model`: a local model directory or hub id"
            )
        self.model_path: str = config.model
        self.hf_config = hub.read_config(self.model_path, self.revision)
        self.dims: dict[str, int] = {}  # output column -> width, set by subclasses
        self.max_length = 0  # text tokens, set by encoders with a text tower

    def single_tower_or_clip(self, tower: str) -> bool:
        """True for a CLIP checkpoint (one of its towers is used); refuse other multi-tower ones."""
        from transformers import CLIPConfig

        cfg = self.hf_config
        if isinstance(cfg, CLIPConfig):
            return True
        if hub.is_multi_tower(cfg):
            raise SpecError(
                f"encoder {self.config.name!r}: {type(cfg).__name__} is a multi-tower model; "
                f"{self.config.name} takes a {tower}-only checkpoint or CLIP "
                "(use the joint encoders for CLIP/CLAP)"
            )
        return False

    @property
    def revision(self) -> str | None:
        return getattr(self.params, "revision", None)

    def output_columns(self) -> dict[str, tuple[pa.DataType, tuple[int, ...]]]:
        return {name: (self.embedding_type(), (dim,)) for name, dim in self.dims.items()}

    def load(self, device: str) -> None:
        self._lazy["model"] = self.build_model(device)
        self.device = device

    def build_model(self, device: str) -> Any:
        raise NotImplementedError

    def model(self) -> Any:
        """The loaded model, loading it here if ``load`` was not called (tests, the driver)."""
        if "model" not in self._lazy:
            self.load(self.device or device_for_actor())
        return self._lazy["model"]

    def run(
        self,
        inputs: dict[str, np.ndarray],
        modality: str,
        forward: Any,
        *,
        extra: tuple[str, ...] = (),
    ) -> np.ndarray:
        """Forward one modality's model inputs (plus ``extra`` arrays) over its present rows."""
        self.model()
        tensors = split_inputs(inputs, modality) | {k: inputs[k] for k in extra}
        return forward_rows(
            forward,
            tensors,
            inputs[f"{modality}_mask"],
            dim=self.dims[f"{modality}_emb"],
            device=self.device or "cpu",
            batch_size=self.config.batch_size,
            normalize=self.config.normalize,
        )

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Text-only path (no media decoding): rows of ``text_emb`` for ``texts``."""
        if "text_emb" not in self.dims:
            raise TypeError(f"encoder {self.config.name!r} does not embed text")
        batch = pa.table({"text": pa.array(texts, pa.string())})
        inputs = hf_inputs.text_inputs(self.tokenizer(), batch, max_length=self.max_length)
        return self.run(inputs, "text", self._text)

    def _text(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError  # text towers override this

    def tokenizer(self) -> Any:
        return self.cached("tokenizer", lambda: hub.load_tokenizer(self.model_path, self.revision))

    def image_processor(self) -> Any:
        return self.cached(
            "image_processor", lambda: hub.load_image_processor(self.model_path, self.revision)
        )

    def pixel_scale(self) -> hf_inputs.PixelScale | None:
        return self.cached("pixel_scale", lambda: hf_inputs.pixel_scale(self.image_processor()))

    def image_inputs(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return hf_inputs.image_inputs(self.image_processor(), batch, self.pixel_scale())

    def pixel_values(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's input: uint8 pixels are rescaled and normalised here, on its device."""
        pixels = t["pixel_values"]
        if not pixels.is_floating_point():
            scale = self.pixel_scale()
            if scale is None:  # the processor changed between preprocess and encode
                raise RuntimeError(f"encoder {self.config.name!r}: uint8 pixels, no scale")
            pixels = scale.apply(pixels)
        return pixels

    def feature_extractor(self) -> Any:
        return self.cached(
            "feature_extractor",
            lambda: hub.load_feature_extractor(self.model_path, self.revision),
        )


def accepted(function: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors ``function`` names as parameters (tokenizers return extras, e.g.
    token_type_ids, that some models refuse)."""
    import inspect

    names = inspect.signature(function).parameters
    return {k: v for k, v in tensors.items() if k in names}


def clip_tower_config(config: Any, tower: Literal["text", "vision"]) -> Any:
    """A CLIP tower's config with the joint model's projection width.

    A ``CLIP*ModelWithProjection`` loaded from a full CLIP checkpoint reads
    ``projection_dim`` from the sub-config, which can differ from the top-level value
    the checkpoint's projection was trained with.
    """
    import copy

    sub = copy.deepcopy(getattr(config, f"{tower}_config"))
    sub.projection_dim = config.projection_dim
    return sub


class HFTextParams(HFParams):
    max_length: int = Field(128, gt=0)  # tokens; capped by the model's positions
    pooling: Literal["auto", "mean", "cls"] = "auto"  # auto: CLIP projection, else mean


class HFText(HFEncoder):
    """Sentence embeddings: mean of the last hidden states over real tokens."""

    modality = "text"
    Params = HFTextParams
    params: HFTextParams

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        cfg = self.hf_config
        self.is_clip = self.single_tower_or_clip("text")
        text_cfg = cfg.text_config if self.is_clip else cfg
        projected = self.is_clip and self.params.pooling == "auto"
        self.dims = {"text_emb": cfg.projection_dim if projected else hub.hidden_dim(text_cfg)}
        self.max_length = hub.text_length(text_cfg, self.params.max_length)

    def build_model(self, device: str) -> Any:
        from transformers import AutoModel, CLIPTextModelWithProjection

        if self.is_clip:
            config = clip_tower_config(self.hf_config, "text")
            return hub.load_model(
                CLIPTextModelWithProjection, self.model_path, device,
                revision=self.revision, config=config,
            )[0]  # fmt: skip
        return hub.load_model(AutoModel, self.model_path, device, revision=self.revision)[0]

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return hf_inputs.text_inputs(self.tokenizer(), batch, max_length=self.max_length)

    def encode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"text_emb": self.run(inputs, "text", self._text), "text_mask": inputs["text_mask"]}

    def _text(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.model()
        out = model(**accepted(model.forward, t))
        if self.is_clip and self.params.pooling == "auto":
            return out.text_embeds
        if self.params.pooling == "cls":
            return out.last_hidden_state[:, 0]
        return mean_pool(out.last_hidden_state, t["attention_mask"])


class HFImageParams(HFParams):
    # auto: CLIP's projected image_embeds, else the checkpoint's pooler, else the CLS token.
    pooling: Literal["auto", "pooler", "cls", "mean"] = "auto"


class HFImage(HFEncoder):
    """Image embeddings from a vision tower (ViT, DINOv2, ConvNeXt, CLIP vision, ...)."""

    modality = "image"
    Params = HFImageParams
    params: HFImageParams

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        cfg = self.hf_config
        self.is_clip = self.single_tower_or_clip("vision")
        projected = self.is_clip and self.params.pooling in ("auto", "pooler")
        width = hub.hidden_dim(cfg.vision_config if self.is_clip else cfg)
        self.dims = {"image_emb": cfg.projection_dim if projected else width}
        self.pooler_missing = False

    def build_model(self, device: str) -> Any:
        from transformers import AutoModel, CLIPVisionModelWithProjection

        if self.is_clip:
            config = clip_tower_config(self.hf_config, "vision")
            return hub.load_model(
                CLIPVisionModelWithProjection, self.model_path, device,
                revision=self.revision, config=config,
            )[0]  # fmt: skip
        model, missing = hub.load_model(AutoModel, self.model_path, device, revision=self.revision)
        # A pooler the checkpoint lacks is random at every load: never use it.
        self.pooler_missing = any(k.split(".")[0] == "pooler" for k in missing)
        if self.pooler_missing and self.params.pooling == "pooler":
            raise SpecError(f"encoder model {self.model_path!r} has no trained pooler")
        return model

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return self.image_inputs(batch)

    def encode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.run(inputs, "image", self._forward)
        return {"image_emb": emb, "image_mask": inputs["image_mask"]}

    def _forward(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model()(pixel_values=self.pixel_values(t))
        pooling = self.params.pooling
        if self.is_clip and pooling in ("auto", "pooler"):
            return out.image_embeds
        pooled = getattr(out, "pooler_output", None)
        if pooling in ("auto", "pooler") and pooled is not None and not self.pooler_missing:
            return pooled
        hidden = out.last_hidden_state
        if hidden.dim() == 4:  # convolutional: (batch, channels, h, w)
            return hidden.mean(dim=(2, 3))
        return hidden.mean(1) if pooling == "mean" else hidden[:, 0]


class HFAudioParams(HFParams):
    max_seconds: float = Field(10.0, gt=0)  # audio cropped from the start to this duration
    # auto: CLAP's projected audio features; AST's pooler; mean of last hidden state otherwise.
    pooling: Literal["auto", "pooler", "mean"] = "auto"


class HFAudio(HFEncoder):
    """Audio embeddings: AST, wav2vec2 / HuBERT / WavLM, Whisper's encoder, CLAP's audio tower."""

    modality = "audio"
    Params = HFAudioParams
    params: HFAudioParams

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        cfg = self.hf_config
        self.is_clap = cfg.model_type == "clap"
        if self.is_clap:
            dim = cfg.projection_dim
        elif hub.is_multi_tower(cfg):
            raise SpecError(
                f"encoder {config.name!r}: {type(cfg).__name__} is a multi-tower model; "
                "hf_audio takes an audio-only checkpoint or CLAP"
            )
        else:
            dim = hub.hidden_dim(cfg)
        self.dims = {"audio_emb": dim}

    def build_model(self, device: str) -> Any:
        from transformers import AutoModel

        return hub.load_model(AutoModel, self.model_path, device, revision=self.revision)[0]

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        return hf_inputs.audio_inputs(
            self.feature_extractor(), batch, max_seconds=self.params.max_seconds
        )

    def encode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.run(inputs, "audio", self._forward, extra=("audio_fraction",))
        return {"audio_emb": emb, "audio_mask": inputs["audio_mask"]}

    def _forward(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.model()
        fraction = t.pop("audio_fraction")
        if self.is_clap:
            return model.get_audio_features(**accepted(model.get_audio_features, t)).pooler_output
        tower = model.get_encoder() if self.hf_config.is_encoder_decoder else model
        out = tower(**accepted(tower.forward, t))
        pooled = getattr(out, "pooler_output", None)
        if self.params.pooling != "mean" and pooled is not None:
            return pooled
        if self.params.pooling == "pooler":
            raise SpecError(f"encoder model {self.model_path!r} has no pooler output")
        return mean_pool(out.last_hidden_state, frame_mask(fraction, out.last_hidden_state))


def frame_mask(fraction: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """(batch, frames) mask of the frames that cover real audio (at least one)."""
    import torch

    frames = hidden.shape[1]
    valid = torch.ceil(fraction.float() * frames).clamp(min=1).unsqueeze(1)
    return (torch.arange(frames, device=hidden.device).unsqueeze(0) < valid).long()
