"""Near-duplicate benchmark (issue 16): precision and recall on injected copies, and the
semantic search's throughput and memory at scale.

    python benchmarks/neardup.py [--samples 600] [--copy-fraction 0.25] [--corpus synthetic]
                                 [--embeddings 100000,1000000] [--dim 384] [--cores N]

Part 1 writes a manifest corpus of distinct samples (``--corpus synthetic``: the demo's
shapes, tones and random captions, several samples per class; ``spoken-digits``: the real
corpus next to this checkout, whose images repeat across samples) and injects copies of a
fraction of them: the image resized and re-encoded as JPEG at a random quality, the audio
resampled to another rate with its gain changed, the caption with its whitespace changed.
It builds the store, runs each method alone and all of them together (``match: all``) and
prints precision and recall of the pairs found against the true ones: a copy and its
original, and rows whose original media are the same bytes (or whose captions are the same
text): the real corpus reuses images and captions. A pair of two different samples of one
class counts against precision.

Part 2 (``--embeddings``) runs the semantic search (k-means clusters, pairs within them, as
Ray tasks) over synthetic clustered unit vectors with injected near copies and prints
rows/s, peak memory of every process (PSS) and recall of the injected pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from benchmarks._common import load_average, local_ray, process_tree, pss_bytes  # noqa: E402

MODALITIES = ("image", "audio", "text")
SPOKEN_DIGITS = ROOT.parent / "shared" / "data" / "spoken-digits-dev"
VOCABULARY = """river stone quiet amber signal orchard lantern copper meadow thunder velvet
harbor glacier ember whisper canyon falcon mosaic prairie cobalt willow tundra beacon saffron
marble cinder lagoon zephyr granite juniper"""
WORDS = VOCABULARY.split()


def caption(rng: np.random.Generator) -> str:
    """Ten random words: different samples share words, not sentences."""
    return " ".join(rng.choice(WORDS, size=10))


def respaced(rng: np.random.Generator, text: str) -> str:
    """The same words with changed whitespace: doubled spaces, a tab, a newline, padding."""
    gaps = [rng.choice([" ", "  ", "\t", " \n "]) for _ in text.split()]
    return "  " + "".join(w + g for w, g in zip(text.split(), gaps, strict=True))


def copied_image(rng: np.random.Generator, data: bytes) -> bytes:
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    scale = rng.uniform(0.75, 1.5)
    height, width = pixels.shape[:2]
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    resized = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    ok, out = cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(50, 96))])
    return out.tobytes()


def copied_audio(rng: np.random.Generator, data: bytes) -> bytes:
    import librosa
    import soundfile as sf

    wave, rate = sf.read(io.BytesIO(data), dtype="float32")
    target = int(rng.choice([11025, 16000, 22050, 44100]))
    moved = librosa.resample(wave, orig_sr=rate, target_sr=target) * rng.uniform(0.3, 1.0)
    buf = io.BytesIO()
    sf.write(buf, np.clip(moved, -1, 1), target, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def melody(rng: np.random.Generator, k: int) -> np.ndarray:
    """Four of the demo's tones, the first of class ``k``'s pitch and timbre and the others
    at random: a recording of its own, like two people saying one word (the demo's single
    tones of one class are near copies of each other by design)."""
    from jobs.demo.corpus import CLASSES, make_audio

    classes = [k, *rng.integers(len(CLASSES), size=3).tolist()]
    return np.concatenate([make_audio(rng, c, seconds=0.25) for c in classes])


def originals(kind: str, n: int, seed: int) -> list[dict]:
    """``n`` distinct samples: id, label, caption and the media's bytes and extensions."""
    if kind == "spoken-digits":
        rows = [json.loads(line) for line in (SPOKEN_DIGITS / "manifest.jsonl").open()][:n]
        return [
            {
                "id": r["id"],
                "label": r["label"],
                "text": r["text"],
                "image": (SPOKEN_DIGITS / r["image"]).read_bytes(),
                "audio": (SPOKEN_DIGITS / r["audio"]).read_bytes(),
                "image_ext": "png",
                "audio_ext": "wav",
            }
            for r in rows
        ]
    from jobs.demo.corpus import CLASSES, _encode_audio, _encode_image, make_image

    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        k = i % len(CLASSES)
        out.append(
            {
                "id": f"s{i:05d}",
                "label": CLASSES[k],
                "text": caption(rng),
                "image": _encode_image(make_image(rng, k), "png"),
                "audio": _encode_audio(melody(rng, k), "wav"),
                "image_ext": "png",
                "audio_ext": "wav",
            }
        )
    return out


