"""Encode benchmark (issue 5): the encode stage against a pure forward loop, and the GPU path
by simulation (DESIGN §7).

    python benchmarks/encode.py [--samples N] [--sim-samples M] [--image-size PX]
                                [--batch-size B] [--cores C] [--repeats R] [--concurrency A]
                                [--latency-ms MS ...] [--pixels float32 uint8]
                                [--encoder hf_image|clip]
                                [--skip-cpu] [--skip-small] [--skip-sim]

**(a) CPU, measured.** The full pipeline, ``pipelines.build.encode_only`` (``read_delta`` of
``samples`` -> ``Preprocess`` CPU tasks -> ``Encode`` in an ``ActorPoolStrategy`` actor ->
``StoreSink`` Parquet + one Delta commit), against the ideal: a pure model-forward loop in
this process on the same device, same model, same batch size, with the inputs prepared in
memory beforehand (only ``encoder.encode`` is timed), run with torch's default threads (one
per core) and with one thread; the reference is the faster of the threaded loop and the
one-thread loop times the cores (DESIGN §7's ideal). Models: a CLIP ViT-B/32 with random
weights built from ``CLIPConfig`` defaults (image tower through ``hf_image``; ``--encoder
clip`` adds the text tower), and the tiny CLIP of ``jobs.demo.tiny_models`` as the small
model. Ratio = ideal seconds / pipeline
seconds for the same rows (cold: first encode of a fresh Ray session; warm: later ones; each
encode starts its own actor and loads the model, as every ``mmfp encode`` does). On a
CPU-only machine the preprocessing has to share the cores with the forward, so the best the
pipeline can reach is ``forward / (forward + preprocess / cores)``; that ceiling is printed
too, and so are the CPU seconds of every process of the run.

**(b) GPU, simulated.** A local Ray with one *logical* GPU (``ray.init(num_gpus=1)``, no
device), the real ``encode_feature_set`` path with its actor pool and ``num_gpus=1``, and the
model replaced by ``benchmarks._common:StandIn``: real JPEG decode + the checkpoint's real
image processor in the ``Preprocess`` tasks, and a forward that sleeps ``--latency-ms`` per
batch (a GPU's forward) and records its intervals. Busy fraction = time inside forward /
wall time of the encode stage (the window from the first forward's start to the last one's
end; the whole ``encode_only`` call is shown too); target >= 0.9. ``useful`` counts the
same in full batches, since a GPU pays a whole forward for a tail batch of a few rows. The
ideal busy fraction ``min(1, preprocess rate x CPUs preprocessing / forward rate)`` uses the
preprocessing rate of one process measured here. Runs: ``uint8`` pixels (resized and
cropped, 150 KB a row at 224 px, normalised on the device: what the project's encoders ship
since issue 13, ``hf_inputs.PixelScale``) and ``float32`` pixels (the processor's
normalised output, 602 KB a row: what they shipped before), and a last run whose latency
leaves the preprocessing 4x headroom, which separates the pipeline's own scheduling losses
from CPU starvation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from benchmarks._common import (  # noqa: E402
    CpuMeter,
    build_samples,
    clip_b32,
    load_average,
    local_ray,
    make_spec,
    map_workers,
    number,
    print_table,
    read_trace,
    write_corpus,
)
from features.runs import accelerator_busy  # noqa: E402
from pipelines.spec import PipelineSpec, write_spec  # noqa: E402

TARGET_RATIO = 0.85
TARGET_BUSY = 0.9
STAND_IN = "benchmarks._common:StandIn"


# ---- shared ---------------------------------------------------------------------------


def feature_inputs(store_uri: str) -> pa.Table:
    """The ``samples`` rows as the encoders see them (``as_feature_input``)."""
    from features.store import FeatureStore
    from pipelines.encode import KEY_COLUMNS, MEDIA_COLUMNS, as_feature_input

    columns = [c for c in KEY_COLUMNS if c != "view"] + MEDIA_COLUMNS
    rows = FeatureStore(store_uri).to_arrow("samples", columns=columns)
    return as_feature_input(rows, is_view=False)


def spec_with(corpus: Path, store: Path, name: str, config: dict[str, Any]) -> PipelineSpec:
    encode = {"feature_sets": [{"name": name, "views": False, "encoders": [config]}]}
    return make_spec(corpus, store, encode=encode)


@dataclass
class EncodeRun:
    label: str
    seconds: float  # the whole encode_only call
    cpu_seconds: float  # every process of the local Ray plus this one
    rows: int  # rows in the feature set afterwards
    null_rows: int
    started: float  # time.time() at the call's start and end
    ended: float
    actors: list[str]  # class names of the map actors the run started (shows fusion)
    stage_gpu_busy: float | None  # what the run recorded in `_stages` (`mmfp runs show`)
    emb: dict[str, np.ndarray] = field(default_factory=dict)


def run_encode(spec: PipelineSpec, name: str, label: str, *, keep: bool = False) -> EncodeRun:
    """``encode_only`` in this process's Ray session: one feature set, read back to count
    (and compare) its rows."""
    from pipelines.build import encode_only

    before = map_workers()
    with CpuMeter() as cpu:
        started, t0 = time.time(), time.perf_counter()
        encode_only(spec, name)
        seconds = time.perf_counter() - t0
    actors = sorted({v for k, v in map_workers().items() if k not in before})
    return read_back(spec, name, label, keep, seconds, cpu.seconds, started, actors)


def run_cli_encode(
    spec: PipelineSpec, name: str, label: str, work: Path, *, keep: bool = False
) -> EncodeRun:
    """What a user runs: ``mmfp encode SPEC --feature-set NAME`` as a fresh process with no
    cluster address (imports, model load and all), read back like ``run_encode``."""
    path = work / f"{name}.yaml"
    write_spec(spec, path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"PYTHONPATH": str(ROOT), "MMFP_LOG_DIR": str(work / "logs")}
    command = [sys.executable, "-m", "jobs", "encode", str(path), "--feature-set", name]
    with CpuMeter() as cpu:
        started, t0 = time.time(), time.perf_counter()
        proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"mmfp encode failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return read_back(spec, name, label, keep, seconds, cpu.seconds, started, [])


def read_back(
    spec: PipelineSpec,
    name: str,
    label: str,
    keep: bool,
    seconds: float,
    cpu_seconds: float,
    started: float,
    actors: list[str],
) -> EncodeRun:
    """The run's feature set and its ``_stages`` row, as an ``EncodeRun``."""
    from features.store import FeatureStore

    store = FeatureStore(spec.store.uri)
    table = store.to_arrow(f"features/{name}")
    emb_columns = [c for c in table.column_names if c.endswith("_emb")]
    nulls = sum(table.column(c).null_count for c in emb_columns)
    emb = {}
    if keep:
        ids = table.column("sample_id").to_pylist()
        for c in emb_columns:
            values = np.array(table.column(c).to_pylist(), dtype=np.float32)
            emb[c] = values[np.argsort(ids)]
    stages = [s for s in store.to_arrow("_stages").to_pylist() if s["stage"] == f"encode {name}"]
    return EncodeRun(
        label, seconds, cpu_seconds, table.num_rows, nulls, started, time.time(), actors,
        accelerator_busy(stages[-1]), emb,
    )  # fmt: skip


