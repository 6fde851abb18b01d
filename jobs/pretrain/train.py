"""The pretraining job: ``train_loop_per_worker`` (runs in each Ray Train worker) and
``run_training`` (the driver: pins the feature set, checks a resumed checkpoint, starts
a Ray Train V2 ``TorchTrainer``).

Determinism: Ray Data runs with ``preserve_order`` (so each worker's shard is the same
rows in the same block order every epoch) and each worker shuffles locally with the
seed ``seed + epoch``; later epochs permute the first epoch's rows with that seed where
they are kept in memory (``jobs.pretrain.batches``). A resumed run replays the epoch it
stopped in and skips the batches it already trained on, so it matches an uninterrupted
run up to float noise.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from features.duplicates import excluded_ids
from features.storage import filesystem_for, is_local, join_uri
from features.store import FeatureStore
from jobs.pretrain import checkpoint as ckpt
from jobs.pretrain.batches import EpochBatches
from jobs.pretrain.config import TrainConfig
from jobs.pretrain.data import (
    FeatureSetInfo,
    check_compatible,
    check_towers,
    count_rows,
    feature_set_info,
    split_dataset,
    with_recorded_vocabulary,
)
from jobs.pretrain.metrics import embed, pair_recalls
from jobs.pretrain.model import export_towers
from jobs.pretrain.selection import SELECTED, Selection
from jobs.pretrain.step import Stepper
from pipelines.errors import SpecError

if TYPE_CHECKING:
    from ray.train import Result

# Ray Train's controller takes a worker's reports every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
# (2 s by default) and a worker's queue holds one, so each report after the first waited
# up to 2 s: 20 s of a 10-epoch demo run that computes for 1 s. A user's setting wins.
CONTROLLER_POLL_ENV, CONTROLLER_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"

# ---- worker side ------------------------------------------------------------------


class _Worker(Stepper):
    """Everything one Ray Train worker holds across steps; methods are the loop's parts."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        cfg = TrainConfig.model_validate(loop_config["config"])
        self.info: dict[str, Any] = loop_config["info"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.spe: int = self.info["steps_per_epoch"]
        super().__init__(
            cfg,
            self.info["shapes"],
            total_steps=cfg.epochs * self.spe,
            device=ray.train.torch.get_device(),
            wrap=ray.train.torch.prepare_model,
            rank=self.rank,
        )
        self.history: list[dict[str, Any]] = []
        self.resumed_from: int | None = None
        self.val_cache: dict[str, np.ndarray] | None = None
        self.selection = Selection(cfg.select) if cfg.select else None

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
        if self.selection is not None and state.get("selection"):
            self.selection.load(state["selection"])
        self.resumed_from = self.step

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
        recalls = pair_recalls(feats, present, self.cfg.modality_pairs, labels=data.get("label"))
        return {f"val/{k}": v for k, v in recalls.items() if not k.endswith("/n")}

    def select(self, metrics: dict[str, Any]) -> tuple[bool, bool]:
        """(is this the best checkpoint so far, should every worker stop now), the same
        answer on every rank: rank 0 validated and decides."""
        if self.selection is None:
            return False, False
        best = self.rank == 0 and self.selection.update(metrics, self.step)
        stop = self.rank == 0 and self.selection.should_stop
        if self.world > 1:
            import torch.distributed as dist

            flags = torch.tensor([int(best), int(stop)], device=self.device)
            dist.broadcast(flags, src=0)
            best, stop = bool(flags[0]), bool(flags[1])
        return best, stop

    def validated_report(self, metrics: dict[str, Any], *, final: bool) -> bool:
        """Validate, select, report with a checkpoint (towers exported when it is the best
        so far or the last); True when training should stop early."""
        metrics = {**metrics, **self.validate()}
        best, stop = self.select(metrics)
        if self.selection is not None:
            # Ray Train keeps checkpoints by this score: the latest best (a gain beyond
            # min_delta) ranks first, one without a gain last
            metrics = {**metrics, SELECTED: self.step if best else -1}
            if self.rank == 0:
                metrics = {**metrics, **self.selection.summary(), "stopped_early": stop}
        self.history.append(metrics)
        self.report(metrics, export=best or final or stop)
        return stop

    def state(self) -> dict[str, Any]:
        meta = {**self.info, "config": self.cfg.public_dict(), "world_size": self.world}
        return {
            **self.state_dicts(),
            "step": self.step,
            "running": dict(self.running),
            "history": list(self.history),
            "selection": self.selection.state() if self.selection else None,
            "meta": meta,
        }

    def report(self, metrics: dict[str, Any], *, export: bool = False) -> None:
        """Report on every rank (it is a barrier); rank 0 attaches the checkpoint, with the
        towers exported for use outside training when ``export``."""
        import ray.train

        if self.selection is not None:  # Ray keeps checkpoints by it: one without is unranked
            metrics = {SELECTED: -1, **metrics}
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp)
            state = self.state()
            ckpt.save_checkpoint(directory, state)
            if export:
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
    if w.selection is not None and w.selection.should_stop:
        return  # a rerun of a run that stopped early: its checkpoint says so on every rank
    cfg, spe = w.cfg, w.spe
    batches = EpochBatches(ray.train.get_dataset_shard("train"), cfg)
    start_epoch, skip = divmod(w.step, spe)
    for epoch in range(start_epoch, cfg.epochs):
        started, seen = time.perf_counter(), 0
        compute = 0.0  # seconds inside train_step: the rest of the epoch is ingest and reports
        for index, batch in enumerate(batches.epoch(epoch)):
            seen = index + 1
            if index < skip or index >= spe:
                # < skip: trained on before the restart (same batch, same order).
                # >= spe: cannot happen with equal splits; training on it alone would hang
                # the other workers in all_gather, so it is counted and refused below.
                continue
            tick = time.perf_counter()
            w.train_step(batch)
            compute += time.perf_counter() - tick
            if seen >= spe:
                continue  # the epoch's last step reports (and checkpoints) below
            progress = {"epoch": round(epoch + seen / spe, 4), "step": w.step, **w.running_means()}
            if cfg.val_every_steps and w.step % cfg.val_every_steps == 0:
                if w.validated_report(progress, final=False):
                    return  # stopped early: every worker got the same answer
            elif cfg.checkpoint_every_steps and w.step % cfg.checkpoint_every_steps == 0:
                w.report(progress)
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
            "step_time_s": compute,
            "resumed_from_step": w.resumed_from,
            **{f"train_{k}": v for k, v in w.running_means().items()},
        }
        w.running = {}
        stop = w.validated_report(metrics, final=epoch + 1 == cfg.epochs)
        w.resumed_from = None
        if stop:
            return
        w.maybe_fail()


