"""The pretraining job: ``train_loop_per_worker`` (runs in each Ray Train worker) and
``run_training`` (the driver: pins the feature set, checks a resumed checkpoint, starts
a Ray Train V2 ``TorchTrainer``).

Determinism: Ray Data runs with ``preserve_order`` (so each worker's shard is the same
rows in the same block order every epoch) and each worker shuffles locally with the
seed ``seed + epoch``. A resumed run replays the epoch it stopped in and skips the
batches it already trained on, so it matches an uninterrupted run up to float noise.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.storage import filesystem_for, is_local, join_uri
from features.store import FeatureStore
from jobs.pretrain import checkpoint as ckpt
from jobs.pretrain.config import TrainConfig
from jobs.pretrain.data import (
    check_compatible,
    check_towers,
    count_rows,
    feature_set_info,
    split_dataset,
)
from jobs.pretrain.loss import contrastive_loss
from jobs.pretrain.metrics import embed, pair_recalls
from jobs.pretrain.model import ContrastiveModel, export_towers, param_groups
from pipelines.errors import SpecError


def cosine_with_warmup(warmup: int, total: int):
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ---- worker side ------------------------------------------------------------------


class _Worker:
    """Everything one worker holds across steps; methods are the loop's parts."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        self.cfg = TrainConfig.model_validate(loop_config["config"])
        self.info: dict[str, Any] = loop_config["info"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        cuda = self.device.type == "cuda"
        self.amp = (
            {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.amp) if cuda else None
        )

        torch.manual_seed(self.cfg.seed)  # identical initial weights on every worker
        self.model = ContrastiveModel(self.cfg, self.info["shapes"])
        self.ddp = ray.train.torch.prepare_model(self.model)
        opt = self.cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps
        )
        self.spe: int = self.info["steps_per_epoch"]
        total = self.cfg.epochs * self.spe
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(self.cfg.warmup_steps, total)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp is torch.float16)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.running: dict[str, float] = {}
        self.resumed_from: int | None = None
        self.val_cache: dict[str, np.ndarray] | None = None

    def restore(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            state = ckpt.load_state(d)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self.running = dict(state["running"])
        self.resumed_from = self.step

    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        self.ddp.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type, dtype=self.amp or torch.float32, enabled=bool(self.amp)
        ):
            out = self.ddp(batch)
        present = {m: batch[f"has_{m}"] for m in self.model.towers}
        feats = {m: out[m] for m in self.model.towers}
        siglip = self.cfg.loss.kind == "siglip"
        loss, stats = contrastive_loss(
            feats, present, self.cfg.modality_pairs, kind=self.cfg.loss.kind,
            scale=out["scale"], bias=out["bias"] if siglip else None,
        )  # fmt: skip
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        for key, value in {"loss": float(loss.detach()), "grad_norm": float(norm), **stats}.items():
            self.running[key] = self.running.get(key, 0.0) + value
        self.running["n"] = self.running.get("n", 0.0) + 1

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Val recall@k on rank 0 (up to ``val_max_rows`` original rows), {} elsewhere."""
        import ray.train

        if self.rank != 0 or not self.info.get("has_val"):
            return {}
        if self.val_cache is None:  # read once: the val rows do not change between epochs
            arrays: dict[str, list[np.ndarray]] = {}
            rows = 0
            for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=512):
                for key, value in batch.items():
                    arrays.setdefault(key, []).append(value)
                rows += len(next(iter(batch.values())))
                if rows >= self.cfg.val_max_rows:
                    break
            cut = self.cfg.val_max_rows
            self.val_cache = {k: np.concatenate(v)[:cut] for k, v in arrays.items()}
        data = self.val_cache
        if not data or not len(next(iter(data.values()))):
            return {}
        self.model.eval()
        feats = {
            m: embed(self.model, m, data[f"x_{m}"], device=self.device) for m in self.model.towers
        }
        present = {m: data[f"has_{m}"] for m in self.model.towers}
        recalls = pair_recalls(feats, present, self.cfg.modality_pairs)
        return {f"val/{k}": v for k, v in recalls.items() if not k.endswith("/n")}

    def state(self) -> dict[str, Any]:
        meta = {**self.info, "config": self.cfg.public_dict(), "world_size": self.world}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "running": dict(self.running),
            "history": list(self.history),
            "meta": meta,
        }

    def report(self, metrics: dict[str, Any], *, final: bool = False) -> None:
        """Report on every rank (it is a barrier); rank 0 attaches the checkpoint."""
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            state = self.state()
            ckpt.save_checkpoint(directory, state)
            if final:
                export_towers(self.model, directory / ckpt.EXPORT_DIR, state["meta"])
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=f"checkpoint_step{self.step:07d}",
            )

    def maybe_fail(self) -> None:
        """The ``fault`` test hook: fail once (marker file) after the configured step."""
        fault = self.cfg.fault
        if fault is None or self.step != fault.after_step or self.rank != fault.rank:
            return
        marker = Path(fault.marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"failed after step {self.step}\n")
        if fault.mode == "exit":
            os._exit(1)
        raise RuntimeError(f"injected fault after step {self.step} (fault test hook)")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """One worker's training loop; every worker runs the same number of steps and reports."""
    import ray.train

    w = _Worker(loop_config)
    w.restore()
    cfg, spe = w.cfg, w.spe
    shard = ray.train.get_dataset_shard("train")
    start_epoch, skip = divmod(w.step, spe)
    for epoch in range(start_epoch, cfg.epochs):
        started, seen = time.perf_counter(), 0
        batches = shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            prefetch_batches=cfg.prefetch_batches,
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + epoch if cfg.shuffle_buffer else None,
        )
        for index, batch in enumerate(batches):
            seen = index + 1
            if index < skip:
                continue  # trained on before the restart: same batch, same order
            w.train_step(batch)
            if seen >= spe:
                continue  # the epoch's last step reports (and checkpoints) below
            if cfg.checkpoint_every_steps and w.step % cfg.checkpoint_every_steps == 0:
                w.report({"epoch": epoch, "step": w.step, **_means(w.running)})
            w.maybe_fail()
        if seen != spe:
            raise RuntimeError(
                f"worker {w.rank} got {seen} batches in epoch {epoch}, expected {spe}"
            )
        skip = 0
        metrics = {
            "epoch": epoch + 1,
            "step": w.step,
            "lr": w.scheduler.get_last_lr()[0],
            "logit_scale": float(w.model.scale().detach()),
            "epoch_time_s": time.perf_counter() - started,
            "resumed_from_step": w.resumed_from,
            **{f"train_{k}": v for k, v in _means(w.running).items()},
            **w.validate(),
        }
        w.history.append(metrics)
        w.running = {}
        w.report(metrics, final=epoch + 1 == cfg.epochs)
        w.resumed_from = None
        w.maybe_fail()