def write_corpus(root: Path, kind: str, n: int, fraction: float, seed: int) -> dict[str, dict]:
    """The corpus under ``root`` (manifest.jsonl + media/); returns each manifest id's
    content keys: per modality, what makes two rows the same (the original's bytes, the
    normalised caption), a copy keeping its original's. Every row is its own group, so a
    copy may land in another split."""
    from pipelines.fingerprints import normalise_text

    rng = np.random.default_rng(seed)
    rows = originals(kind, n, seed)
    keys = {
        r["id"]: {
            "image": hashlib.sha256(r["image"]).hexdigest(),
            "audio": hashlib.sha256(r["audio"]).hexdigest(),
            "text": normalise_text(r["text"]),
        }
        for r in rows
    }
    copies = sorted(rng.choice(len(rows), size=round(n * fraction), replace=False).tolist())
    for i in copies:
        base = rows[i]
        copy = dict(base, id=f"{base['id']}-copy", image_ext="jpg")
        keys[copy["id"]] = keys[base["id"]]
        copy.update(
            text=respaced(rng, base["text"]),
            image=copied_image(rng, base["image"]),
            audio=copied_audio(rng, base["audio"]),
        )
        rows.append(copy)
    (root / "media").mkdir(parents=True, exist_ok=True)
    with (root / "manifest.jsonl").open("w") as f:
        for row in rows:
            image = f"media/{row['id']}.{row['image_ext']}"
            audio = f"media/{row['id']}.{row['audio_ext']}"
            (root / image).write_bytes(row["image"])
            (root / audio).write_bytes(row["audio"])
            entry = {"id": row["id"], "text": row["text"], "image": image, "audio": audio}
            entry |= {"label": row["label"], "group": row["id"]}
            f.write(json.dumps(entry) + "\n")
    return keys


def same_content(stored: dict[str, dict], modalities: tuple[str, ...]) -> set[frozenset]:
    """Pairs of stored samples whose content keys agree in every one of ``modalities``."""
    groups: dict[tuple, list[str]] = {}
    for sample_id, keys in stored.items():
        groups.setdefault(tuple(keys[m] for m in modalities), []).append(sample_id)
    return {frozenset(p) for ids in groups.values() for p in itertools.combinations(ids, 2)}


def score(found: set[frozenset], truth: set[frozenset]) -> tuple[float, float]:
    """(precision, recall) of found pairs against the injected pairs."""
    hits = len(found & truth)
    return (hits / len(found) if found else 1.0), (hits / len(truth) if truth else 1.0)


