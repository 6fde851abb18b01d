"""Helpers shared by ``benchmarks/augment.py`` and ``benchmarks/encode.py`` (DESIGN §7).

- ``write_corpus``: a tri-modal directory corpus at any image size (``jobs.demo.corpus``'s
  generators; every sample complete unless a modality is turned off);
- ``local_ray``: a private local Ray (``address="local"``), optionally with logical GPUs;
- ``build_samples``: one collect-only build of a corpus into a store, in its own Ray session,
  so the session that is measured afterwards starts cold;
- ``clip_b32``: a CLIP ViT-B/32-sized checkpoint with random weights (no download);
- ``StandIn``: a fixed-latency encoder that models a GPU forward in the GPU simulation;
- ``CpuMeter``: CPU seconds of this process and every Ray process it started (separates the
  pipeline's own overhead from CPU share lost to other load on a shared box);
  ``map_workers``: the Ray Data map actors' class names (shows operator fusion);
- small report helpers (load average, number format, a table printer).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from features.schema import list_of
from jobs.demo import corpus as synthetic
from pipelines.encoders import hf_inputs, hub
from pipelines.encoders.base import Encoder, EncoderParams
from pipelines.spec import PipelineSpec, parse_spec

ROOT = Path(__file__).resolve().parents[1]

# ---- corpus ---------------------------------------------------------------------------


def write_corpus(
    root: Path,
    *,
    samples: int,
    image_size: int,
    audio_seconds: float | None = 0.5,
    text: bool = True,
    seed: int = 0,
) -> int:
    """``root/<class>/<stem>.jpg[.wav][.txt]``, ``image_size`` px JPEGs; returns the count.

    ``synthetic.write_directory_source`` only writes 64 px images and leaves some modalities
    out on purpose; a benchmark wants the same work in every sample.
    """
    import cv2
    import soundfile as sf

    classes = synthetic.CLASSES
    per_class = math.ceil(samples / len(classes))
    written = 0
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            if written == samples:
                return written
            i = k * per_class + j
            rng = np.random.default_rng([seed, 11, i])
            ok, jpg = cv2.imencode(
                ".jpg", synthetic.make_image(rng, k, image_size), [cv2.IMWRITE_JPEG_QUALITY, 90]
            )
            if not ok:
                raise RuntimeError("OpenCV could not encode a JPEG")
            (folder / f"d{i:05d}.jpg").write_bytes(jpg.tobytes())
            if audio_seconds:
                audio = synthetic.make_audio(rng, k, seconds=audio_seconds)
                sf.write(folder / f"d{i:05d}.wav", audio, synthetic.SAMPLE_RATE, subtype="PCM_16")
            if text:
                caption = synthetic.make_caption(rng, k)
                (folder / f"d{i:05d}.txt").write_text(caption, encoding="utf-8")
            written += 1
    return written


def make_spec(source: Path, store: Path, **sections: Any) -> PipelineSpec:
    raw = {
        "name": "bench",
        "sources": [{"kind": "directory", "uri": str(source), "class_folders": True}],
        "store": {"uri": str(store)},
        **sections,
    }
    return parse_spec(raw, origin="benchmarks").resolved(store.parent)


def corpus_args(
    parser: argparse.ArgumentParser, *, samples: int, image_size: int, repeats: int, cores: str
) -> None:
    """The options every corpus benchmark takes: size, cores, image side, repeats, resources."""
    parser.add_argument("--samples", type=int, default=samples, help=f"corpus size ({samples})")
    parser.add_argument(
        "--cores", type=int, default=os.cpu_count() or 1, help=f"{cores} (default: all)"
    )
    parser.add_argument(
        "--image-size", type=int, default=image_size, help=f"image side, px ({image_size})"
    )
    parser.add_argument("--repeats", type=int, default=repeats, help=f"warm runs ({repeats})")
    parser.add_argument("--batch-size", type=int, help="spec resources.batch_size override")
    parser.add_argument("--blocks-per-cpu", type=int, help="spec resources.blocks_per_cpu override")


def checked(parser: argparse.ArgumentParser, args: argparse.Namespace, *sizes: str) -> None:
    """Refuse sizes below 1 and images below 16 px, naming the options."""
    if min(getattr(args, s) for s in sizes) < 1 or args.image_size < 16:
        names = ", ".join(f"--{s.replace('_', '-')}" for s in sizes)
        parser.error(f"{names} must be >= 1 and --image-size >= 16")


# ---- Ray --------------------------------------------------------------------------------


@contextlib.contextmanager
def local_ray(cores: int, gpus: int = 0, *, niceness: int | None = None) -> Iterator[float]:
    """A private local Ray (never joins a stray cluster); yields the seconds ray.init took.

    ``gpus`` are logical: Ray schedules ``num_gpus`` actors on them without any device.
    ``niceness``: Ray starts its workers at nice 15, while an ideal loop or a peer's
    processes run at nice 0, so on a shared machine the default charges other people's
    load to the pipeline alone; a benchmark that compares them sets it to 0.
    """
    import ray
    import ray.data

    # Workers import ``benchmarks._common`` (the stand-in encoder) from this checkout: they
    # inherit the environment of the local Ray that this process starts.
    os.environ["PYTHONPATH"] = os.pathsep.join(_pythonpath())
    if niceness is not None:
        os.environ["RAY_worker_niceness"] = str(niceness)  # noqa: SIM112 (Ray's own name)
    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=cores,
        num_gpus=gpus,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    init_s = time.perf_counter() - t0
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield init_s
    finally:
        ray.shutdown()


def _pythonpath() -> list[str]:
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return [str(ROOT), *[p for p in extra if p != str(ROOT)]]


def build_samples(spec: PipelineSpec, cores: int) -> tuple[float, int]:
    """Collect-only build of ``spec`` in a Ray session of its own: (seconds, samples)."""
    from pipelines.build import build

    with local_ray(cores):
        t0 = time.perf_counter()
        result = build(spec)
        return time.perf_counter() - t0, result.counts["samples"]


# ---- models -----------------------------------------------------------------------------


def clip_b32(path: Path) -> Path:
    """CLIP ViT-B/32 (``CLIPConfig`` defaults: 224 px, patch 32, 12x768 vision, 12x512 text,
    512-d projection) with random weights, its ``CLIPImageProcessor`` and a local tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from jobs.demo import tiny_models as tiny

    torch.manual_seed(0)
    # special ids inside the local tokenizer's vocabulary (DESIGN §8)
    text = {"bos_token_id": tiny.CLS_ID, "eos_token_id": tiny.SEP_ID, "pad_token_id": tiny.PAD_ID}
    CLIPModel(CLIPConfig(text_config=text)).save_pretrained(path)
    CLIPImageProcessor().save_pretrained(path)  # resize 224 shortest edge, crop 224, normalise
    return tiny.write_tokenizer(path, max_length=77)


