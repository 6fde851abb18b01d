"""One optimisation step, the same inside a Ray Train worker and outside Ray.

``Stepper`` owns the model, optimizer, LR schedule and AMP scaler. The trainer's
worker subclasses it; the ingest benchmark runs it on in-memory batches, so
both sides of that comparison execute exactly the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from jobs.pretrain.augment import augment_batch
from jobs.pretrain.config import TrainConfig
from jobs.pretrain.loss import contrastive_loss, input_keys
from jobs.pretrain.model import ContrastiveModel, param_groups


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Stepper:
    """Model + AdamW + warmup/cosine schedule + AMP; ``train_step`` accumulates running means."""

    def __init__(
        self,
        cfg: TrainConfig,
        shapes: dict[str, list[int]],
        *,
        total_steps: int,
        device: torch.device,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
        rank: int = 0,
    ) -> None:
        self.cfg, self.device = cfg, device
        cuda = device.type == "cuda"
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.amp = amp if cuda else None  # CPU autocast is slower than float32 for these towers
        torch.manual_seed(cfg.seed)  # identical initial weights on every worker
        self.model = ContrastiveModel(cfg, shapes)
        # ray.train.torch.prepare_model: moves to the device and wraps DDP when world > 1.
        self.ddp = wrap(self.model) if wrap else self.model.to(device)
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(cfg.warmup_steps, total_steps)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is torch.float16)
        self.step = 0
        self.rank = rank  # augmentations differ per worker
        text = cfg.modalities.get("text")
        self.text_pad_id = getattr(text, "pad_id", None) or 0
        self.running: dict[str, float] = {}

    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Forward, contrastive loss over the configured pairs, clipped backward, step."""
        self.ddp.train()
        towers = list(self.model.towers)
        loss_cfg = self.cfg.loss
        # keys of the inputs as stored: augmentation makes identical inputs differ
        keys = (
            {m: input_keys(batch[f"x_{m}"]) for m in towers}
            if loss_cfg.duplicates != "negative"
            else None
        )
        if self.cfg.augment is not None:
            batch = augment_batch(
                batch,
                self.cfg.augment,
                seed=self.cfg.seed,
                step=self.step,
                rank=self.rank,
                pad_id=self.text_pad_id,
            )
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type, dtype=self.amp or torch.float32, enabled=bool(self.amp)
        ):
            out = self.ddp(batch)
        loss, stats = contrastive_loss(
            {m: out[m] for m in towers},
            {m: batch[f"has_{m}"] for m in towers},
            self.cfg.modality_pairs,
            kind=loss_cfg.kind,
            scale=out["scale"],
            bias=out["bias"] if loss_cfg.kind == "siglip" else None,
            keys=keys,
            any_modality=loss_cfg.duplicates == "any",
            labels=batch.get("label"),
            supervised_weight=loss_cfg.supervised_weight,
        )
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        values = {"loss": float(loss.detach()), "grad_norm": float(norm), **stats}
        for key, value in values.items():
            self.running[key] = self.running.get(key, 0.0) + value
        self.running["n"] = self.running.get("n", 0.0) + 1

    def running_means(self) -> dict[str, float]:
        n = self.running.get("n", 0.0)
        return {k: v / n for k, v in self.running.items() if k != "n"} if n else {}

    def state_dicts(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
