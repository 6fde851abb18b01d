"""Training ingest: steps/s with batches streamed from the store vs held in memory.

Both sides run the same ``Stepper.train_step`` (model, loss, AdamW, clipping) with
the same CPU budget (``--cpus-per-worker``, in a Ray process, so the same thread
settings), in one run on one machine:

- **store**: ``run_training`` with one Ray Train worker; batches come from the
  Delta table through Ray Data (read, flat-list -> dense, streaming split, local
  shuffle, prefetch). Steps/s from the warm epochs' ``epoch_time_s``, which counts
  the pipeline's per-epoch start-up but not validation or checkpointing.
- **memory**: a Ray actor with the same CPUs builds the same batches once, then
  times the same number of steps over them.

Target (DESIGN.md section 7): ratio >= 0.9, i.e. ingest hidden behind compute.

    python benchmarks/train_ingest.py [--rows 20000] [--dim 512] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def _memory_steps_per_s(config: dict, shapes: dict, steps: int, warm: int) -> float:
    """Build the train batches in memory, then time ``steps`` of the same train step."""
    import torch

    from features.store import FeatureStore
    from jobs.pretrain.arrays import to_tensors
    from jobs.pretrain.config import TrainConfig
    from jobs.pretrain.data import feature_set_info, tower_inputs
    from jobs.pretrain.step import Stepper

    cfg = TrainConfig.model_validate(config)
    store = FeatureStore(cfg.store)
    info = feature_set_info(store, cfg.feature_set, cfg.version)
    table = store.to_arrow(info.table, info.version)
    arrays = to_tensors(table, inputs=tower_inputs(info, cfg), split="train", include_views=False)
    rows = len(next(iter(arrays.values())))
    n = rows // cfg.batch_size
    batches = [
        {
            k: torch.as_tensor(v[i * cfg.batch_size : (i + 1) * cfg.batch_size])
            for k, v in arrays.items()
        }
        for i in range(n)
    ]
    stepper = Stepper(cfg, shapes, total_steps=warm + steps, device=torch.device("cpu"))
    for i in range(warm):
        stepper.train_step(batches[i % n])
    start = time.perf_counter()
    for i in range(steps):
        stepper.train_step(batches[i % n])
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="samples in the feature set")
    parser.add_argument("--dim", type=int, default=512, help="embedding dim of each modality")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024, help="projection towers' hidden size")
    parser.add_argument("--epochs", type=int, default=4, help="first epoch is warm-up")
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    args = parser.parse_args()

    import ray

    from features.store import FeatureStore
    from jobs.pretrain.config import parse_config
    from jobs.pretrain.synthetic import write_synthetic_feature_set
    from jobs.pretrain.train import run_training
    from jobs.runtime import init_ray

    cores = os.cpu_count() or 2
    cpus = args.cpus_per_worker or max(1.0, cores - 1.0)  # the rest reads and converts batches
    init_ray(None, num_cpus=cores)
    workdir = tempfile.mkdtemp(prefix="mmfp-train-ingest-")
    store = FeatureStore(os.path.join(workdir, "store"))
    classes = 100
    version = write_synthetic_feature_set(
        store,
        "bench",
        classes=classes,
        per_class=max(1, args.rows // classes),
        dims={m: args.dim for m in ("text", "image", "audio")},
        splits=(1.0, 0.0, 0.0),
        files=max(4, cores * 2),
    )
    raw = {
        "name": "ingest",
        "store": store.uri,
        "feature_set": "bench",
        "version": version,
        "modalities": {
            m: {"kind": "projection", "input": f"{m}_emb", "hidden": args.hidden, "out_dim": 256}
            for m in ("text", "image", "audio")
        },
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "num_workers": 1,
        "cpus_per_worker": cpus,
        "val_max_rows": 0,
        "keep_checkpoints": 1,
    }
    config = parse_config(raw)
    started = time.perf_counter()
    result = run_training(config)
    wall = time.perf_counter() - started
    from jobs.pretrain import checkpoint as ckpt

    history = ckpt.read_metrics(result.checkpoint.path)
    spe = ckpt.read_meta(result.checkpoint.path)["steps_per_epoch"]
    warm_epochs = history[1:] or history
    store_rate = spe * len(warm_epochs) / sum(row["epoch_time_s"] for row in warm_epochs)

    shapes = {f"{m}_emb": [args.dim] for m in ("text", "image", "audio")}
    remote = ray.remote(num_cpus=cpus)(_memory_steps_per_s)
    steps = spe * len(warm_epochs)
    memory_rate = ray.get(
        remote.remote(config.model_dump(mode="json"), shapes, steps, min(spe, 20))
    )

    rows = spe * args.batch_size
    print(
        f"machine: {cores} cores; trainer: 1 worker x {cpus:g} CPU; {rows} rows/epoch, batch "
        f"{args.batch_size}, 3 x {args.dim}-d embeddings, towers hidden {args.hidden}"
    )
    print(
        f"first epoch (pipeline + worker start-up): {history[0]['epoch_time_s']:.2f} s; "
        f"whole run incl. Ray Train start-up: {wall:.1f} s"
    )
    epoch_times = ", ".join(
        f"{row['epoch_time_s']:.2f} ({row['step_time_s']:.2f} in steps)" for row in warm_epochs
    )
    print(
        f"store  (Ray Data -> Ray Train): {store_rate:7.2f} steps/s  (warm epochs: {epoch_times} s)"
    )
    print(f"memory (same step, same CPUs):  {memory_rate:7.2f} steps/s")
    print(f"ratio store / memory: {store_rate / memory_rate:.3f}  (target >= 0.9)")
    print(f"rows/s from the store: {store_rate * args.batch_size:,.0f}")


if __name__ == "__main__":
    main()