# ---- the GPU stand-in -------------------------------------------------------------------


class StandInParams(EncoderParams):
    latency_ms: float = Field(20.0, ge=0)  # per forward batch (``batch_size`` rows)
    dim: int = Field(512, gt=0)
    trace_dir: str | None = None  # one file per process: "start end rows" per forward
    # uint8: resized and cropped, normalised on the device (150 KB a row at 224 px), as
    # hf_image/clip ship them; float32: the processor's normalised output (602 KB a row)
    pixels: Literal["float32", "uint8"] = "uint8"


class StandIn(Encoder):
    """A model encoder whose forward sleeps a fixed latency per batch, as a GPU would be busy.

    Preprocessing is real: JPEG decode + the checkpoint's image processor at ``model`` (the
    same CPU work as ``hf_image``/``clip``). ``needs_model`` puts it in the actor pool with
    ``num_gpus``; each forward's wall interval is appended to ``trace_dir``.
    """

    modality = "image"
    needs_model = True
    Params = StandInParams
    params: StandInParams

    def output_columns(self) -> dict[str, tuple[pa.DataType, tuple[int, ...]]]:
        return {"image_emb": (list_of(pa.float32()), (self.params.dim,))}

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        assert self.config.model, "StandIn needs `model`: a directory with an image processor"
        path = self.config.model
        processor = self.cached("processor", lambda: hub.load_image_processor(path, None))
        scale = hf_inputs.pixel_scale(processor) if self.params.pixels == "uint8" else None
        return hf_inputs.image_inputs(processor, batch, scale)

    def load(self, device: str) -> None:
        self.device = device

    def encode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = inputs["image_mask"]
        rows = int(mask.sum())
        out = np.zeros((len(mask), self.params.dim), np.float32)
        out[mask, 0] = 1.0
        spans = []
        for start in range(0, rows, self.config.batch_size):
            t0 = time.time()
            time.sleep(self.params.latency_ms / 1000)
            spans.append((t0, time.time(), min(self.config.batch_size, rows - start)))
        if self.params.trace_dir:
            trace = Path(self.params.trace_dir) / f"forward-{os.getpid()}.txt"
            with trace.open("a") as f:
                f.writelines(f"{a:.6f} {b:.6f} {n}\n" for a, b, n in spans)
        return {"image_emb": out, "image_mask": mask}


