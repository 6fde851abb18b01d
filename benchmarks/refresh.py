"""Refresh cost: a refresh that adds 1% new data vs the full build of the same store.

    python benchmarks/refresh.py [--samples 5000] [--new-fraction 0.01] [--cores 2]

Builds a class-folder directory corpus (JPEG + WAV + caption per sample) into a
fresh store with `mmfp build` semantics, adds `new-fraction` more samples, and
times `mmfp refresh` semantics (fingerprint listing, only new inputs read), in one
run on one machine. Prints the ratio refresh / full build (target <= 0.05) and
checks the store afterwards.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray

from features.store import FeatureStore
from pipelines import synthetic
from pipelines.build import build
from pipelines.spec import parse_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--new-fraction", type=float, default=0.01)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    per_class = max(1, args.samples // len(synthetic.CLASSES))
    new_per_class = max(1, round(per_class * args.new_fraction))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthetic.write_directory_source(root / "data" / "base", n_per_class=per_class, seed=1)
        spec = parse_spec(
            {
                "sources": [
                    {"kind": "directory", "uri": str(root / "data"), "class_folders": True}
                ],
                "store": {"uri": str(root / "store")},
            }
        ).resolved(root)
        ray.init(address="local", num_cpus=args.cores, include_dashboard=False, log_to_driver=False)
        build(make_warm_spec(root, spec))  # start workers and pay imports once, elsewhere

        start = time.perf_counter()
        full = build(spec)
        full_s = time.perf_counter() - start

        synthetic.write_directory_source(root / "data" / "new", n_per_class=new_per_class, seed=2)
        start = time.perf_counter()
        fresh = build(spec, kind="refresh", incremental=True)
        refresh_s = time.perf_counter() - start

        start = time.perf_counter()
        again = build(spec, kind="refresh", incremental=True)
        noop_s = time.perf_counter() - start

        store = FeatureStore(str(root / "store"))
        ids = store.to_arrow("samples", columns=["sample_id"]).column(0).to_pylist()
        assert len(ids) == len(set(ids)) == full.counts["samples"] + fresh.counts["samples"]
        assert fresh.skipped_inputs == full.inputs
        assert not again.changed
        ray.shutdown()
    print(f"machine: {args.cores} cores; corpus: {full.inputs} samples (JPEG + WAV + caption)")
    print(f"full build:                 {full_s:7.2f} s  ({full.inputs / full_s:7.1f} samples/s)")
    print(
        f"refresh (+{fresh.inputs} new, {fresh.skipped_inputs} skipped): {refresh_s:7.2f} s"
        f"   ratio refresh / full = {refresh_s / full_s:.3f}  (target <= 0.05)"
    )
    print(f"refresh with nothing new:   {noop_s:7.2f} s   ratio = {noop_s / full_s:.3f}")


def make_warm_spec(root: Path, spec):
    """A tiny build into another store: Ray workers start and import before timing."""
    warm = root / "warm"
    synthetic.write_directory_source(warm / "data", n_per_class=1, seed=9)
    return spec.model_copy(
        update={
            "sources": [spec.sources[0].model_copy(update={"uri": str(warm / "data")})],
            "store": spec.store.model_copy(update={"uri": str(warm / "store")}),
        }
    )


if __name__ == "__main__":
    main()