def _means(running: dict[str, float]) -> dict[str, float]:
    n = running.get("n", 0.0)
    return {k: v / n for k, v in running.items() if k != "n"} if n else {}


# ---- driver side ------------------------------------------------------------------


def run_training(config: TrainConfig):
    """Train ``config`` with Ray Train and return its ``ray.train.Result``.

    A rerun with the same ``name`` and ``storage_path`` resumes the latest
    checkpoint (Ray Train V2 restores the run's snapshot); it is refused with a
    ``SpecError`` when the feature set's dimensions or encoders changed since.
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.runtime import init_ray

    init_ray()
    store = FeatureStore(config.store, storage_options=config.storage_options)
    storage_path, filesystem = config.run_storage_path, None
    if not is_local(storage_path):
        filesystem, storage_path = filesystem_for(storage_path, config.storage_options)
    else:
        Path(storage_path).mkdir(parents=True, exist_ok=True)
    previous = ckpt.latest_run_checkpoint(join_uri(storage_path, config.name), filesystem)

    version = config.version
    if version is None and previous is not None:
        version = previous["version"]  # a resumed run keeps the data it started on
    info = feature_set_info(store, config.feature_set, version)
    check_towers(info, config)
    columns = sorted({t.input for t in config.modalities.values()})
    if previous is not None:
        check_compatible(previous, info, columns)

    rows = count_rows(store, info, "train", include_views=config.include_views)
    steps_per_epoch = rows // config.num_workers // config.batch_size
    if steps_per_epoch == 0:
        raise SpecError(
            f"feature set {info.name!r} v{info.version} has {rows} train rows: not one full "
            f"batch of {config.batch_size} per worker for {config.num_workers} workers "
            "(lower batch_size or num_workers)"
        )
    val_rows = count_rows(store, info, "val", include_views=False) if config.val_max_rows else 0
    datasets = {"train": split_dataset(store, info, config, "train", views=config.include_views)}
    if val_rows:
        datasets["val"] = split_dataset(store, info, config, "val", views=False)

    loop_info = {
        "store": store.uri,
        "feature_set": info.name,
        "version": info.version,
        "shapes": {c: info.shape(c) for c in columns},
        "signature": info.signature(columns),
        "encoders": info.encoders,
        "steps_per_epoch": steps_per_epoch,
        "train_rows": rows,
        "has_val": bool(val_rows),
        "config_hash": config.config_hash(),
    }
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.public_dict(), "info": loop_info},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    return trainer.fit()