def read_trace(trace_dir: Path) -> list[tuple[float, float, int]]:
    spans = []
    for path in sorted(Path(trace_dir).glob("forward-*.txt")):
        for line in path.read_text().splitlines():
            a, b, n = line.split()
            spans.append((float(a), float(b), int(n)))
    return sorted(spans)


# ---- reporting --------------------------------------------------------------------------


class CpuMeter:
    """CPU seconds used by this process and every process it started (a local Ray's GCS,
    raylet, workers, actors) inside a ``with`` block.

    Processes are polled every ``interval`` seconds, so an actor that exits before the block
    ends still counts up to its last poll (Ray reaps its workers without adding their time to
    a parent's children totals). On a busy box this separates the pipeline's own overhead
    (CPU seconds) from CPU share lost to other load (wall seconds).
    """

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.seconds = 0.0
        self._base: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _snapshot() -> dict[tuple[int, float], float]:
        """(pid, start time) -> user + system CPU seconds of this process and its
        descendants, read from ``/proc`` (Linux; empty elsewhere)."""
        procs = _processes()
        return {(pid, procs[pid][2]): procs[pid][1] for pid in _tree(procs, os.getpid())}

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._last |= self._snapshot()

    def __enter__(self) -> CpuMeter:
        self._base = self._snapshot()
        self._last = dict(self._base)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._last |= self._snapshot()
        self.seconds = sum(v - self._base.get(k, 0.0) for k, v in self._last.items())


def _processes() -> dict[int, tuple[int, float, float]]:
    """pid -> (parent pid, user + system CPU seconds, start time) of every process."""
    tick = os.sysconf("SC_CLK_TCK")
    procs: dict[int, tuple[int, float, float]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue  # exited meanwhile
            fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
            cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            procs[int(entry.name)] = (int(fields[1]), cpu, float(fields[19]))
    return procs


def _tree(procs: dict[int, tuple[int, float, float]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and every process it started, still running (Linux; empty elsewhere)."""
    return _tree(_processes(), root)


def pss_bytes(pid: int) -> int:
    """The process's proportional set size; 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def map_workers() -> dict[str, str]:
    """Actor id -> class name of the Ray Data map actors so far. The name shows operator
    fusion: ``MapWorker(MapBatches(Preprocess)->MapBatches(Encode))`` means preprocessing ran
    inside the model actor rather than in CPU tasks."""
    from ray._private.state import actors

    return {
        actor_id: info["ActorClassName"]
        for actor_id, info in actors().items()
        if info["ActorClassName"].startswith("MapWorker(")
    }


def load_average() -> float:
    return os.getloadavg()[0]


def number(value: float) -> str:
    """2 decimals; whole numbers from 1000 up; 2 significant digits below 0.1."""
    if value == 0 or 0.1 <= abs(value) < 1000:
        return f"{value:.2f}"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.2g}"


def print_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], widths: Sequence[int]
) -> None:
    def fmt(values: Sequence[Any]) -> str:
        cells = []
        for i, (v, w) in enumerate(zip(values, widths, strict=True)):
            text = number(v) if isinstance(v, float) else str(v)
            cells.append(text.ljust(w) if i == 0 else text.rjust(w))
        return "".join(cells)

    print(fmt(header))
    for row in rows:
        print(fmt(row))
