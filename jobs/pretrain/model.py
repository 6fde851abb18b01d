"""Towers (one per modality) and the ContrastiveModel that holds them and the logit scale.

Every tower maps its input column to an L2-normalised vector in one shared
space of ``out_dim``, so a dot product between any two modalities is a cosine.
Towers are plain ``nn.Module``s built from their config and the input shape the
feature set records, so the same code builds them for training, evaluation and
export.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from jobs.pretrain.config import (
    CnnTower,
    HfTower,
    LossConfig,
    ProjectionTower,
    TdnnTower,
    TrainConfig,
    TransformerTower,
)


def _standardize(x: torch.Tensor) -> torch.Tensor:
    # Per-sample standardisation: log-mel dB values and normalised pixels live on
    # very different scales; this keeps the first layer's inputs near unit variance.
    dims = tuple(range(1, x.dim()))
    return (x - x.mean(dims, keepdim=True)) / (x.std(dims, keepdim=True) + 1e-5)


class ProjectionHead(nn.Module):
    """MLP over a frozen encoder's embedding: the only trainable part of a LiT-style tower."""

    def __init__(self, cfg: ProjectionTower, shape: list[int]) -> None:
        super().__init__()
        (dim,) = shape
        if cfg.hidden:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(dim, cfg.hidden),
                nn.GELU(),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.hidden, cfg.out_dim),
            )
        else:
            self.net = nn.Linear(dim, cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def voiced_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, T) True where a frame of a (B, M, T) log-mel is above the row's floor (the
    silence its padding is filled with)."""
    floor = x.amin(dim=(1, 2), keepdim=True)
    return (x > floor + 1e-3).any(dim=1, keepdim=True)


def _masked_moments(
    x: torch.Tensor, mask: torch.Tensor, dims: int | tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ``x`` over ``dims``, counting only where ``mask`` (broadcast
    to ``x``) is 1; keepdim."""
    weight = mask.expand_as(x)
    count = weight.sum(dim=dims, keepdim=True).clamp(min=1.0)
    mean = (x * weight).sum(dim=dims, keepdim=True) / count
    return mean, ((x - mean) ** 2 * weight).sum(dim=dims, keepdim=True) / count


def _cmvn(x: torch.Tensor) -> torch.Tensor:
    """Each mel bin of each (B, M, T) log-mel standardised over its non-silent frames (a
    frame at the row's floor level is padding); padding becomes 0, the new mean."""
    voiced = voiced_frames(x).to(x.dtype)
    mean, var = _masked_moments(x, voiced, 2)
    return (x - mean) / (var.sqrt() + 1e-5) * voiced


