"""Training ingest: steps/s with batches streamed from the store vs the same batches in memory.

One Ray Train run, one worker, the trainer's own data wiring (``run_training`` with
a benchmark loop): every epoch first trains on the batches the job trains on
(``jobs.pretrain.batches.EpochBatches``: the first epoch streamed from the Delta table
through Ray Data (read, flat lists -> dense arrays, streaming split, seeded local
shuffle, prefetch), later ones drawn from the rows it kept when they fit ``--cache-mb``,
else streamed again), then runs the same number of steps of the same
``Stepper.train_step`` over batches held in memory (those of the first epoch).
Alternating in one process keeps both sides under the same load, threads and CPU
budget: on a shared or noisy machine this is what makes the ratio mean something.

Target (issue 13): store / memory >= 0.95 over several epochs, i.e. ingest hidden behind
compute. The last lines print it over the epochs after the first, and over all of them.

    python benchmarks/train_ingest.py [--rows 20000] [--dim 512] [--batch-size 256]
                                      [--cache-mb 1024]  # 0: stream every epoch
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

MODS = ("text", "image", "audio")


def bench_loop(loop_config: dict[str, Any]) -> list[dict[str, float]]:
    """Per epoch: one pass over the store shard, then as many steps over cached batches."""
    import ray.train
    import ray.train.torch

    from jobs.pretrain.batches import EpochBatches
    from jobs.pretrain.config import TrainConfig
    from jobs.pretrain.step import Stepper

    cfg = TrainConfig.model_validate(loop_config["config"])
    info = loop_config["info"]
    stepper = Stepper(
        cfg,
        info["shapes"],
        total_steps=2 * cfg.epochs * info["steps_per_epoch"],
        device=ray.train.torch.get_device(),
        wrap=ray.train.torch.prepare_model,
    )
    batches = EpochBatches(ray.train.get_dataset_shard("train"), cfg)  # as the job reads
    cached: list[dict] = []
    epochs = []
    for epoch in range(cfg.epochs):
        start, steps, compute, first = time.perf_counter(), 0, 0.0, 0.0
        for batch in batches.epoch(epoch):
            tick = time.perf_counter()
            first = first or tick - start
            stepper.train_step(batch)
            compute += time.perf_counter() - tick
            steps += 1
            if epoch == 0:
                cached.append(batch)
        store_s = time.perf_counter() - start
        start = time.perf_counter()
        for batch in cached[:steps]:
            stepper.train_step(batch)
        memory_s = time.perf_counter() - start
        epochs.append(
            {
                "steps": steps,
                "store_s": store_s,
                "first_batch_s": first,
                "compute_s": compute,
                "memory_s": memory_s,
                "kept": batches.kept is not None,
            }
        )
    return epochs  # Result.return_value (V2 keeps metrics only when reported with a checkpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="samples in the feature set")
    parser.add_argument("--dim", type=int, default=512, help="embedding dim of each modality")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024, help="projection towers' hidden size")
    parser.add_argument("--epochs", type=int, default=5, help="the first one is warm-up")
    parser.add_argument("--cpus-per-worker", type=float, default=None)
    parser.add_argument("--shuffle-buffer", type=int, default=1024, help="rows; 0: no shuffle")
    parser.add_argument("--prefetch-batches", type=int, default=2)
    parser.add_argument("--cache-mb", type=int, default=1024, help="the job's cache_mb")
    args = parser.parse_args()

    from benchmarks._common import local_ray
    from features.store import FeatureStore
    from jobs.demo.synthetic_features import write_synthetic_feature_set
    from jobs.pretrain.config import parse_config
    from jobs.pretrain.train import run_training

    cores = os.cpu_count() or 2
    cpus = args.cpus_per_worker or max(1.0, cores - 1.0)  # the rest reads and converts batches
    with local_ray(cores):  # a private local Ray, as every benchmark starts it
        store = FeatureStore(os.path.join(tempfile.mkdtemp(prefix="mmfp-train-ingest-"), "store"))
        classes = 100
        version = write_synthetic_feature_set(
            store,
            "bench",
            classes=classes,
            per_class=max(1, args.rows // classes),
            dims=dict.fromkeys(MODS, args.dim),
            splits=(1.0, 0.0, 0.0),
            files=max(4, cores * 2),
        )
        config = parse_config(
            {
                "name": "ingest",
                "store": store.uri,
                "feature_set": "bench",
                "version": version,
                "modalities": {
                    m: {
                        "kind": "projection",
                        "input": f"{m}_emb",
                        "hidden": args.hidden,
                        "out_dim": 256,
                    }
                    for m in MODS
                },
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "num_workers": 1,
                "cpus_per_worker": cpus,
                "val_max_rows": 0,
                "shuffle_buffer": args.shuffle_buffer,
                "prefetch_batches": args.prefetch_batches,
                "cache_mb": args.cache_mb,
            }
        )
        started = time.perf_counter()
        result = run_training(config, train_loop=bench_loop)
        wall = time.perf_counter() - started

    epochs = result.return_value
    warm = epochs[1:] or epochs

    def rates(part: list[dict[str, float]]) -> tuple[float, float]:
        steps = sum(e["steps"] for e in part)
        return steps / sum(e["store_s"] for e in part), steps / sum(e["memory_s"] for e in part)

    store_rate, memory_rate = rates(warm)
    store_all, memory_all = rates(epochs)
    kept = "kept in memory after the first epoch" if epochs[-1]["kept"] else "streamed every epoch"
    print(
        f"machine: {cores} cores; 1 Ray Train worker x {cpus:g} CPU; "
        f"{epochs[0]['steps'] * args.batch_size} rows/epoch, batch {args.batch_size}, "
        f"3 x {args.dim}-d embeddings, projection towers hidden {args.hidden}, "
        f"shuffle buffer {args.shuffle_buffer}, prefetch {args.prefetch_batches}; the shard "
        f"was {kept} (cache_mb {args.cache_mb})"
    )
    first = epochs[0]
    print(
        f"run wall time incl. Ray Train start-up: {wall:.1f} s; first epoch "
        f"{first['store_s']:.2f} s from the store, memory {first['memory_s']:.2f} s"
    )
    for i, e in enumerate(warm, start=2):
        print(f"  epoch {i}: store {e['store_s']:.2f} s ({e['compute_s']:.2f} s in steps, first "
              f"batch after {e['first_batch_s']:.2f} s), "
              f"memory {e['memory_s']:.2f} s, {e['steps']} steps each")  # fmt: skip
    print(f"store  (the job's batches): {store_rate:7.2f} steps/s after the first epoch")
    print(f"memory (same steps, same batches): {memory_rate:7.2f} steps/s")
    print(f"ratio store / memory, all {len(epochs)} epochs: {store_all / memory_all:.3f}")
    print(
        f"ratio store / memory after the first epoch: {store_rate / memory_rate:.3f}  "
        "(target >= 0.95)"
    )


if __name__ == "__main__":
    main()
