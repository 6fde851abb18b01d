"""Collect benchmark (issue 3): ``pipelines.build.build`` against ideal and peer (DESIGN §7).

    python benchmarks/collect.py [--samples N] [--cores C] [--image-size PX]

One run, one machine, three measurements of the same work on the same corpus:

- **ideal**: the stage functions in a plain single-process loop (``list_directory`` ->
  ``RefReader`` over batches of refs -> ``split_batch``), throughput times ``--cores``;
- **pipeline**: ``build(spec)`` on a private local Ray, end to end (listing, Ray Data plan,
  dedup actor, Parquet writes, Delta commits, ``_runs`` row), cold (first build) and warm
  (same Ray session, a new empty store);
- **peer**: Hugging Face ``datasets`` ``map(batched=True, num_proc=cores)`` over the same refs
  with the same functions, written to Parquet (skipped when ``datasets`` is not installed).

Ratios are pipeline (or peer) throughput / ideal throughput; the target is >= 0.85.
Nothing touches the network; the corpus and the stores live in a temporary directory.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import soundfile as sf  # noqa: E402

from pipelines import synthetic  # noqa: E402
from pipelines.collect import REFS, RefReader, list_directory  # noqa: E402
from pipelines.spec import PipelineSpec, parse_spec  # noqa: E402
from pipelines.split import split_batch  # noqa: E402

TARGET = 0.85


# ---- corpus -------------------------------------------------------------------


def write_corpus(root: Path, *, samples: int, image_size: int, seed: int = 0) -> int:
    """``root/<class>/<stem>.jpg|.wav|.txt`` with ``image_size`` px images; returns the count.

    The same layout and generators as ``synthetic.write_directory_source`` (which only
    writes 64x64 images), every sample complete (all three modalities).
    """
    classes = synthetic.CLASSES
    per_class = math.ceil(samples / len(classes))
    written = 0
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            i = k * per_class + j
            if written == samples:
                return written
            rng = np.random.default_rng([seed, 11, i])
            img = synthetic.make_image(rng, k, image_size)
            audio = synthetic.make_audio(rng, k)
            text = synthetic.make_caption(rng, k)
            ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            if not ok:
                raise RuntimeError("OpenCV could not encode a JPEG")
            (folder / f"d{i:05d}.jpg").write_bytes(jpg.tobytes())
            sf.write(folder / f"d{i:05d}.wav", audio, synthetic.SAMPLE_RATE, subtype="PCM_16")
            (folder / f"d{i:05d}.txt").write_text(text, encoding="utf-8")
            written += 1
    return written


def make_spec(source: Path, store: Path) -> PipelineSpec:
    raw = {
        "name": "bench-collect",
        "sources": [{"kind": "directory", "uri": str(source), "class_folders": True}],
        "store": {"uri": str(store)},
    }
    return parse_spec(raw, origin="benchmarks/collect.py").resolved(store.parent)


# ---- ideal: the stage functions in one process ----------------------------------


def collect_stages(refs: pa.Table, spec: PipelineSpec, reader: RefReader) -> pa.Table:
    """RefReader then split_batch on one batch of refs: the per-batch work of a build."""
    rows = reader(refs)
    return split_batch(rows, seed=spec.split.seed, ratios=spec.split.ratios, by=spec.split.by)


def make_reader(spec: PipelineSpec) -> RefReader:
    return RefReader({s.source_name: (s.uri, s.storage_options) for s in spec.sources}, spec.decode)


def run_ideal(spec: PipelineSpec) -> tuple[float, int, float]:
    """Seconds for listing + read/decode/hash + split of every sample; rows; listing seconds."""
    reader = make_reader(spec)
    batch = spec.resources.batch_size
    source = spec.sources[0]
    # Warm-up outside the clock: imports (cv2, soundfile, PIL) and first-call costs.
    collect_stages(list_directory(source).slice(0, 4), spec, reader)
    start = time.perf_counter()
    refs = list_directory(source)
    listed = time.perf_counter() - start
    rows = 0
    for offset in range(0, refs.num_rows, batch):
        rows += collect_stages(refs.slice(offset, batch), spec, reader).num_rows
    return time.perf_counter() - start, rows, listed


def time_parquet_write(spec: PipelineSpec, out: Path) -> float:
    """Single-process cost of writing the collected rows as zstd Parquet (for reference)."""
    reader = make_reader(spec)
    table = collect_stages(list_directory(spec.sources[0]), spec, reader)
    start = time.perf_counter()
    pq.write_table(table, out, compression="zstd")
    return time.perf_counter() - start


# ---- pipeline: build(spec) on a local Ray ---------------------------------------


@dataclass
class BuildRun:
    label: str
    seconds: float
    samples: int
    stored_rows: int
    counts: dict[str, int]


def run_build(spec: PipelineSpec, label: str) -> BuildRun:
    from features.store import FeatureStore
    from pipelines.build import build

    start = time.perf_counter()
    result = build(spec)
    seconds = time.perf_counter() - start
    store = FeatureStore(spec.store.uri)
    stored = store.to_arrow("samples", columns=["sample_id"]).num_rows
    return BuildRun(label, seconds, result.counts["samples"], stored, dict(result.counts))


# ---- peer: Hugging Face datasets ------------------------------------------------


class PeerMap:
    """The same functions as a ``datasets`` batched map over Arrow batches (picklable)."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.reader = make_reader(spec)

    def __call__(self, batch: pa.Table) -> pa.Table:
        refs = batch.cast(REFS)  # datasets hands batches over with its own (same) types
        return collect_stages(refs, self.spec, self.reader)