class ConvTower(nn.Module):
    """Stride-2 conv blocks then global average pooling: images (3xSxS) or log-mels (MxT)."""

    def __init__(self, cfg: CnnTower, shape: list[int]) -> None:
        super().__init__()
        self.normalize = _cmvn if cfg.normalize == "cmvn" else _standardize
        self.add_channel = len(shape) == 2  # a spectrogram is a 1-channel image
        in_ch = 1 if self.add_channel else shape[0]
        layers: list[nn.Module] = []
        for ch in cfg.channels:
            layers += [nn.Conv2d(in_ch, ch, 3, stride=2, padding=1), nn.GroupNorm(1, ch), nn.GELU()]
            in_ch = ch
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(in_ch, cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.add_channel:
            x = x.unsqueeze(1)
        h = self.convs(x)
        return self.proj(h.mean(dim=(2, 3)))


def dct_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """The orthonormal DCT-II as an (n_out, n_in) matrix: MFCCs are its first rows applied
    to a log-mel (what librosa.feature.mfcc computes from the same log-mel)."""
    k = torch.arange(n_out, dtype=torch.float64).view(-1, 1)
    n = torch.arange(n_in, dtype=torch.float64).view(1, -1)
    m = torch.cos(math.pi * k * (2 * n + 1) / (2 * n_in)) * math.sqrt(2.0 / n_in)
    m[0] /= math.sqrt(2.0)
    return m.float()


class FrameNorm(nn.Module):
    """LayerNorm over the channels of each frame of a (B, C, T) sequence: unlike a norm over
    time, it gives a frame the same value however much padding its row has."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class SpeechTdnn(nn.Module):
    """MFCCs + deltas over voiced frames, dilated 1-D convs, mean + std pooling (x-vector
    style): a digit's identity is in how its spectrum moves over ~0.5 s, which a 2-D CNN
    over the whole padded second learns from three voices less well. Padding frames are
    zeroed after every block, so where a word sits and how long its row is change
    nothing."""

    def __init__(self, cfg: TdnnTower, shape: list[int]) -> None:
        super().__init__()
        mels = shape[0]
        dct = dct_matrix(cfg.n_mfcc, mels) if cfg.n_mfcc else torch.eye(mels)
        self.register_buffer("dct", dct, persistent=False)
        self.deltas = cfg.deltas
        ch, features = cfg.channels, dct.shape[0] * (2 if cfg.deltas else 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(c_in, ch, size, padding=dilation * (size // 2),
                                    dilation=dilation), FrameNorm(ch), nn.GELU())
            for c_in, size, dilation in ((features, 5, 1), (ch, 3, 2), (ch, 3, 3))
        )  # fmt: skip
        self.proj = nn.Linear(2 * ch, cfg.out_dim)

    def features(self, x: torch.Tensor, voiced: torch.Tensor) -> torch.Tensor:
        """(B, C, T) coefficients (and deltas) standardised over each row's voiced frames,
        0 on the padding."""
        c = torch.einsum("km,bmt->bkt", self.dct, x)
        mean, var = _masked_moments(c, voiced, (1, 2))
        c = (c - mean) / (var.sqrt() + 1e-5) * voiced
        if self.deltas:  # (c[t+1] - c[t-1]) / 2, the padding counting as 0 at either edge
            padded = F.pad(c, (1, 1))
            c = torch.cat([c, (padded[:, :, 2:] - padded[:, :, :-2]) / 2 * voiced], dim=1)
        return c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        voiced = voiced_frames(x).to(x.dtype)
        h = self.features(x, voiced)
        for block in self.blocks:
            h = block(h) * voiced
        mean, var = _masked_moments(h, voiced, 2)
        return self.proj(torch.cat([mean, (var + 1e-5).sqrt()], dim=1).squeeze(2))


class TextTransformer(nn.Module):
    """Token + position embeddings, a pre-norm encoder, mean pooling over non-pad tokens."""

    def __init__(self, cfg: TransformerTower, shape: list[int]) -> None:
        super().__init__()
        (length,) = shape
        if cfg.vocab_size is None:
            raise ValueError("vocab_size is not set: run_training reads it from the feature set")
        self.pad_id = cfg.pad_id or 0
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positions = nn.Parameter(torch.randn(length, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.out_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.long()
        keep = ids != self.pad_id
        keep[:, 0] |= ~keep.any(dim=1)  # an all-pad row still attends to one token
        h = self.tokens(ids) + self.positions[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=~keep))
        w = keep.unsqueeze(-1).to(h.dtype)
        return self.proj((h * w).sum(1) / w.sum(1))


class HfEncoder(nn.Module):
    """A Hugging Face backbone (pooled output, or masked mean of the last hidden state)."""

    def __init__(self, cfg: HfTower, shape: list[int]) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if cfg.path is not None:
            self.backbone = AutoModel.from_pretrained(
                cfg.path, local_files_only=True, use_safetensors=True
            )
        else:
            config = dict(cfg.config or {})
            self.backbone = AutoModel.from_config(AutoConfig.for_model(**config))
        self.input = cfg.input
        self.pad_id = cfg.pad_id or 0
        hidden = getattr(self.backbone.config, "hidden_size", None)
        if hidden is None:
            raise ValueError(f"HF model {type(self.backbone).__name__} has no hidden_size")
        self.proj = nn.Linear(hidden, cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.input == "text_ids":
            x = x.long()
            mask = (x != self.pad_id).long()
            out = self.backbone(input_ids=x, attention_mask=mask)
        elif self.input == "image_pixels":
            out = self.backbone(pixel_values=x)
        else:  # audio_logmel is (mels, frames); AST-style models take (frames, mels)
            out = self.backbone(input_values=x.transpose(1, 2))
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            h = out.last_hidden_state
            if mask is not None and mask.shape[1] == h.shape[1]:
                w = mask.unsqueeze(-1).to(h.dtype)
                pooled = (h * w).sum(1) / w.sum(1).clamp(min=1)
            else:
                pooled = h.mean(1)
        return self.proj(pooled)


TOWERS: dict[str, type[nn.Module]] = {
    "projection": ProjectionHead,
    "cnn": ConvTower,
    "tdnn": SpeechTdnn,
    "transformer": TextTransformer,
    "hf": HfEncoder,
}


def build_tower(cfg: Any, shape: list[int]) -> nn.Module:
    """The tower for one modality's config and its input column's per-row shape."""
    return TOWERS[cfg.kind](cfg, list(shape))


class ContrastiveModel(nn.Module):
    """One tower per modality plus the shared, learnable logit scale (and SigLIP bias)."""

    def __init__(self, config: TrainConfig, shapes: dict[str, list[int]]) -> None:
        super().__init__()
        self.inputs = {m: t.input for m, t in config.modalities.items()}
        self.towers = nn.ModuleDict(
            {m: build_tower(t, shapes[t.input]) for m, t in sorted(config.modalities.items())}
        )
        loss: LossConfig = config.loss
        temperature = loss.init_temperature or (0.07 if loss.kind == "infonce" else 0.1)
        self.max_logit_scale = loss.max_logit_scale
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        # The bias is SigLIP's; frozen under InfoNCE so DDP sees no unused trainable parameter.
        self.logit_bias = nn.Parameter(
            torch.tensor(float(loss.init_bias)), requires_grad=loss.kind == "siglip"
        )
        self.loss_kind = loss.kind

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped (CLIP clamps at 100 so the softmax cannot collapse)."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.towers[modality](x).float(), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalised features per modality (``x_<modality>`` inputs), plus ``scale`` and ``bias``.

        The scale and bias come out of ``forward`` so DDP sees them used inside it.
        """
        out = {m: self.encode(m, batch[f"x_{m}"]) for m in self.towers if f"x_{m}" in batch}
        return {**out, "scale": self.scale(), "bias": self.logit_bias}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norm weights, embeddings' 1-D params, the scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "logit_" in name or name.endswith("positions"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ---- export ---------------------------------------------------------------------


def export_towers(model: ContrastiveModel, out_dir: Path, info: dict[str, Any]) -> list[Path]:
    """One ``<modality>.safetensors`` + ``<modality>.json`` per tower, loadable without pickle."""
    from safetensors.torch import save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for modality, tower in model.towers.items():
        weights = out_dir / f"{modality}.safetensors"
        save_model(tower, str(weights))
        meta = {
            "modality": modality,
            "tower": info["config"]["modalities"][modality],
            "input": model.inputs[modality],
            "input_shape": info["shapes"][model.inputs[modality]],
            "out_dim": info["config"]["modalities"][modality]["out_dim"],
            "normalize": True,  # apply F.normalize to the tower output
            "logit_scale": float(model.scale().detach()),
            "feature_set": info["feature_set"],
            "version": info["version"],
            "encoders": info["encoders"],
        }
        (out_dir / f"{modality}.json").write_text(json.dumps(meta, indent=2))
        written.append(weights)
    return written


def load_tower(export_dir: str | Path, modality: str) -> tuple[nn.Module, dict[str, Any]]:
    """A tower exported by ``export_towers`` and its JSON description."""
    from pydantic import TypeAdapter
    from safetensors.torch import load_model

    from jobs.pretrain.config import Tower

    export_dir = Path(export_dir)
    meta = json.loads((export_dir / f"{modality}.json").read_text())
    cfg = TypeAdapter(Tower).validate_python(meta["tower"])
    tower = build_tower(cfg, meta["input_shape"])
    load_model(tower, str(export_dir / f"{modality}.safetensors"))
    return tower.eval(), meta
