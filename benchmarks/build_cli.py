"""CLI build benchmark (issue 13): ``mmfp build`` as a user runs it, against the ``datasets`` peer.

    python benchmarks/build_cli.py [--samples 2000 20000] [--cores C] [--repeats R]
                                   [--corpus-dir DIR] [--no-peer] [--refresh]

Every ``mmfp`` call is a cold process: it imports mmfp, starts a private local Ray (GCS,
raylet, agents, workers), builds, and shuts Ray down. So this benchmark times the command
itself, in a fresh process, on one corpus per size (256 px JPEG + 1 s WAV + caption per
sample, in class folders), and compares:

- **ideal**: the collect stage functions (listing, ``RefReader``, ``split_batch``) in a plain
  loop in this process, throughput times ``--cores``: ``benchmarks.collect.run_ideal``;
- **mmfp**: ``python -m jobs build SPEC`` (what ``mmfp build`` runs), wall time of the process;
  its ``_stages`` rows (``features.runs``, the same report as ``mmfp runs show``) split that
  time into stages and the rest (imports, Ray start and shutdown, the summary);
- **peer**: a fresh ``python`` process that imports ``datasets`` and runs the same functions
  with ``map(batched=True, num_proc=cores)`` then ``to_parquet``
  (``benchmarks.collect.run_peer``); skipped when ``datasets`` is not installed.

With ``--refresh``, each build is followed by ``mmfp refresh`` after 1% new inputs appear (in
a second source folder of the spec, empty at build time), then by a refresh with nothing new;
both are timed as CLI processes too and compared to the build. Each is the best of
``--repeats`` runs, alternated (ideal, mmfp, peer, ideal, ...), each into
a new store. The last lines print the ratios (throughput / ideal) and mmfp's speed over the
peer's. ``--corpus-dir`` keeps the corpora between invocations (writing 20k samples takes
minutes). Nothing touches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks._common import load_average, write_corpus  # noqa: E402
from benchmarks.collect import peer_available, run_ideal, run_peer  # noqa: E402
from features import runs  # noqa: E402
from features.store import FeatureStore  # noqa: E402
from pipelines.spec import PipelineSpec, load_spec  # noqa: E402

AUDIO_SECONDS = 1.0
IMAGE_SIZE = 256


@dataclass
class Size:
    samples: int
    ideal: list[float] = field(default_factory=list)  # one process, seconds
    mmfp: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # of the best mmfp run
    bottleneck: str = ""
    stored: list[int] = field(default_factory=list)  # samples rows after each build
    refresh: list[float] = field(default_factory=list)  # +1% new inputs, CLI
    noop: list[float] = field(default_factory=list)  # nothing new, CLI
    refreshed: list[int] = field(default_factory=list)  # samples rows after each refresh

    def ratio(self, seconds: float, cores: int) -> float:
        return min(self.ideal) / cores / seconds


def corpus(root: Path, samples: int) -> Path:
    """``root/n<samples>``, written once (a ``.complete`` marker guards against half corpora)."""
    folder = root / f"n{samples}"
    if not (folder / ".complete").exists():
        t0 = time.perf_counter()
        write_corpus(folder, samples=samples, image_size=IMAGE_SIZE, audio_seconds=AUDIO_SECONDS)
        (folder / ".complete").touch()
        print(f"corpus n={samples}: written in {time.perf_counter() - t0:.0f} s (not timed)")
    return folder


def write_spec(
    path: Path, sources: list[Path], store: Path, in_process_inputs: int | None = None
) -> PipelineSpec:
    raw: dict = {
        "name": "bench-cli",
        "sources": [
            {"kind": "directory", "uri": str(s), "class_folders": True, "name": s.name}
            for s in sources
        ],
        "store": {"uri": str(store)},
    }
    if in_process_inputs is not None:  # else the product's default
        raw["resources"] = {"in_process_inputs": in_process_inputs}
    path.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    return load_spec(path)


def clean_env(work: Path) -> dict[str, str]:
    """A user's shell: no cluster address, Ray's logs into the run's log folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["MMFP_LOG_DIR"] = str(work / "logs")
    env["PYTHONPATH"] = str(ROOT)
    return env


def time_mmfp(spec_path: Path, env: dict[str, str], command: str = "build") -> float:
    return _timed([sys.executable, "-m", "jobs", command, str(spec_path)], env, f"mmfp {command}")


def time_peer(spec_path: Path, out: Path, cores: int, env: dict[str, str]) -> float:
    """The peer in its own fresh process, like the CLI: interpreter, imports and all."""
    command = [sys.executable, __file__, "--peer-run", str(spec_path), str(out), str(cores)]
    return _timed(command, env, "peer")


def _timed(command: list[str], env: dict[str, str], what: str) -> float:
    """Wall seconds of ``command`` as a fresh process (dirty pages flushed first)."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def record_stages(size: Size, store: FeatureStore) -> None:
    """The stages of the store's only run, from ``_stages`` (what ``mmfp runs show`` prints)."""
    run_id = runs.recent_runs(store, 1).column("run_id")[0].as_py()
    stages = runs.run_stages(store, run_id)
    size.stages = {r["stage"]: r["seconds"] for r in stages.to_pylist()}
    worst = runs.bottleneck(stages)
    size.bottleneck = f"{worst.stage} ({worst.share:.0%}): {worst.reason}" if worst else ""


