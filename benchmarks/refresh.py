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
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import local_ray, make_spec  # noqa: E402
from features.store import FeatureStore  # noqa: E402
from jobs.demo import corpus  # noqa: E402
from pipelines.build import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--new-fraction", type=float, default=0.01)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    per_class = max(1, args.samples // len(corpus.CLASSES))
    new_per_class = max(1, round(per_class * args.new_fraction))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus.write_directory_source(root / "data" / "base", n_per_class=per_class, seed=1)
        spec = make_spec(root / "data", root / "store")
        with local_ray(args.cores):
            build(make_spec(*warm_corpus(root)))  # start workers and pay imports, elsewhere
            start = time.perf_counter()
            full = build(spec)
            full_s = time.perf_counter() - start

            corpus.write_directory_source(root / "data" / "new", n_per_class=new_per_class, seed=2)
            start = time.perf_counter()
            fresh = build(spec, kind="refresh", incremental=True)
            refresh_s = time.perf_counter() - start

            start = time.perf_counter()
            again = build(spec, kind="refresh", incremental=True)
            noop_s = time.perf_counter() - start
        check(FeatureStore(spec.store.uri), full.counts["samples"] + fresh.counts["samples"])
        assert fresh.skipped_inputs == full.inputs
        assert not again.changed
    print(f"machine: {args.cores} cores; corpus: {full.inputs} samples (JPEG + WAV + caption)")
    print(f"full build:                 {full_s:7.2f} s  ({full.inputs / full_s:7.1f} samples/s)")
    print(
        f"refresh (+{fresh.inputs} new, {fresh.skipped_inputs} skipped): {refresh_s:7.2f} s"
        f"   ratio refresh / full = {refresh_s / full_s:.3f}  (target <= 0.05)"
    )
    print(f"refresh with nothing new:   {noop_s:7.2f} s   ratio = {noop_s / full_s:.3f}")


def check(store: FeatureStore, expected: int) -> None:
    """Every sample once, and as many as the build and the refresh wrote."""
    ids = store.to_arrow("samples", columns=["sample_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids)) == expected


def warm_corpus(root: Path) -> tuple[Path, Path]:
    """A tiny corpus and store of their own: Ray workers start and import before timing."""
    warm = root / "warm"
    corpus.write_directory_source(warm / "data", n_per_class=1, seed=9)
    return warm / "data", warm / "store"


if __name__ == "__main__":
    main()
