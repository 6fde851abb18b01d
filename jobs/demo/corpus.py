"""Small, deterministic tri-modal corpus (image / audio / text) written to local disk.

Used by ``mmfp demo``, the tests and the benchmarks, so that nothing needs the network and
every run sees the same bytes. Each of the ten classes has a shape and colour (image), a pitch
and timbre (audio) and a vocabulary (caption), so all three modalities carry the label and a
contrastive model has something real to learn. Per-sample randomness comes from a NumPy
Generator seeded by (seed, writer, index): same seed, same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import soundfile as sf

CLASSES = (
    "circle", "square", "triangle", "star", "cross", "ring", "diamond", "bars", "dots", "wave",
)  # fmt: skip
# (name, BGR) per class: the image colour and the caption's colour word agree.
COLOURS = (
    ("red", (40, 40, 220)), ("green", (60, 200, 60)), ("blue", (220, 90, 30)),
    ("yellow", (40, 220, 230)), ("magenta", (200, 50, 200)), ("cyan", (220, 220, 50)),
    ("orange", (20, 140, 250)), ("purple", (150, 40, 110)), ("white", (245, 245, 245)),
    ("pink", (180, 150, 255)),
)  # fmt: skip
BACKGROUNDS = ("dark", "grey", "noisy", "plain", "dim")
SIZES = ("tiny", "small", "medium", "large", "big")
TONES = ("low", "low", "deep", "mid", "mid", "warm", "bright", "bright", "high", "high")
TEMPLATES = (
    "a {colour} {shape} on a {bg} background",
    "{shape} drawing, {size}",
    "a {size} {colour} {shape}",
    "picture of a {shape} in {colour}",
    "{colour} {shape} with a {tone} tone",
    "the {shape}: {size} and {colour}",
)
MANIFEST_COLUMNS = ("id", "text", "image", "audio", "label", "group")
SAMPLE_RATE = 16000
IMAGE_EXTS = ("jpg", "png")
AUDIO_EXTS = ("wav", "flac")
_JPEG_QUALITY = 90
# Salts keep the writers' sample streams apart even when they share a seed.
_DIR, _MANIFEST, _WDS, _BROKEN = 11, 23, 37, 41


def _rng(seed: int, salt: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, salt, index])


def _polygon(cx: float, cy: float, radii: list[float], phase: float) -> np.ndarray:
    angles = phase + np.linspace(0, 2 * np.pi, len(radii), endpoint=False)
    pts = np.stack([cx + np.cos(angles) * radii, cy + np.sin(angles) * radii], axis=1)
    return np.round(pts).astype(np.int32).reshape(-1, 1, 2)


def make_image(rng: np.random.Generator, class_index: int, size: int = 64) -> np.ndarray:
    """Draw the class shape in the class colour at a random place and scale on a noisy
    background; returns an (H, W, 3) uint8 BGR array."""
    bg = rng.integers(10, 110, size=3)
    img = np.clip(bg + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    jitter = np.array(COLOURS[class_index][1]) + rng.integers(-25, 26, 3)
    colour = tuple(int(v) for v in np.clip(jitter, 0, 255))
    r = size * rng.uniform(0.18, 0.32)
    cx, cy = (rng.uniform(r + 2, size - r - 2) for _ in range(2))
    c, ri, t = (round(cx), round(cy)), round(r), max(1, round(r / 4))
    shape = CLASSES[class_index]
    if shape == "circle":
        cv2.circle(img, c, ri, colour, -1, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(img, (c[0] - ri, c[1] - ri), (c[0] + ri, c[1] + ri), colour, -1)
    elif shape == "triangle":
        cv2.fillPoly(img, [_polygon(cx, cy, [r] * 3, -np.pi / 2 + rng.uniform(-0.3, 0.3))], colour)
    elif shape == "star":
        cv2.fillPoly(img, [_polygon(cx, cy, [r, r * 0.45] * 5, rng.uniform(0, 2 * np.pi))], colour)
    elif shape == "cross":
        cv2.line(img, (c[0] - ri, c[1]), (c[0] + ri, c[1]), colour, t + 1)
        cv2.line(img, (c[0], c[1] - ri), (c[0], c[1] + ri), colour, t + 1)
    elif shape == "ring":
        cv2.circle(img, c, ri, colour, t, cv2.LINE_AA)
    elif shape == "diamond":
        cv2.fillPoly(img, [_polygon(cx, cy, [r, r * 0.7] * 2, -np.pi / 2)], colour)
    elif shape == "bars":
        for x in np.linspace(c[0] - ri, c[0] + ri, 4).round().astype(int).tolist():
            cv2.rectangle(img, (x - t // 2, c[1] - ri), (x + t // 2, c[1] + ri), colour, -1)
    elif shape == "dots":
        step = round(r * 0.75)
        for dx in (-step, 0, step):
            for dy in (-step, 0, step):
                cv2.circle(img, (c[0] + dx, c[1] + dy), t, colour, -1)
    else:  # wave
        xs = np.linspace(c[0] - ri, c[0] + ri, 40)
        ys = c[1] + np.sin((xs - xs[0]) / max(ri, 1) * 2 * np.pi + rng.uniform(0, 6)) * r / 2
        pts = np.stack([xs, ys], axis=1).round().astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(img, [pts], False, colour, t, cv2.LINE_AA)
    return img


def make_audio(
    rng: np.random.Generator, class_index: int, sample_rate: int = SAMPLE_RATE, seconds: float = 0.5
) -> np.ndarray:
    """A harmonic tone whose pitch (220 Hz * 2**(k/4)) and timbre identify the class, with
    a per-sample harmonic mix, envelope, detune and noise; float32 mono in [-1, 1]."""
    n = round(sample_rate * seconds)
    t = np.arange(n) / sample_rate
    f0 = 220.0 * 2 ** (class_index / 4) * rng.uniform(0.985, 1.015)
    # Class timbre: odd-heavy, even-heavy or bright spectra, jittered per sample.
    base = np.array([1.0, 0.5, 0.33, 0.25, 0.2]) ** (1 + (class_index % 3) / 2)
    if class_index % 2:
        base[1::2] *= 0.2
    weights = base * rng.uniform(0.6, 1.4, base.size)
    phases = rng.uniform(0, 2 * np.pi, base.size)
    harmonics = np.arange(1, base.size + 1)[:, None]
    wave = (weights[:, None] * np.sin(2 * np.pi * f0 * harmonics * t + phases[:, None])).sum(0)
    attack = rng.uniform(0.005, 0.05)
    env = np.minimum(t / attack, 1.0) * np.exp(-t * rng.uniform(1.0, 6.0))
    y = wave * env + rng.normal(0, 0.01, n)
    y = y / max(np.abs(y).max(), 1e-9) * rng.uniform(0.5, 0.9)
    return np.clip(y, -1.0, 1.0).astype(np.float32)


def make_caption(rng: np.random.Generator, class_index: int) -> str:
    """A short caption naming the class's shape and colour in one of a few templates."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return template.format(
        shape=CLASSES[class_index],
        colour=COLOURS[class_index][0],
        bg=BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
        size=SIZES[rng.integers(len(SIZES))],
        tone=TONES[class_index],
    )