# ---- (a) CPU: pipeline vs pure forward --------------------------------------------------


@dataclass
class Forward:
    """The ideal: ``encoder.encode`` over in-memory inputs, batch by batch, in this process,
    once with torch's default threads (one per core) and once with one thread.

    The better of the two, ``min(threaded, single / cores)``, is the reference: one thread
    times the cores is DESIGN §7's ideal, and on a loaded machine it is often the faster one
    (a multi-threaded forward stalls whenever one of its threads is descheduled).
    """

    threaded: float  # seconds, default threads
    single: float  # seconds, one thread
    cpu_threaded: float
    cpu_single: float
    threads: int

    def ideal(self, cores: int) -> float:
        return min(self.threaded, self.single / cores)


@dataclass
class Prepared:
    encoder: Any
    inputs: list[dict[str, np.ndarray]]
    preprocess_seconds: float  # encoder.preprocess of every batch, one process
    load_seconds: float
    rows: int
    order: np.ndarray  # sorts the rows by sample_id


def prepare(config: dict[str, Any], store_uri: str) -> Prepared:
    from pipelines.encoders import EncoderConfig, get_encoder

    encoder = get_encoder(EncoderConfig.model_validate(config))
    rows = feature_inputs(store_uri)
    size = encoder.config.batch_size
    encoder.preprocess(rows.slice(0, 2))  # processor / tokenizer created outside the clock
    t0 = time.perf_counter()
    inputs = [encoder.preprocess(rows.slice(i, size)) for i in range(0, rows.num_rows, size)]
    preprocess_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    encoder.load("cpu")
    load_seconds = time.perf_counter() - t0
    encoder.encode(inputs[0])  # first forward (allocator, kernels) outside the clock
    order = np.argsort(rows.column("sample_id").to_pylist())
    return Prepared(encoder, inputs, preprocess_seconds, load_seconds, rows.num_rows, order)