def accuracy(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Part 1: per method and combined, precision/recall/pairs/seconds."""
    from features.tables import TableStore
    from pipelines.build import build
    from pipelines.neardup import NearDupSpec, find_near_duplicates
    from pipelines.spec import parse_spec

    keys = write_corpus(work / "corpus", args.corpus, args.samples, args.copy_fraction, args.seed)
    raw = {
        "name": "neardup-bench",
        "sources": [
            {"kind": "manifest", "uri": str(work / "corpus" / "manifest.jsonl"), "name": "b"}
        ],
        "store": {"uri": str(work / "store")},
    }
    spec = parse_spec(raw, origin="benchmarks")
    build(spec)
    store = TableStore(spec.store.uri)
    samples = store.to_arrow("samples", columns=["sample_id", "source_uri"])
    stored = {  # a manifest row's input is <manifest>#<id>
        sid: keys[uri.rsplit("#", 1)[1]]
        for sid, uri in zip(*(c.to_pylist() for c in samples.columns), strict=True)
    }
    if len(stored) != len(keys):
        raise SystemExit(f"only {len(stored)} of {len(keys)} corpus rows were stored")
    runs = {m: {"methods": [{"method": m}], "match": "any"} for m in ("image", "audio", "text")}
    runs["all (image, audio, text)"] = {
        "methods": [{"method": m} for m in ("image", "audio", "text")],
        "match": "all",
    }
    out = {}
    for name, section in runs.items():
        t0 = time.perf_counter()
        result = find_near_duplicates(store, NearDupSpec.model_validate(section), spec.decode)
        seconds = time.perf_counter() - t0
        pairs = result.pairs
        found = {
            frozenset(p)
            for p in zip(pairs.column("a").to_pylist(), pairs.column("b").to_pylist(), strict=True)
        }
        marks = result.marks
        marked = {
            frozenset(p)
            for p in zip(
                marks.column("sample_id").to_pylist(),
                marks.column("duplicate_of").to_pylist(),
                strict=True,
            )
        }
        truth = same_content(stored, MODALITIES if name.startswith("all") else (name,))
        precision, recall = score(found, truth)
        out[name] = {
            "pairs": len(found),
            "precision": precision,
            "recall": recall,
            "marked_correctly": len(marked & truth),
            "seconds": seconds,
        }
    injected = sum(k.endswith("-copy") for k in keys)
    out["_corpus"] = {"samples": samples.num_rows, "injected": injected}
    return out


def clustered_vectors(rows: int, dim: int, copies: int, seed: int) -> tuple[np.ndarray, list]:
    """Unit vectors around ``rows // 500`` centres (spread like real embeddings) with
    ``copies`` rows replaced by near copies of others (cosine ~0.995)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, rows // 500), dim)).astype(np.float32)
    vectors = (
        centres[rng.integers(len(centres), size=rows)]
        + rng.standard_normal((rows, dim), dtype=np.float32) * 0.6
    )
    pick = rng.choice(rows, size=2 * copies, replace=False)
    sources, targets = pick[:copies], pick[copies:]
    vectors[targets] = (
        vectors[sources] + rng.standard_normal((copies, dim), dtype=np.float32) * 0.05
    )
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, [
        frozenset((f"v{a:08d}", f"v{b:08d}")) for a, b in zip(sources, targets, strict=True)
    ]


class PeakMemory:
    """Peak PSS of this process and every process it started, polled in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.peak = max(self.peak, sum(pss_bytes(p) for p in process_tree(os.getpid())))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def semantic_scale(rows: int, dim: int, seed: int) -> dict[str, float]:
    """Part 2 at one size: the pair search over Ray Data blocks, timed from the blocks in the
    object store to the pairs on the driver."""
    import pyarrow as pa
    import ray.data

    from pipelines.pairs import cosine_pairs

    vectors, truth = clustered_vectors(rows, dim, copies=max(1, rows // 1000), seed=seed)
    ids = pa.array([f"v{i:08d}" for i in range(rows)])
    prints = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
    table = pa.table({"sample_id": ids, "fingerprint": prints.cast(pa.list_(pa.float32()))})
    del vectors, prints
    ds = ray.data.from_arrow_refs(
        [ray.put(table.slice(i, 50_000)) for i in range(0, rows, 50_000)]
    ).materialize()
    del table
    with PeakMemory() as memory:
        t0 = time.perf_counter()
        pairs = cosine_pairs(ds, 0.98, cluster_rows=2000, seed=seed)
        seconds = time.perf_counter() - t0
    found = {
        frozenset(p)
        for p in zip(pairs.column("a").to_pylist(), pairs.column("b").to_pylist(), strict=True)
    }
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "peak_mib": memory.peak / 2**20,
        "recall": len(found & set(truth)) / len(truth),
        "pairs": len(found),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=600, help="distinct samples (600)")
    parser.add_argument("--copy-fraction", type=float, default=0.25, help="share copied (0.25)")
    parser.add_argument("--corpus", choices=["synthetic", "spoken-digits"], default="synthetic")
    parser.add_argument("--embeddings", default="", help="sizes for part 2, e.g. 100000,1000000")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-accuracy", action="store_true", help="only part 2")
    parser.add_argument("--json", action="store_true", help="the results as one JSON line last")
    args = parser.parse_args()
    if args.corpus == "spoken-digits" and not SPOKEN_DIGITS.exists():
        parser.error(f"--corpus spoken-digits needs {SPOKEN_DIGITS}")
    results: dict = {"load_average": load_average()}
    with local_ray(args.cores), tempfile.TemporaryDirectory(prefix="mmfp-neardup-") as tmp:
        if not args.skip_accuracy:
            results["accuracy"] = accuracy(args, Path(tmp))
        sizes = [int(s) for s in args.embeddings.split(",") if s]
        results["semantic"] = [semantic_scale(n, args.dim, args.seed) for n in sizes]
    accuracy_rows = results.get("accuracy", {})
    corpus = accuracy_rows.pop("_corpus", None)
    if corpus:
        print(
            f"corpus {args.corpus}: {corpus['samples']} samples, "
            f"{corpus['injected']} injected copies"
        )
    for name, r in accuracy_rows.items():
        print(
            f"{name}: precision {r['precision']:.3f} recall {r['recall']:.3f} "
            f"({r['pairs']} pairs, {r['marked_correctly']} marked correctly, {r['seconds']:.1f} s)"
        )
    for r in results["semantic"]:
        print(
            f"semantic {r['rows']} x {args.dim}: {r['rows_per_s']:.0f} rows/s "
            f"({r['seconds']:.1f} s), "
            f"peak {r['peak_mib']:.0f} MiB, recall of injected pairs {r['recall']:.3f}"
        )
    if args.json:
        results["accuracy"] = accuracy_rows
        print(json.dumps(results))


if __name__ == "__main__":
    main()