def run_peer(spec: PipelineSpec, cores: int, workdir: Path) -> tuple[float | None, int, str]:
    """Seconds for listing + ``map(num_proc=cores)`` + ``to_parquet``; rows; note."""
    try:
        import datasets
    except ImportError as e:
        return None, 0, f"skipped: `datasets` is not importable ({e}); pip install datasets"
    from datasets.table import InMemoryTable

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    cache = workdir / "hf-cache"
    cache.mkdir()
    os.environ["HF_DATASETS_CACHE"] = str(cache)
    out = workdir / "peer.parquet"
    start = time.perf_counter()
    refs = list_directory(spec.sources[0])
    ds = datasets.Dataset(InMemoryTable(refs)).with_format("arrow")
    mapped = ds.map(
        PeerMap(spec),
        batched=True,
        batch_size=spec.resources.batch_size,
        num_proc=cores,
        remove_columns=ds.column_names,
        cache_file_name=str(cache / "mapped.arrow"),
    )
    mapped.to_parquet(str(out))
    seconds = time.perf_counter() - start
    rows = pq.ParquetFile(out).metadata.num_rows
    return seconds, rows, f"datasets {datasets.__version__}"


# ---- report ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="corpus size (default 2000)")
    parser.add_argument(
        "--cores", type=int, default=os.cpu_count() or 1, help="CPUs for Ray, peer and ideal"
    )
    parser.add_argument("--image-size", type=int, default=256, help="image side in px")
    parser.add_argument("--warm-runs", type=int, default=2, help="warm builds (best reported)")
    parser.add_argument("--no-peer", action="store_true", help="skip the datasets peer")
    args = parser.parse_args(argv)

    import ray

    with tempfile.TemporaryDirectory(prefix="mmfp-bench-collect-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        n = write_corpus(work / "corpus", samples=args.samples, image_size=args.image_size)
        gen = time.perf_counter() - t0
        print(
            f"corpus: {n} samples (jpg {args.image_size}px + wav 0.5 s + txt), "
            f"10 class folders, written in {gen:.1f} s"
        )

        spec = make_spec(work / "corpus", work / "store-0")
        ideal_s, ideal_rows, listing_s = run_ideal(spec)
        ideal_tp = n / ideal_s
        ideal = ideal_tp * args.cores
        write_s = time_parquet_write(spec, work / "ideal.parquet")
        print(
            f"ideal: 1 process {ideal_s:.2f} s ({ideal_tp:.0f} samples/s; listing "
            f"{listing_s:.2f} s) x {args.cores} cores = {ideal:.0f} samples/s"
        )
        print(
            f"       (for reference, not in ideal: one zstd Parquet write of all rows "
            f"{write_s:.2f} s)"
        )

        peer_s = None
        if args.no_peer:
            peer_note = "skipped: --no-peer"
        else:
            peer_s, peer_rows, peer_note = run_peer(spec, args.cores, work)
        if peer_s is not None:
            print(
                f"peer:  {peer_note} map(num_proc={args.cores}) + to_parquet "
                f"{peer_s:.2f} s, {peer_rows} rows"
            )
        else:
            print(f"peer:  {peer_note}")

        t0 = time.perf_counter()
        ray.init(
            address="local",
            num_cpus=args.cores,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
        )
        init_s = time.perf_counter() - t0
        try:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
            runs = [run_build(spec, "cold")]
            for i in range(args.warm_runs):
                warm_spec = make_spec(work / "corpus", work / f"store-{i + 1}")
                runs.append(run_build(warm_spec, f"warm{i + 1}"))
        finally:
            ray.shutdown()
        for run in runs:
            print(
                f"build {run.label}: {run.seconds:.2f} s, {run.samples} samples written, "
                f"{run.stored_rows} rows in store, counts {run.counts}"
            )
        print(f"(ray.init: {init_s:.2f} s, not counted)")

    cold = runs[0]
    warm = min(runs[1:], key=lambda r: r.seconds) if len(runs) > 1 else None
    ok = all(r.stored_rows == n and r.samples == n for r in runs) and ideal_rows == n

    def ratio(seconds: float) -> float:
        return (n / seconds) / ideal

    print()
    print("=" * 64)
    print(f"collect benchmark: {n} samples, {args.cores} cores, image {args.image_size}px")
    print("-" * 64)
    print(f"{'':22}{'seconds':>10}{'samples/s':>12}{'ratio':>10}")
    print(f"{'ideal (1 proc x cores)':22}{ideal_s / args.cores:>10.2f}{ideal:>12.0f}{1.0:>10.2f}")
    print(
        f"{'pipeline cold':22}{cold.seconds:>10.2f}{n / cold.seconds:>12.0f}"
        f"{ratio(cold.seconds):>10.2f}"
    )
    if warm is not None:
        print(
            f"{'pipeline warm (best)':22}{warm.seconds:>10.2f}{n / warm.seconds:>12.0f}"
            f"{ratio(warm.seconds):>10.2f}"
        )
        if len(runs) > 2:
            med = statistics.median(r.seconds for r in runs[1:])
            print(f"{'pipeline warm (median)':22}{med:>10.2f}{n / med:>12.0f}{ratio(med):>10.2f}")
    if peer_s is not None:
        print(f"{'peer (datasets)':22}{peer_s:>10.2f}{n / peer_s:>12.0f}{ratio(peer_s):>10.2f}")
    else:
        print(f"{'peer (datasets)':22}{peer_note}")
    print("-" * 64)
    print(
        f"target: ratio >= {TARGET}: cold {'met' if ratio(cold.seconds) >= TARGET else 'NOT met'}"
        + (f", warm {'met' if ratio(warm.seconds) >= TARGET else 'NOT met'}" if warm else "")
    )
    print(f"correctness: rows in store == {n} for every build: {'OK' if ok else 'FAILED'}")
    print("=" * 64)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