def run_forward(prepared: Prepared) -> tuple[Forward, dict[str, np.ndarray]]:
    import torch

    encoder, threads = prepared.encoder, torch.get_num_threads()
    timings = []
    for n in (threads, 1):
        torch.set_num_threads(n)
        cpu, t0 = time.process_time(), time.perf_counter()
        outputs = [encoder.encode(batch) for batch in prepared.inputs]
        timings.append((time.perf_counter() - t0, time.process_time() - cpu))
    torch.set_num_threads(threads)
    (threaded, cpu_threaded), (single, cpu_single) = timings
    emb = {
        k: np.concatenate([o[k] for o in outputs])[prepared.order]
        for k in outputs[0]
        if k.endswith("_emb")
    }
    return Forward(threaded, single, cpu_threaded, cpu_single, threads), emb


@dataclass
class CpuResult:
    model: str
    prepared: Prepared
    forwards: list[Forward]
    runs: list[EncodeRun]  # cold first
    max_diff: float


def bench_cpu(
    model: str, config: dict[str, Any], corpus: Path, store: Path, work: Path, args: Any
) -> CpuResult:
    """Order: prepare + forward, ``mmfp encode`` from the CLI (a fresh process, no cluster:
    the product's default path), then, unless ``--skip-ray``, in a local Ray session a
    cold encode and (forward, warm encode) x repeats."""
    prepared = prepare(config, str(store))
    forward, reference = run_forward(prepared)
    forwards = [forward]
    spec = spec_with(corpus, store, f"{model}-cli", config)
    runs = [run_cli_encode(spec, f"{model}-cli", "cli", work, keep=True)]
    if not args.skip_ray:
        with local_ray(args.cores) as init_s:
            print(f"[{model}] ray.init: {init_s:.2f} s (not counted)")
            labels = ["cold", *(f"warm{i + 1}" for i in range(args.repeats))]
            for i, label in enumerate(labels):
                if i:
                    forwards.append(run_forward(prepared)[0])
                name = f"{model}-{label}"  # every run: a new feature set of the one store
                spec = spec_with(corpus, store, name, config)
                runs.append(run_encode(spec, name, label, keep=True))
    diffs = [float(np.max(np.abs(r.emb[k] - reference[k]))) for r in runs for k in reference]
    return CpuResult(model, prepared, forwards, runs, max(diffs))