# ---- driver side ------------------------------------------------------------------


def pinned_duplicates(
    store: FeatureStore, config: TrainConfig, previous: dict[str, Any] | None
) -> int | None:
    """The ``duplicates`` version a run leaves marked samples out by: the one it started
    with (a resumed run keeps it, so a newer ``mmfp dedup`` does not change its epochs),
    else the latest; None without ``exclude_duplicates`` or any search."""
    if not config.exclude_duplicates:
        return None
    if previous is not None and previous.get("duplicates_version") is not None:
        return previous["duplicates_version"]
    return store.version("duplicates") if store.exists("duplicates") else None


def run_meta(
    store: FeatureStore,
    info: FeatureSetInfo,
    config: TrainConfig,
    *,
    steps_per_epoch: int,
    train_rows: int,
    has_val: bool,
) -> dict[str, Any]:
    """What every checkpoint of a run records about its data (``state["meta"]``)."""
    columns = sorted({t.input for t in config.modalities.values()})
    return {
        "store": store.uri,
        "feature_set": info.name,
        "version": info.version,
        "shapes": {c: info.shape(c) for c in columns},
        "signature": info.signature(columns),
        "encoders": info.encoders(),
        "steps_per_epoch": steps_per_epoch,
        "train_rows": train_rows,
        "has_val": has_val,
        "config_hash": config.config_hash(),
        "config": config.public_dict(),
    }


