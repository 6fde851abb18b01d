"""Augment benchmark (issue 4): the build's augment stage against ideal (DESIGN §7).

    python benchmarks/augment.py [--samples N] [--cores C] [--image-size PX] [--views V]
                                 [--repeats R] [--batch-size B]

One run, one machine, the same work on the same stored samples:

- **setup** (not timed): a corpus of complete samples (JPEG + 0.5 s WAV + caption) is
  collected into a store by one ``build`` in a Ray session of its own, so the measured
  session starts cold;
- **ideal**: the stage function ``make_views`` in a plain single-process loop over the same
  samples rows (read from the store as Arrow, batches of ``resources.batch_size``),
  throughput times ``--cores``; Parquet writing is not part of the ideal, so the pipeline's
  writes count against it;
- **pipeline**: the build's augment path, ``pipelines.build.augment_samples`` (``read_delta``
  of ``samples`` -> ``map_batches(make_missing_views)`` -> ``StoreSink`` Parquet writes) plus
  the ``views`` and ``quarantine`` commits, on a fresh copy of the samples store each time,
  with Ray Data's per-operator resource reservation off as ``build`` runs its stages.
  Collect is excluded by construction (the samples are already stored), rather than by
  subtracting two builds' times, which on a shared box doubles the noise. Cold is the first
  augment of a fresh Ray session (workers start, import albumentations/librosa, numba JIT);
  warm runs follow in the same session.

Ratios are pipeline throughput / ideal throughput; target >= 0.85. Ideal and warm are the
best of ``--repeats`` (plus the median of warm runs each paired with the ideal run just
before it). Correctness: the views stored equal the ideal's views (keys and media bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from benchmarks._common import (  # noqa: E402
    CpuMeter,
    build_samples,
    checked,
    corpus_args,
    load_average,
    local_ray,
    make_spec,
    print_table,
    write_corpus,
)
from pipelines.spec import PipelineSpec, write_spec  # noqa: E402

COLD_TARGET = 0.80  # issue 13: >= 0.90 warm, >= 0.80 cold at >= 20k samples


@dataclass
class Outcome:
    """Views made from one pass over the samples: good rows, error rows, and their digest."""

    views: int
    errors: int
    digest: str


def digest(views: pa.Table) -> str:
    """Order-free digest of (sample_id, view, media bytes) of the good views."""
    rows = views.select(["sample_id", "view", "image", "audio", "text"]).to_pylist()
    h = hashlib.sha256()
    for row in sorted(rows, key=lambda r: (r["sample_id"], r["view"])):
        for key in ("sample_id", "view", "image", "audio", "text"):
            value = row[key]
            h.update(b"\0" if value is None else value if isinstance(value, bytes) else
                     str(value).encode())  # fmt: skip
    return h.hexdigest()


# ---- ideal: make_views in one process ---------------------------------------------------


@dataclass
class Ideal:
    seconds: float
    cpu_seconds: float  # process CPU time; wall well above CPU means the box was busy
    outcome: Outcome
    first_call: float | None = None  # imports + JIT of the first call in this process


def run_ideal(spec: PipelineSpec, *, warm_up: bool) -> Ideal:
    """Read ``samples`` as Arrow, then ``make_views`` on batches of ``batch_size`` rows."""
    from features.store import FeatureStore
    from pipelines.augment import VIEW_INPUT_COLUMNS, make_views

    assert spec.augment is not None
    store = FeatureStore(spec.store.uri)
    first = None
    if warm_up:  # outside the clock: imports (albumentations, librosa) and numba's JIT
        t0 = time.perf_counter()
        rows = store.to_arrow("samples", columns=list(VIEW_INPUT_COLUMNS)).slice(0, 8)
        make_views(rows, spec=spec.augment, run_id="warm-up")
        first = time.perf_counter() - t0
    cpu, start = time.process_time(), time.perf_counter()
    samples = store.to_arrow("samples", columns=list(VIEW_INPUT_COLUMNS))
    batch = spec.resources.batch_size
    parts = [
        make_views(samples.slice(i, batch), spec=spec.augment, run_id="ideal")
        for i in range(0, samples.num_rows, batch)
    ]
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    views = pa.concat_tables(parts)
    good = views.filter(pc.is_null(views.column("error_type")))
    outcome = Outcome(good.num_rows, views.num_rows - good.num_rows, digest(good))
    return Ideal(seconds, cpu_seconds, outcome, first)


# ---- pipeline: augment_samples on a fresh copy of the store -----------------------------


@dataclass
class PipelineRun:
    label: str
    seconds: float
    cpu_seconds: float  # every process of the run (a local Ray's, or the CLI's and its workers)
    outcome: Outcome
    view_counts: dict[str, int]
    stage_seconds: float | None = None  # the augment stage alone, from the run's `_stages`


def run_pipeline(spec: PipelineSpec, samples_store: Path, label: str) -> PipelineRun:
    """``augment_samples`` + the views/quarantine commits, as ``build`` runs them on Ray."""
    from pipelines.build.on_ray import run_settings
    from pipelines.build.run import Run
    from pipelines.build.views import augment_samples

    store_dir = Path(spec.store.uri)
    shutil.copytree(samples_store, store_dir)  # not timed: a fresh store without views
    # as build() runs its stages: Ray Data's per-operator reservation off
    with CpuMeter() as cpu, run_settings():
        start = time.perf_counter()
        run = Run.start(spec)
        augment_samples(run)
        run.commit("views")
        run.commit("quarantine")
        seconds = time.perf_counter() - start
    outcome = stored_outcome(store_dir)
    return PipelineRun(label, seconds, cpu.seconds, outcome, dict(run.result.view_counts))


def run_cli(spec: PipelineSpec, samples_store: Path, label: str, work: Path) -> PipelineRun:
    """What a user runs after adding ``augment`` to a spec: ``mmfp refresh SPEC`` as a fresh
    process with no cluster, on a fresh copy of the samples store. Nothing is new to
    collect, so the run makes the views the store lacks; its imports, listing and ledger
    diff count, as they do for the user."""
    store_dir = Path(spec.store.uri)
    shutil.copytree(samples_store, store_dir)
    path = work / f"{label}.yaml"
    write_spec(spec, path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"PYTHONPATH": str(ROOT), "MMFP_LOG_DIR": str(work / "logs")}
    with CpuMeter() as cpu:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "jobs", "refresh", str(path)],
            env=env, cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"mmfp refresh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    from features.store import FeatureStore

    stages = FeatureStore(str(store_dir)).to_arrow("_stages").to_pylist()
    augment = sum(s["seconds"] for s in stages if s["stage"] == "augment")
    outcome = stored_outcome(store_dir)
    return PipelineRun(label, seconds, cpu.seconds, outcome, {}, augment)


def stored_outcome(store_dir: Path) -> Outcome:
    """The views a run stored and the inputs augment sent to quarantine."""
    from features.store import FeatureStore

    store = FeatureStore(str(store_dir))
    views = store.to_arrow("views")
    quarantined = 0
    if store.exists("quarantine"):
        stage = store.to_arrow("quarantine", columns=["stage"]).column("stage")
        quarantined = int(pc.sum(pc.equal(stage, "augment").cast(pa.int64())).as_py() or 0)
    return Outcome(views.num_rows, quarantined, digest(views))


# ---- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Augment benchmark: augment_samples vs ideal.")
    cores = "CPUs for Ray and the ideal's multiplier"
    corpus_args(parser, samples=1000, image_size=128, repeats=2, cores=cores)
    parser.add_argument("--views", type=int, default=2, help="views_per_sample (2)")
    parser.add_argument(
        "--skip-ray", action="store_true", help="only the CLI runs, not the runs in a Ray session"
    )
    args = parser.parse_args(argv)
    checked(parser, args, "samples", "cores", "repeats", "views")
    return args


@dataclass
class Measurements:
    cores: int
    ideal: list[Ideal] = field(default_factory=list)  # the first one is paired with cold
    cli: list[PipelineRun] = field(default_factory=list)  # `mmfp refresh`, fresh processes
    runs: list[PipelineRun] = field(default_factory=list)  # in a Ray session, cold first
    load: list[float] = field(default_factory=list)

    def ratio(self, seconds: float, ideal_seconds: float) -> float:
        """Same rows on both sides: (1 / seconds) / (1 / ideal_seconds * cores)."""
        return ideal_seconds / (seconds * self.cores)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resources = {
        k: v
        for k, v in (("batch_size", args.batch_size), ("blocks_per_cpu", args.blocks_per_cpu))
        if v is not None
    }
    augment = {"views_per_sample": args.views, "seed": 7}
    m = Measurements(cores=args.cores, load=[load_average()])
    with tempfile.TemporaryDirectory(prefix="mmfp-bench-augment-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        n = write_corpus(work / "corpus", samples=args.samples, image_size=args.image_size)
        print(
            f"corpus: {n} samples (jpg {args.image_size}px + wav 0.5 s + txt), "
            f"written in {time.perf_counter() - t0:.1f} s (not timed)"
        )
        samples_store = work / "samples-store"
        collect_s, stored = build_samples(
            make_spec(work / "corpus", samples_store, resources=resources), args.cores
        )
        files = len(list((samples_store / "samples").glob("*.parquet")))
        print(
            f"collect: {stored} samples in {files} Parquet files, {collect_s:.1f} s in its own Ray "
            "session (not timed: augment reads the stored samples)"
        )

        def spec_for(name: str) -> PipelineSpec:
            return make_spec(work / "corpus", work / name, augment=augment, resources=resources)

        ideal_spec = make_spec(work / "corpus", samples_store, augment=augment, resources=resources)
        print(
            f"spec: views_per_sample={args.views}, default image/audio/text ops, "
            f"batch_size={ideal_spec.resources.batch_size}, "
            f"blocks_per_cpu={ideal_spec.resources.blocks_per_cpu}; order: ideal, `mmfp "
            "refresh` x repeats, then ray.init, cold, (ideal, warm) x repeats"
        )
        m.ideal.append(run_ideal(ideal_spec, warm_up=True))
        for i in range(args.repeats):
            label = f"cli{i + 1}"
            m.cli.append(run_cli(spec_for(f"store-{label}"), samples_store, label, work))
        if not args.skip_ray:
            with local_ray(args.cores) as init_s:
                print(f"ray.init: {init_s:.2f} s (not counted)")
                m.runs.append(run_pipeline(spec_for("store-cold"), samples_store, "cold"))
                for i in range(args.repeats):
                    m.ideal.append(run_ideal(ideal_spec, warm_up=False))
                    m.runs.append(run_pipeline(spec_for(f"store-warm{i + 1}"), samples_store,
                                               f"warm{i + 1}"))  # fmt: skip
        m.load.append(load_average())
    return 0 if report(m, args, n) else 1


def report(m: Measurements, args: argparse.Namespace, n: int) -> bool:
    first = m.ideal[0]
    for i, ideal in enumerate(m.ideal):
        note = f", first call in the process {first.first_call:.2f} s (not timed)" if i == 0 else ""
        print(
            f"ideal: {ideal.seconds:.2f} s in 1 process (CPU {ideal.cpu_seconds:.2f} s), "
            f"{ideal.outcome.views} views + {ideal.outcome.errors} error rows{note}"
        )
    for run in m.cli:
        print(
            f"`mmfp refresh` {run.label}: {run.seconds:.2f} s (CPU of the CLI process and its "
            f"workers {run.cpu_seconds:.2f} s), augment stage {run.stage_seconds:.2f} s, "
            f"{run.outcome.views} views in store, {run.outcome.errors} quarantined"
        )
    for run in m.runs:
        print(
            f"pipeline {run.label}: {run.seconds:.2f} s (CPU of all Ray processes "
            f"{run.cpu_seconds:.2f} s), counts {run.view_counts}, {run.outcome.views} views "
            f"in store, {run.outcome.errors} quarantined"
        )
    views = first.outcome.views
    ideal = min(i.seconds for i in m.ideal)
    ideal_cpu = min(i.cpu_seconds for i in m.ideal)
    expected = first.outcome
    ok = all(i.outcome == expected for i in m.ideal)
    ok = ok and all(r.outcome == expected for r in m.cli + m.runs)

    def row(name: str, run: PipelineRun) -> tuple[object, ...]:
        busy = run.cpu_seconds / (run.seconds * m.cores)
        return (
            name, run.seconds, views / run.seconds, m.ratio(run.seconds, ideal),
            run.cpu_seconds, ideal_cpu / run.cpu_seconds, busy,
        )  # fmt: skip

    cli = min(m.cli, key=lambda r: r.seconds)
    line = "=" * 88
    print(f"\n{line}")
    print(
        f"augment benchmark: {n} samples -> {views} views ({args.views} per train sample), "
        f"{m.cores} cores, image {args.image_size}px, best of {args.repeats}"
    )
    print(f"load average (1 min) before / after: {m.load[0]:.1f} / {m.load[-1]:.1f}")
    print("-" * 88)
    rows = [
        ("ideal (1 proc / cores)", ideal / m.cores, views / (ideal / m.cores), 1.0,
         ideal_cpu, 1.0, ideal_cpu / ideal),
        row("`mmfp refresh` (best)", cli),
    ]  # fmt: skip
    if m.runs:
        rows += [
            row("on Ray, cold", m.runs[0]),
            row("on Ray, warm (best)", min(m.runs[1:], key=lambda w: w.seconds)),
        ]
    header = ("", "seconds", "views/s", "ratio", "CPU s", "CPU ratio", "CPU busy")
    print_table(header, rows, (24, 9, 10, 8, 9, 11, 10))
    print("-" * 88)
    print(
        "ratio = throughput / (1-process throughput x cores); CPU ratio = ideal CPU s / CPU s "
        "of every\nprocess of the run (load-independent overhead); CPU busy = CPU s / (wall x "
        "cores)\n(below 1: idle cores, or CPU share lost to other load on the machine)"
    )
    if m.runs:
        warms = m.runs[1:]
        paired = statistics.median(
            m.ratio(w.seconds, i.seconds) for w, i in zip(warms, m.ideal[1:], strict=True)
        )
        print(
            f"on Ray (a cluster's path): cold {m.ratio(m.runs[0].seconds, ideal):.2f}, warm "
            f"best {m.ratio(min(w.seconds for w in warms), ideal):.2f}, median of paired warm "
            f"runs {paired:.2f}"
        )
    print(
        f"correctness: every run stored {expected.views} views + {expected.errors} quarantined, "
        f"same keys and bytes as the ideal: {'OK' if ok else 'FAILED'}"
    )
    print(line)
    ratio = m.ratio(cli.seconds, ideal)
    stage = m.ratio(cli.stage_seconds or cli.seconds, ideal)
    median = statistics.median(m.ratio(r.seconds, ideal) for r in m.cli)
    verdict = "met" if ratio >= COLD_TARGET else "NOT met"
    print(
        f"ratio `mmfp refresh`/ideal (every CLI call is cold): best {ratio:.2f}, median "
        f"{median:.2f}; its augment stage alone {stage:.2f}; target >= {COLD_TARGET} cold: "
        f"{verdict}"
    )
    return ok


if __name__ == "__main__":
    sys.exit(main())
