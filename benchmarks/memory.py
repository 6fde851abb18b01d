"""Memory benchmark (issue 13): peak memory of each CLI command at 1x and 4x the data.

    python benchmarks/memory.py [--samples 2500] [--corpus-dir DIR] [--skip-train]

A store whose memory grows with its data fails on the day the data outgrows the machine.
This benchmark runs ``mmfp build`` (collect + a weight-free ``inputs`` feature set),
``mmfp encode`` (a tiny CLIP built from a config; in the CLI process and its forked
workers on a machine of at most 8 CPUs, in Ray actors on a larger one), ``mmfp train`` (one
epoch, image <-> audio CNN towers on ``inputs``) and ``mmfp search --id`` (exact over the
CLIP image embeddings, streamed) as fresh processes, exactly as a user's shell
would, on ``--samples`` and 4x as many samples (256 px JPEG + 1 s WAV + caption each).

Peak memory is the largest sum, over the command's process and every process it
started (a local Ray's GCS, raylet, workers and actors), of each process's PSS (its
private pages plus its share of pages it shares, so the object store's shared memory
counts once), polled every 0.25 s from ``/proc`` (Linux), or the command process's own
peak RSS when that is larger (a short command can peak between two polls). Each command's last lines
print peak(4x) / peak(1x) (target <= 1.2). Nothing touches the network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks._common import load_average, print_table, process_tree, pss_bytes  # noqa: E402
from benchmarks.build_cli import clean_env, corpus  # noqa: E402
from features.store import FeatureStore  # noqa: E402
from jobs.demo.tiny_models import tiny_clip  # noqa: E402

COMMANDS = ("build", "encode", "train", "search")
TARGET = 1.2
POLL_S = 0.25


def peak_memory(command: list[str], env: dict[str, str], cwd: Path) -> tuple[int, float]:
    """(peak memory of the command's process tree, wall seconds); fails loudly on an error.

    The peak is the larger of the polled PSS sum and the command process's own peak RSS
    (``wait4``'s ``ru_maxrss``): a short command without Ray can peak between two polls.
    """
    proc = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.wait(POLL_S):
            peak = max(peak, sum(pss_bytes(p) for p in process_tree(proc.pid)))

    watcher = threading.Thread(target=poll, daemon=True)
    t0 = time.perf_counter()
    watcher.start()
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, for its rusage
    seconds = time.perf_counter() - t0
    done.set()
    watcher.join()
    if proc.returncode != 0:
        what = " ".join(command[2:4])
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{output[-3000:]}")
    return max(peak, usage.ru_maxrss * 1024), seconds  # ru_maxrss: KiB on Linux


def write_configs(work: Path, source: Path, samples: int) -> tuple[Path, Path, Path]:
    """The pipeline spec (collect + a weight-free feature set), the same with a tiny CLIP
    feature set added (for ``mmfp encode``) and a one-epoch train config."""
    spec = {
        "name": "bench-memory",
        "sources": [{"kind": "directory", "uri": str(source), "class_folders": True}],
        "encode": {
            "feature_sets": [
                {
                    "name": "inputs",
                    "encoders": [
                        {"name": "image_pixels", "params": {"size": 32}},
                        {"name": "audio_logmel", "params": {"n_mels": 32, "frames": 50}},
                    ],
                }
            ]
        },
        "store": {"uri": str(work / "store")},
    }
    train = {
        "name": "bench-memory",
        "store": str(work / "store"),
        "feature_set": "inputs",
        "modalities": {
            "image": {"kind": "cnn", "input": "image_pixels", "channels": [16, 32], "out_dim": 64},
            "audio": {"kind": "cnn", "input": "audio_logmel", "channels": [16, 32], "out_dim": 64},
        },
        "epochs": 1,
        "batch_size": max(4, min(64, samples // 8)),  # 64 from 512 samples on
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "val_max_rows": 0,
    }
    clip = {"name": "clip", "encoders": [{"name": "clip", "model": str(tiny_clip(work / "clip"))}]}
    with_clip = {**spec, "encode": {"feature_sets": [*spec["encode"]["feature_sets"], clip]}}
    paths = work / "spec.yaml", work / "spec-clip.yaml", work / "train.yaml"
    for path, config in zip(paths, (spec, with_clip, train), strict=True):
        path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return paths


def measure(samples: int, corpora: Path, args: argparse.Namespace) -> dict[str, tuple[int, float]]:
    source = corpus(corpora, samples)
    out: dict[str, tuple[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix=f"mmfp-bench-memory-{samples}-") as tmp:
        work = Path(tmp)
        env = clean_env(work)
        spec, spec_clip, train = write_configs(work, source, samples)
        mmfp = [sys.executable, "-m", "jobs"]
        out["build"] = peak_memory([*mmfp, "build", str(spec)], env, ROOT)
        out["encode"] = peak_memory(
            [*mmfp, "encode", str(spec_clip), "--feature-set", "clip"], env, ROOT
        )
        if not args.skip_train:
            out["train"] = peak_memory([*mmfp, "train", str(train)], env, ROOT)
        store = FeatureStore(str(work / "store"))
        first = store.to_arrow("features/clip", columns=["sample_id"]).column(0)[0].as_py()
        out["search"] = peak_memory(
            [*mmfp, "search", "clip", "--id", first, "--column", "image_emb",
             "--store", str(work / "store")],
            env, ROOT,
        )  # fmt: skip
    return out


def report(sizes: dict[int, dict[str, tuple[int, float]]], load: tuple[float, float]) -> None:
    small, large = sorted(sizes)
    mib = 2**20
    rows = []
    ratios = {}
    for command in COMMANDS:
        if command not in sizes[small]:
            continue
        (a, ta), (b, tb) = sizes[small][command], sizes[large][command]
        ratios[command] = b / a
        rows.append((command, a / mib, b / mib, b / a, ta, tb))
    line = "=" * 78
    print(f"\n{line}")
    print(f"peak memory (PSS of every process of the command), {small} and {large} samples")
    print("-" * 78)
    print_table(
        ("command", f"MiB @{small}", f"MiB @{large}", "ratio", f"s @{small}", f"s @{large}"),
        rows,
        (10, 14, 14, 8, 12, 12),
    )
    print("-" * 78)
    print(f"load average (1 min) before / after: {load[0]:.1f} / {load[1]:.1f}")
    for command, ratio in ratios.items():
        verdict = "met" if ratio <= TARGET else "NOT met"
        print(f"{command}: peak(4x) / peak(1x) = {ratio:.2f} (target <= {TARGET}: {verdict})")
    print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2500, help="1x size (2500); 4x is run too")
    parser.add_argument("--corpus-dir", type=Path, help="keep the corpora here between runs")
    parser.add_argument("--skip-train", action="store_true", help="skip `mmfp train`")
    args = parser.parse_args(argv)
    if args.samples < 10:
        parser.error("--samples must be >= 10")
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="mmfp-bench-memory-corpora-") as tmp:
        corpora = args.corpus_dir or Path(tmp)
        sizes = {n: measure(n, corpora, args) for n in (args.samples, 4 * args.samples)}
    report(sizes, (load_before, load_average()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