def _encode_image(img: np.ndarray, ext: str) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY] if ext in ("jpg", "jpeg") else []
    ok, buf = cv2.imencode("." + ext, img, params)
    if not ok:
        raise ValueError(f"OpenCV cannot encode .{ext}")
    return buf.tobytes()


def _encode_audio(y: np.ndarray, ext: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sample_rate, format=ext.upper(), subtype="PCM_16")
    return buf.getvalue()


def _check_ext(value: str, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        raise ValueError(f"{what}={value!r} is not supported; valid: {', '.join(valid)}")


def write_directory_source(
    root: Path,
    *,
    n_per_class: int,
    seed: int = 0,
    class_folders: bool = True,
    image_ext: str = "jpg",
    audio_ext: str = "wav",
) -> list[str]:
    """Write ``root/<class>/<stem>.{img,audio,txt}`` (or flat without class folders).

    Stems (``d00007``) are unique across the source. Every 10th sample lacks audio and every
    20th lacks the image, so readers meet partial samples; text is always there.
    """
    _check_ext(image_ext, IMAGE_EXTS, "image_ext")
    _check_ext(audio_ext, AUDIO_EXTS, "audio_ext")
    root = Path(root)
    stems: list[str] = []
    for k, name in enumerate(CLASSES):
        folder = root / name if class_folders else root
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(n_per_class):
            i = k * n_per_class + j
            rng, stem = _rng(seed, _DIR, i), f"d{i:05d}"
            img, audio, text = make_image(rng, k), make_audio(rng, k), make_caption(rng, k)
            if i % 20 != 7:
                (folder / f"{stem}.{image_ext}").write_bytes(_encode_image(img, image_ext))
            if i % 10 != 3:
                (folder / f"{stem}.{audio_ext}").write_bytes(_encode_audio(audio, audio_ext))
            (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
            stems.append(stem)
    return stems


def write_manifest_source(
    root: Path, *, n: int, seed: int = 1, fmt: Literal["jsonl", "csv", "parquet"] = "jsonl"
) -> Path:
    """Write PNG + FLAC media under ``root/media/`` and ``root/manifest.<fmt>`` with columns
    id, text, image, audio, label, group (groups of 3 consecutive samples)."""
    _check_ext(fmt, ("jsonl", "csv", "parquet"), "fmt")
    root = Path(root)
    (root / "media").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for i in range(n):
        rng, sid, k = _rng(seed, _MANIFEST, i), f"m{i:05d}", i % len(CLASSES)
        img, audio, text = make_image(rng, k), make_audio(rng, k), make_caption(rng, k)
        (root / "media" / f"{sid}.png").write_bytes(_encode_image(img, "png"))
        (root / "media" / f"{sid}.flac").write_bytes(_encode_audio(audio, "flac"))
        values = (sid, text, f"media/{sid}.png", f"media/{sid}.flac", CLASSES[k], f"g{i // 3:04d}")
        rows.append(dict(zip(MANIFEST_COLUMNS, values, strict=True)))
    path, columns = root / f"manifest.{fmt}", list(MANIFEST_COLUMNS)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    elif fmt == "csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in columns})
        pq.write_table(table, path)
    return path


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_webdataset_source(
    root: Path, *, n: int, seed: int = 2, shard_size: int = 25
) -> list[Path]:
    """Write WebDataset shards ``root/shard-%06d.tar``: ``<key>.jpg/.wav/.txt/.cls`` per
    sample, members of one sample contiguous, fixed tar metadata so shards are byte-stable."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    for start in range(0, n, shard_size):
        path = root / f"shard-{len(shards):06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + shard_size, n)):
                rng, key, k = _rng(seed, _WDS, i), f"w{i:05d}", i % len(CLASSES)
                img, audio, text = make_image(rng, k), make_audio(rng, k), make_caption(rng, k)
                _tar_add(tar, f"{key}.jpg", _encode_image(img, "jpg"))
                _tar_add(tar, f"{key}.wav", _encode_audio(audio, "wav"))
                _tar_add(tar, f"{key}.txt", text.encode("utf-8"))
                _tar_add(tar, f"{key}.cls", CLASSES[k].encode("utf-8"))
        shards.append(path)
    return shards


def _huge_png(img: np.ndarray, width: int = 100_000, height: int = 100_000) -> bytes:
    """A real PNG whose IHDR claims width x height, with a valid CRC so only a pixel bound
    (not a checksum) can refuse it."""
    data = bytearray(_encode_image(img, "png"))
    assert data[12:16] == b"IHDR"
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def write_broken_inputs(root: Path) -> dict[str, str]:
    """Write a flat directory of bad inputs (plus 3 good samples) and ``bad_manifest.jsonl``.

    Returns {input: expected error class from ``pipelines.errors``}; the input is the path
    relative to ``root`` (a stem without extension for per-sample problems) or
    ``bad_manifest.jsonl#<id>`` for manifest rows. ``bad_manifest.jsonl`` itself is listed as
    ``UnsupportedFile`` because a directory source over ``root`` sees it too.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = _rng(0, _BROKEN, 0)
    for i, k in enumerate((0, 3, 6)):  # good samples, so a build over root yields rows
        (root / f"good_{i:03d}.jpg").write_bytes(_encode_image(make_image(rng, k), "jpg"))
        (root / f"good_{i:03d}.txt").write_text(make_caption(rng, k), encoding="utf-8")
        if i:
            (root / f"good_{i:03d}.wav").write_bytes(_encode_audio(make_audio(rng, k), "wav"))
    for ext in ("jpg", "txt"):  # byte-identical copy of good_000 under another stem
        shutil.copyfile(root / f"good_000.{ext}", root / f"good_000_copy.{ext}")
    jpeg = _encode_image(make_image(rng, 1), "jpg")
    wav = bytearray(_encode_audio(make_audio(rng, 4), "wav"))
    # Keep the RIFF/WAVE magic but corrupt the fmt chunk: unknown codec, 0 channels, 0 Hz.
    wav[12:36] = b"fmt \x10\x00\x00\x00\xff\xff" + bytes(14)
    long = 0.1 * np.sin(2 * np.pi * 440 * np.arange(61 * 8000) / 8000)
    bad: dict[str, tuple[bytes, str]] = {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "TruncatedImage"),
        "empty.png": (b"", "EmptyFile"),
        "huge.png": (_huge_png(make_image(rng, 2, size=16)), "ImageTooLarge"),
        "garbage.jpg": (b"NOTANIMAGE" + rng.bytes(2048), "ImageDecodeError"),
        "bad_header.wav": (bytes(wav), "AudioDecodeError"),
        "too_long.wav": (_encode_audio(long.astype(np.float32), "wav", 8000), "AudioTooLong"),
        "silent.wav": (_encode_audio(np.zeros(0, np.float32), "wav"), "EmptyAudio"),
        "latin1.txt": (b"\xff\xfe caf\xe9", "TextDecodeError"),
        "blank.txt": (b"  \n\t \n", "EmptyText"),
        "too_long.txt": (b"a" * 20_001, "TextTooLong"),
        "notes.xyz": (b"not a modality\n", "UnsupportedFile"),
        "ambiguous.jpg": (_encode_image(make_image(rng, 5), "jpg"), "AmbiguousSample"),
        "ambiguous.png": (_encode_image(make_image(rng, 6), "png"), "AmbiguousSample"),
    }
    for name, (data, _) in bad.items():
        (root / name).write_bytes(data)
    rows: list[tuple[dict[str, Any], str | None]] = [  # (row, expected error)
        ({"id": "ok_a", "text": "manifest row for a red circle", "image": "good_000.jpg"}, None),
        ({"id": "ok_b", "text": "manifest row with sound", "audio": "good_001.wav"}, None),
        ({"id": "escape", "text": "escapes the root", "image": "../out.png"}, "UnsafePath"),
        ({"id": "absolute", "text": "absolute path", "image": "/etc/passwd"}, "UnsafePath"),
        ({"id": "missing", "text": "not there", "image": "missing.png"}, "MissingFile"),
        ({"id": "nothing", "text": None, "image": None, "audio": None}, "BadManifestRow"),
        ({"id": "trunc", "text": "a cut jpeg", "image": "truncated.jpg"}, "TruncatedImage"),
    ]
    manifest = "".join(json.dumps(r) + "\n" for r, _ in rows)
    (root / "bad_manifest.jsonl").write_text(manifest, encoding="utf-8")
    expected = {n: e for n, (_, e) in bad.items() if not n.startswith("ambiguous.")}
    expected |= {"bad_manifest.jsonl": "UnsupportedFile", "ambiguous": "AmbiguousSample"}
    expected["good_000_copy"] = "DuplicateSample"
    expected |= {f"bad_manifest.jsonl#{r['id']}": e for r, e in rows if e}
    return expected


def write_demo_corpus(root: Path, *, n_per_class: int = 20, seed: int = 0) -> dict[str, Any]:
    """Write every kind of source ``mmfp demo`` shows under one root; returns their paths
    (as strings, so the dict prints as JSON) and the broken inputs' expected errors."""
    root = Path(root)
    n = n_per_class * len(CLASSES)
    stems = write_directory_source(root / "photos", n_per_class=n_per_class, seed=seed)
    manifest = write_manifest_source(root / "catalog", n=n, seed=seed + 1)
    shards = write_webdataset_source(root / "shards", n=n, seed=seed + 2)
    expected = write_broken_inputs(root / "broken")
    return {
        "root": str(root),
        "photos": str(root / "photos"),
        "catalog": str(manifest),
        "shards": [str(p) for p in shards],
        "broken": str(root / "broken"),
        "counts": {"photos": len(stems), "catalog": n, "shards": n},
        "expected_errors": expected,
    }