def run_training(
    config: TrainConfig,
    *,
    train_loop: Callable[[dict[str, Any]], None] | None = None,
    callbacks: list[Any] | None = None,
) -> Result:
    """Train ``config`` with Ray Train and return its ``ray.train.Result``.

    A rerun with the same ``name`` and ``storage_path`` resumes the latest
    checkpoint (Ray Train V2 restores the run's snapshot); it is refused with a
    ``SpecError`` when the feature set's dimensions or encoders changed since.
    ``train_loop`` replaces ``train_loop_per_worker`` with the same data and
    trainer wiring (the ingest benchmark uses it); it gets ``{"config", "info"}``.
    ``callbacks`` go to the run config (``mmfp tune`` passes Tune's report callback).
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
    config = with_recorded_vocabulary(info, config)
    columns = sorted({t.input for t in config.modalities.values()})
    if previous is not None:
        check_compatible(previous, info, columns)

    duplicates = pinned_duplicates(store, config, previous)
    exclude = excluded_ids(store, None, duplicates) if config.exclude_duplicates else None
    rows = count_rows(store, info, "train", include_views=config.include_views, exclude=exclude)
    steps_per_epoch = rows // config.num_workers // config.batch_size
    if steps_per_epoch == 0:
        raise SpecError(
            f"feature set {info.name!r} v{info.version} has {rows} train rows: not one full "
            f"batch of {config.batch_size} per worker for {config.num_workers} workers "
            "(lower batch_size or num_workers)"
        )
    if config.loss.supervised_weight > 0 and not count_rows(
        store, info, "train", include_views=config.include_views, labelled=True, exclude=exclude
    ):
        raise SpecError(
            f"loss.supervised_weight: feature set {info.name!r} v{info.version} has no "
            "labelled train rows; label the samples (the spec's `label` section) or set it to 0"
        )
    val_rows = (
        count_rows(store, info, "val", include_views=False, exclude=exclude)
        if config.val_max_rows
        else 0
    )
    supervised = config.loss.supervised_weight > 0
    datasets = {
        "train": split_dataset(
            store,
            info,
            config,
            "train",
            views=config.include_views,
            labels=supervised,
            exclude=exclude,
        )
    }
    if val_rows:
        datasets["val"] = split_dataset(
            store, info, config, "val", views=False, labels=True, exclude=exclude
        )
    elif config.select:
        raise SpecError(
            f"select: feature set {info.name!r} v{info.version} has no val rows to select by "
            "(the spec's split ratios give val nothing)"
        )
    if (
        config.select
        and "class_r@" in config.select.metric
        and not count_rows(store, info, "val", include_views=False, labelled=True)
    ):
        raise SpecError(
            f"select.metric {config.select.metric!r} compares labels, and feature set "
            f"{info.name!r} v{info.version} has no labelled val rows; label the samples or "
            "select by an instance metric such as val/mean_r@1"
        )

    loop_info = run_meta(
        store,
        info,
        config,
        steps_per_epoch=steps_per_epoch,
        train_rows=rows,
        has_val=bool(val_rows),
    )
    loop_info["duplicates_version"] = duplicates
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop or train_loop_per_worker,
        train_loop_config={"config": config.public_dict(), "info": loop_info},
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                # with `select`, the best checkpoints so far are the ones kept
                checkpoint_score_attribute=SELECTED if config.select else None,
            ),
        ),
        datasets=datasets,
        dataset_config=DataConfig(
            datasets_to_split=["train"], execution_options=ExecutionOptions(preserve_order=True)
        ),
    )
    with _env_default(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S):  # read when fit() starts
        return trainer.fit()


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """``name=value`` in this process's environment for the block, unless already set."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