def report_cpu(result: CpuResult, cores: int) -> bool:
    p, n = result.prepared, result.prepared.rows
    threads = result.forwards[0].threads
    threaded = min(f.threaded for f in result.forwards)
    single = min(f.single for f in result.forwards)
    fwd = min(threaded, single / cores)
    cli, on_ray = result.runs[0], result.runs[1:]
    # CPU only: preprocessing takes its CPU seconds from the cores the forward would use
    ceiling = fwd / (fwd + p.preprocess_seconds / cores)
    ok = all(r.rows == n and r.null_rows == 0 for r in result.runs) and result.max_diff < 1e-3

    def row(name: str, run: EncodeRun) -> tuple[object, ...]:
        busy = run.cpu_seconds / (run.seconds * cores)
        return (name, run.seconds, n / run.seconds, fwd / run.seconds, run.cpu_seconds, busy)

    line = "=" * 80
    print(f"\n{line}")
    print(
        f"encode (a) CPU, {result.model}: {n} images, batch {p.encoder.config.batch_size}, "
        f"{cores} cores"
    )
    print(
        f"one process: preprocess {p.preprocess_seconds:.2f} s ({n / p.preprocess_seconds:.0f} "
        f"rows/s), model load {p.load_seconds:.2f} s; forward loops (s, CPU s): "
        + "; ".join(
            f"{threads} threads {number(f.threaded)} ({number(f.cpu_threaded)}), 1 thread "
            f"{number(f.single)} ({number(f.cpu_single)})"
            for f in result.forwards
        )
    )
    print("-" * 80)
    rows = [
        (f"forward, {threads} threads", threaded, n / threaded, fwd / threaded, "", ""),
        (f"forward, 1 thread x {cores}", single / cores, n * cores / single,
         fwd * cores / single, "", ""),
        row("`mmfp encode` (CLI)", cli),
        *(row(f"on Ray, {r.label}", r) for r in on_ray),
    ]  # fmt: skip
    print_table(("", "seconds", "rows/s", "ratio", "CPU s", "CPU busy"), rows, (24, 9, 9, 8, 9, 10))
    print("-" * 80)
    print(
        "ratio = ideal seconds / seconds, ideal = the faster forward loop (min of the two rows "
        "above)"
    )
    if on_ray:
        warms = on_ray[1:]
        paired = [
            f.ideal(cores) / w.seconds for f, w in zip(result.forwards[1:], warms, strict=True)
        ]
        warm = f", warm (median of paired runs) {number(statistics.median(paired))}"
        print(
            f"on Ray (a cluster's path): cold {number(fwd / on_ray[0].seconds)}"
            + (warm if warms else "")
            + f"; map actors of the cold run: {', '.join(on_ray[0].actors) or 'none'}"
        )
    ratio = fwd / cli.seconds
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(
        f"correctness: {n} rows in every feature set, no null embeddings, max |pipeline - "
        f"forward| = {result.max_diff:.1e}: {'OK' if ok else 'FAILED'}"
    )
    print(line)
    print(
        f"ratio `mmfp encode`/forward ({result.model}, {n} rows): {number(ratio)}; CPU-only "
        f"ceiling forward/(forward + preprocess/cores) {number(ceiling)}; target >= "
        f"{TARGET_RATIO}: {verdict}"
    )
    return ok


# ---- (b) GPU simulation -----------------------------------------------------------------


@dataclass
class SimRun:
    label: str
    pixels: str
    latency_ms: float
    run: EncodeRun
    spans: list[tuple[float, float, int]]  # (start, end, rows) of every forward
    batch_size: int

    @property
    def forward_seconds(self) -> float:
        return sum(b - a for a, b, _ in self.spans)

    @property
    def window(self) -> float:
        return self.spans[-1][1] - self.spans[0][0]

    @property
    def busy(self) -> float:
        """Time inside forward / the window from the first forward's start to the last's end."""
        return self.forward_seconds / self.window

    @property
    def useful(self) -> float:
        """Busy counted in full batches: a 9-row tail batch costs a GPU a whole forward."""
        rows = sum(n for *_, n in self.spans)
        return rows / self.batch_size * self.latency_ms / 1000 / self.window

    @property
    def busy_call(self) -> float:
        return self.forward_seconds / self.run.seconds


def preprocess_rate(config: dict[str, Any], store_uri: str) -> float:
    """Rows per second of the stand-in's real preprocessing, one process."""
    from pipelines.encoders import EncoderConfig, get_encoder

    encoder = get_encoder(EncoderConfig.model_validate(config))
    rows = feature_inputs(store_uri)
    size = encoder.config.batch_size
    encoder.preprocess(rows.slice(0, 2))
    t0 = time.perf_counter()
    for i in range(0, rows.num_rows, size):
        encoder.preprocess(rows.slice(i, size))
    return rows.num_rows / (time.perf_counter() - t0)