def measure(samples: int, args: argparse.Namespace, corpora: Path, work: Path) -> Size:
    source = corpus(corpora, samples)
    size = Size(samples)
    env = clean_env(work)
    peer_note = "skipped: --no-peer" if args.no_peer else peer_available()
    for i in range(args.repeats):
        spec_path = work / f"n{samples}-{i}.yaml"
        store = work / f"store-n{samples}-{i}"
        new = work / f"new-n{samples}-{i}"  # empty for the build, 1% more for the refresh
        new.mkdir()
        spec = write_spec(spec_path, [source, new], store, args.in_process_inputs)
        os.sync()
        size.ideal.append(run_ideal(spec).seconds)
        seconds = time_mmfp(spec_path, env)
        built = FeatureStore(str(store))
        size.stored.append(built.to_arrow("samples", columns=["sample_id"]).num_rows)
        if not size.mmfp or seconds < min(size.mmfp):
            record_stages(size, built)
        size.mmfp.append(seconds)
        if args.refresh:
            added = max(1, samples // 100)
            write_corpus(
                new, samples=added, image_size=IMAGE_SIZE, audio_seconds=AUDIO_SECONDS, seed=i + 1
            )
            size.refresh.append(time_mmfp(spec_path, env, "refresh"))
            size.refreshed.append(built.to_arrow("samples", columns=["sample_id"]).num_rows - added)
            size.noop.append(time_mmfp(spec_path, env, "refresh"))
        if peer_note is None:
            size.peer.append(time_peer(spec_path, work / f"peer-n{samples}-{i}", args.cores, env))
    if peer_note is not None:
        print(f"peer: {peer_note}")
    return size


def report(sizes: list[Size], args: argparse.Namespace, load: tuple[float, float]) -> bool:
    line = "=" * 78
    print(f"\n{line}")
    print(
        f"CLI build benchmark: {args.cores} cores, {IMAGE_SIZE} px JPEG + {AUDIO_SECONDS:g} s WAV"
        f" + caption, best of {args.repeats}; load (1 min) {load[0]:.1f} -> {load[1]:.1f}"
    )
    ok = True
    for s in sizes:
        ideal = min(s.ideal) / args.cores
        print("-" * 78)
        print(f"n={s.samples}: ideal {ideal:.2f} s ({min(s.ideal):.2f} s in one process)")
        print(f"  mmfp build (cold CLI)  {min(s.mmfp):8.2f} s  all: {_seconds(s.mmfp)}")
        staged = sum(s.stages.values())
        for name, seconds in s.stages.items():
            print(f"    {name:22}{seconds:8.2f} s")
        outside = min(s.mmfp) - staged
        print(f"    {'outside stages':22}{outside:8.2f} s  (imports, Ray exit, summary)")
        print(f"    bottleneck: {s.bottleneck}")
        if s.peer:
            print(f"  peer (datasets, CLI)   {min(s.peer):8.2f} s  all: {_seconds(s.peer)}")
        if s.refresh:
            print(f"  refresh +1% (CLI)      {min(s.refresh):8.2f} s  all: {_seconds(s.refresh)}")
            print(f"  refresh, nothing new   {min(s.noop):8.2f} s  all: {_seconds(s.noop)}")
        ok = ok and all(n == s.samples for n in s.stored + s.refreshed)
    print("-" * 78)
    for s in sizes:
        mmfp, cores = min(s.mmfp), args.cores
        text = f"n={s.samples}: mmfp/ideal {s.ratio(mmfp, cores):.2f}"
        if s.peer:
            peer = min(s.peer)
            text += f", peer/ideal {s.ratio(peer, cores):.2f}, mmfp speed / peer speed "
            text += f"{peer / mmfp:.2f} ({'faster' if mmfp < peer else 'SLOWER'})"
        if s.refresh:
            text += f"; refresh +1% / build {min(s.refresh) / mmfp:.3f}"
            text += f", no-op refresh / build {min(s.noop) / mmfp:.3f}"
        print(text)
    print(f"correctness: every store holds all samples: {'OK' if ok else 'FAILED'}")
    print(line)
    return ok


def _seconds(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def peer_run(spec_path: str, out: str, cores: str) -> int:
    run_peer(load_spec(spec_path), int(cores), Path(out))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--corpus-dir", type=Path, help="keep corpora here (default: temp)")
    parser.add_argument("--no-peer", action="store_true", help="skip the datasets peer")
    parser.add_argument(
        "--in-process-inputs",
        type=int,
        help="the spec's resources.in_process_inputs (default: the product's: every input "
        "on at most 8 CPUs, else 20,000; 0: every build on Ray)",
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="after each build, time `mmfp refresh` with 1%% new inputs, then with nothing new",
    )
    args = parser.parse_args(argv)
    if min(args.samples) < 1 or args.cores < 1 or args.repeats < 1:
        parser.error("--samples, --cores and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--peer-run"]:
        return peer_run(*argv[1:])
    args = parse_args(argv)
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="mmfp-bench-cli-") as tmp:
        corpora = args.corpus_dir or Path(tmp) / "corpora"
        sizes = [measure(n, args, corpora, Path(tmp)) for n in args.samples]
    return 0 if report(sizes, args, (load_before, load_average())) else 1


if __name__ == "__main__":
    sys.exit(main())