def bench_sim(model_dir: Path, corpus: Path, store: Path, work: Path, args: Any) -> bool:
    batch = args.batch_size
    base = {"name": STAND_IN, "model": str(model_dir), "batch_size": batch}
    rates = {
        px: preprocess_rate(base | {"params": {"pixels": px}}, str(store)) for px in args.pixels
    }
    first = args.pixels[0]
    free = args.cores  # the GPU actor holds no CPU: every CPU may preprocess
    fed_ms = round(1000 * batch / (0.25 * rates[first] * free), 1)  # 4x headroom
    plan = [("cold", first, args.latency_ms[0])]
    plan += [(f"{lat:g}ms", px, lat) for px in args.pixels for lat in args.latency_ms]
    plan += [("fed", first, fed_ms)]
    runs: list[SimRun] = []
    with local_ray(args.cores, gpus=1) as init_s:
        print(f"[sim] ray.init(num_cpus={args.cores}, num_gpus=1): {init_s:.2f} s (not counted)")
        for i, (label, pixels, latency) in enumerate(plan):
            trace = work / f"trace-{i}"
            trace.mkdir()
            params = {"latency_ms": latency, "trace_dir": str(trace), "pixels": pixels}
            name = f"sim-{i}"
            spec = spec_with(corpus, store, name, base | {"params": params})
            run = run_encode(spec, name, label)
            runs.append(SimRun(label, pixels, latency, run, read_trace(trace), batch))
    return report_sim(runs, rates, free, args)


def report_sim(runs: list[SimRun], rates: dict[str, float], free: int, args: Any) -> bool:
    n, cores = args.sim_samples, args.cores
    line = "=" * 110
    print(f"\n{line}")
    print(
        f"encode (b) GPU simulation: {n} images {args.image_size}px, stand-in forward of "
        f"batch {args.batch_size}, {cores} CPUs + 1 logical GPU (no device)"
    )
    print(
        "preprocess (JPEG decode + CLIP image processor), one process: "
        + ", ".join(f"{px} {rate:.0f} rows/s" for px, rate in rates.items())
        + f"; CPUs for Preprocess tasks (the GPU actor holds none): {free}"
    )
    print("-" * 110)
    header = ("run", "pixels", "lat ms", "fwd rows/s", f"ideal({free})", f"ideal({cores})",
              "busy", "useful", "busy(call)", "window s", "call s", "fill s", "fwds",
              "CPU busy", "report")  # fmt: skip
    rows = []
    for s in runs:
        fwd_rate = args.batch_size / (s.latency_ms / 1000)
        rate = rates[s.pixels]
        rows.append(
            (s.label, s.pixels, s.latency_ms, round(fwd_rate), min(1.0, rate * free / fwd_rate),
             min(1.0, rate * cores / fwd_rate), s.busy, s.useful, s.busy_call, s.window,
             s.run.seconds, s.spans[0][0] - s.run.started, len(s.spans),
             s.run.cpu_seconds / (s.run.seconds * cores), s.run.stage_gpu_busy)
        )  # fmt: skip
    print_table(header, rows, (6, 8, 8, 11, 9, 9, 6, 7, 11, 9, 7, 7, 5, 9, 7))
    print("-" * 110)
    print(
        "busy = time inside forward / (last forward end - first forward start); useful = the "
        "same in full\nbatches (rows / batch x latency); busy(call) divides by the whole "
        "encode_only call (actor start,\nreads, fill, commit); ideal(k) = min(1, preprocess "
        "rate x k / forward rate) with k CPUs preprocessing;\nfwds = forward calls; CPU busy = "
        "CPU s of all Ray processes / (call s x cores);\nreport = GPU actors busy as the run "
        "recorded it in `_stages` (`mmfp runs show`): the Encode actor's time\nin its "
        "function (host-side conversion + forward) / (the encode stage's wall time x GPUs)"
    )
    headline = next(s for s in runs[1:] if s.latency_ms == args.latency_ms[0])
    verdict = "met" if headline.busy >= TARGET_BUSY else "NOT met"
    print(
        f"busy fraction at {headline.latency_ms:g} ms/batch ({headline.pixels}, warm): "
        f"{headline.busy:.2f} (useful {headline.useful:.2f}, whole call "
        f"{headline.busy_call:.2f}); target >= {TARGET_BUSY}: {verdict}"
    )
    print(f"map actors of the cold run: {', '.join(runs[0].run.actors) or 'none'}")
    ok = all(s.run.rows == n and s.run.null_rows == 0 for s in runs)
    ok = ok and all(sum(r for *_, r in s.spans) == n for s in runs)
    print(
        f"correctness: {n} rows in every feature set, every row through the stand-in forward: "
        f"{'OK' if ok else 'FAILED'}"
    )
    print(line)
    return ok


# ---- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Encode benchmark: CPU ratio and GPU simulation")
    parser.add_argument("--samples", type=int, default=256, help="images for (a) (256)")
    parser.add_argument("--sim-samples", type=int, default=2048, help="images for (b) (2048)")
    parser.add_argument("--image-size", type=int, default=224, help="JPEG side, px (224)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward (32)")
    parser.add_argument(
        "--cores", type=int, default=os.cpu_count() or 1, help="CPUs for Ray (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="warm runs per model in (a) (1)")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="encoder `concurrency` (actors) in (a) (1)"
    )
    parser.add_argument(
        "--latency-ms", type=float, nargs="+", default=[20.0], help="stand-in forward (20)"
    )
    parser.add_argument(
        "--pixels", nargs="+", choices=("float32", "uint8"), default=["uint8", "float32"],
        help="what Preprocess ships to the stand-in: uint8 normalised on the device (as the "
        "project's encoders do) and/or the processor's float32 (as they did before)",
    )  # fmt: skip
    parser.add_argument(
        "--encoder", choices=("hf_image", "clip"), default="hf_image",
        help="hf_image: the B/32 image tower; clip: both towers (images + captions)",
    )  # fmt: skip
    parser.add_argument("--skip-cpu", action="store_true", help="skip (a) for ViT-B/32")
    parser.add_argument("--skip-small", action="store_true", help="skip (a) for the tiny model")
    parser.add_argument("--skip-sim", action="store_true", help="skip (b)")
    parser.add_argument(
        "--skip-ray", action="store_true", help="(a) through the CLI only, not in a Ray session"
    )
    args = parser.parse_args(argv)
    if min(args.samples, args.sim_samples, args.batch_size, args.cores, args.repeats,
           args.concurrency) < 1:  # fmt: skip
        parser.error("sizes, --cores, --repeats and --concurrency must be >= 1")
    if min(args.latency_ms) <= 0:
        parser.error("--latency-ms must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jobs.demo import tiny_models as tiny

    load_before = load_average()
    ok = True
    with tempfile.TemporaryDirectory(prefix="mmfp-bench-encode-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        b32 = None if args.skip_cpu and args.skip_sim else clip_b32(work / "clip-b32")
        small = tiny.tiny_clip(work / "clip-tiny")
        print(
            f"models: {'CLIP ViT-B/32 (random weights), ' if b32 else ''}tiny CLIP "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        stores = {}
        for part, n, skip in (
            ("cpu", args.samples, args.skip_cpu and args.skip_small),
            ("sim", args.sim_samples, args.skip_sim),
        ):
            if skip:
                continue
            corpus, store = work / f"corpus-{part}", work / f"store-{part}"
            t0 = time.perf_counter()
            write_corpus(corpus, samples=n, image_size=args.image_size, audio_seconds=None)
            written = time.perf_counter() - t0
            collect_s, stored = build_samples(make_spec(corpus, store), args.cores)
            assert stored == n, (stored, n)
            print(
                f"corpus {part}: {n} samples (jpg {args.image_size}px + caption) written in "
                f"{written:.1f} s, collected in {collect_s:.1f} s (not timed)"
            )
            stores[part] = (corpus, store)
        print("encode path: encode_only (`mmfp encode`), as build() runs the stage")
        cpu_models = []
        if b32 is not None and not args.skip_cpu:
            cpu_models.append(("b32", b32))
        if not args.skip_small:
            cpu_models.append(("tiny", small))
        for model, path in cpu_models:
            config = {
                "name": args.encoder,
                "model": str(path),
                "batch_size": args.batch_size,
                "concurrency": args.concurrency,
            }
            corpus, store = stores["cpu"]
            result = bench_cpu(model, config, corpus, store, work, args)
            ok = report_cpu(result, args.cores) and ok
        if b32 is not None and not args.skip_sim:
            corpus, store = stores["sim"]
            ok = bench_sim(b32, corpus, store, work, args) and ok
    print(f"load average (1 min) before / after: {load_before:.1f} / {load_average():.1f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
