"""The synthetic corpus is what every other test and the demo stand on: it must be
byte-deterministic, decode cleanly where it is good, and be broken exactly as promised."""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile
import zlib
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from jobs.demo import corpus as synthetic
from pipelines import errors

COLUMNS = ["id", "text", "image", "audio", "label", "group"]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_manifest(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize(
    "write",
    [
        lambda r: synthetic.write_directory_source(r, n_per_class=2),
        lambda r: synthetic.write_directory_source(
            r, n_per_class=1, class_folders=False, image_ext="png", audio_ext="flac"
        ),
        lambda r: synthetic.write_manifest_source(r, n=7, fmt="jsonl"),
        lambda r: synthetic.write_manifest_source(r, n=7, fmt="csv"),
        lambda r: synthetic.write_manifest_source(r, n=7, fmt="parquet"),
        lambda r: synthetic.write_webdataset_source(r, n=12, shard_size=5),
        synthetic.write_broken_inputs,
    ],
    ids=["dir", "dir-flat", "jsonl", "csv", "parquet", "wds", "broken"],
)
def test_writers_are_byte_deterministic(tmp_path, write):
    write(tmp_path / "a")
    write(tmp_path / "b")
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a
    assert a == b


def test_seed_changes_content(tmp_path):
    synthetic.write_directory_source(tmp_path / "a", n_per_class=1, seed=0)
    synthetic.write_directory_source(tmp_path / "b", n_per_class=1, seed=1)
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "b")


def test_make_functions_shapes_and_ranges():
    rng = np.random.default_rng(0)
    for k in range(len(synthetic.CLASSES)):
        img = synthetic.make_image(rng, k, size=48)
        assert img.shape == (48, 48, 3)
        assert img.dtype == np.uint8
        y = synthetic.make_audio(rng, k)
        assert y.dtype == np.float32
        assert y.shape == (8000,)
        assert np.abs(y).max() <= 1.0
        assert np.abs(y).max() > 0.1
        caption = synthetic.make_caption(rng, k)
        assert synthetic.CLASSES[k] in caption


def test_audio_pitch_is_class_specific():
    """The dominant frequency tracks 220 Hz * 2**(k/4): audio alone carries the label."""
    for k in range(len(synthetic.CLASSES)):
        y = synthetic.make_audio(np.random.default_rng(k), k)
        spectrum = np.abs(np.fft.rfft(y * np.hanning(y.size)))
        freqs = np.fft.rfftfreq(y.size, 1 / synthetic.SAMPLE_RATE)
        expected = 220 * 2 ** (k / 4)
        peak = freqs[np.argmax(spectrum)]
        assert abs(peak - expected) / expected < 0.05, (k, peak, expected)


def test_image_colour_is_class_specific():
    """The shape's pixels (far from the background) sit near the class colour."""
    for k, (_, bgr) in enumerate(synthetic.COLOURS):
        img = synthetic.make_image(np.random.default_rng(k), k).astype(int)
        dist = np.abs(img - np.array(bgr)).sum(-1)
        assert (dist < 90).sum() > 20, synthetic.CLASSES[k]


def test_directory_source_layout_and_decoding(tmp_path):
    stems = synthetic.write_directory_source(tmp_path, n_per_class=3)
    assert len(stems) == len(set(stems)) == 30
    files = defaultdict(dict)
    for p in tmp_path.rglob("*"):
        if p.is_file():
            files[p.stem][p.suffix] = p
            assert p.parent.name in synthetic.CLASSES
    assert set(files) == set(stems)
    for parts in files.values():
        assert ".txt" in parts
        label = parts[".txt"].parent.name
        assert label in parts[".txt"].read_text("utf-8")
        if ".jpg" in parts:
            img = cv2.imread(str(parts[".jpg"]))
            assert img.shape == (64, 64, 3)
        if ".wav" in parts:
            y, sr = sf.read(parts[".wav"], dtype="float32")
            assert sr == 16000
            assert y.shape == (8000,)
    assert sum(".wav" not in p for p in files.values()) == 3  # every 10th lacks audio
    assert sum(".jpg" not in p for p in files.values()) == 2  # every 20th lacks the image


def test_directory_source_rejects_unknown_ext(tmp_path):
    with pytest.raises(ValueError, match="valid: jpg, png"):
        synthetic.write_directory_source(tmp_path, n_per_class=1, image_ext="gif")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_manifest_source(tmp_path, fmt):
    path = synthetic.write_manifest_source(tmp_path, n=10, fmt=fmt)
    assert path == tmp_path / f"manifest.{fmt}"
    rows = read_manifest(path)
    assert len(rows) == 10
    assert [list(r) for r in rows] == [COLUMNS] * 10
    assert [r["id"] for r in rows] == [f"m{i:05d}" for i in range(10)]
    assert [r["group"] for r in rows[:4]] == ["g0000", "g0000", "g0000", "g0001"]
    for r in rows:
        assert r["label"] in synthetic.CLASSES
        assert r["label"] in r["text"]
        assert r["image"].endswith(".png")
        assert (tmp_path / r["image"]).is_file()
        assert cv2.imread(str(tmp_path / r["image"])).shape == (64, 64, 3)
        info = sf.info(tmp_path / r["audio"])
        assert info.format == "FLAC"
        assert (info.samplerate, info.frames) == (16000, 8000)


def test_webdataset_shards(tmp_path):
    shards = synthetic.write_webdataset_source(tmp_path, n=12, shard_size=5)
    assert [p.name for p in shards] == [f"shard-{i:06d}.tar" for i in range(3)]
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in shards:
        with tarfile.open(shard) as tar:
            keys_in_order = []
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples[key][ext] = tar.extractfile(m).read()
                if not keys_in_order or keys_in_order[-1] != key:
                    keys_in_order.append(key)
            assert len(keys_in_order) == len(set(keys_in_order))  # samples are contiguous
    assert sorted(samples) == [f"w{i:05d}" for i in range(12)]
    for parts in samples.values():
        assert set(parts) == {"jpg", "wav", "txt", "cls"}
        label = parts["cls"].decode()
        assert label in synthetic.CLASSES
        assert label in parts["txt"].decode("utf-8")
        img = cv2.imdecode(np.frombuffer(parts["jpg"], np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (64, 64, 3)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    return root, synthetic.write_broken_inputs(root)


def test_broken_expected_errors_are_real_error_classes(broken):
    root, expected = broken
    for key, name in expected.items():
        assert issubclass(getattr(errors, name), errors.InputError), name
        path = key.split("#")[0]
        if "#" in key or "." in path:
            assert (root / path).is_file(), key
        else:  # a sample stem
            assert list(root.glob(f"{path}.*")), key
    needed = {
        "TruncatedImage", "EmptyFile", "ImageTooLarge", "ImageDecodeError", "AudioDecodeError",
        "AudioTooLong", "EmptyAudio", "TextDecodeError", "EmptyText", "TextTooLong",
        "UnsupportedFile", "AmbiguousSample", "UnsafePath", "MissingFile", "BadManifestRow",
        "DuplicateSample",
    }  # fmt: skip
    assert needed <= set(expected.values())


def test_broken_images(broken):
    root, _ = broken
    good = (root / "good_000.jpg").read_bytes()
    truncated = (root / "truncated.jpg").read_bytes()
    assert truncated.startswith(b"\xff\xd8")
    assert not truncated.endswith(b"\xff\xd9")
    assert good.endswith(b"\xff\xd9")
    with pytest.raises(OSError, match="truncated"):
        Image.open(root / "truncated.jpg").load()
    assert (root / "empty.png").stat().st_size == 0
    assert cv2.imread(str(root / "garbage.jpg")) is None
    assert len({p.suffix for p in root.glob("ambiguous.*")}) == 2


def test_huge_png_header_and_crc(broken, monkeypatch):
    root, _ = broken
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # else PIL refuses it as a bomb
    with Image.open(root / "huge.png") as im:
        assert im.size == (100_000, 100_000)
    data = (root / "huge.png").read_bytes()
    assert int.from_bytes(data[29:33], "big") == zlib.crc32(data[12:29])


def test_broken_audio(broken):
    root, _ = broken
    with pytest.raises(sf.LibsndfileError):
        sf.read(root / "bad_header.wav")
    assert (root / "bad_header.wav").read_bytes()[:4] == b"RIFF"
    assert sf.info(root / "too_long.wav").duration > 60
    assert sf.info(root / "silent.wav").frames == 0


def test_broken_text(broken):
    root, _ = broken
    with pytest.raises(UnicodeDecodeError):
        (root / "latin1.txt").read_bytes().decode("utf-8")
    assert (root / "blank.txt").read_text("utf-8").strip() == ""
    assert len((root / "too_long.txt").read_text("utf-8")) == 20_001
    assert (root / "notes.xyz").is_file()


def test_broken_duplicate_and_good_samples(broken):
    root, _ = broken
    for ext in ("jpg", "txt"):
        copy = (root / f"good_000_copy.{ext}").read_bytes()
        assert copy == (root / f"good_000.{ext}").read_bytes()
    good = sorted(p for p in root.glob("good_*.jpg") if "copy" not in p.name)
    assert len(good) >= 3
    for p in good:
        assert cv2.imread(str(p)).shape == (64, 64, 3)
        assert p.with_suffix(".txt").read_text("utf-8").strip()


def test_bad_manifest_rows(broken):
    root, expected = broken
    rows = {r["id"]: r for r in read_manifest(root / "bad_manifest.jsonl")}
    for key in expected:
        if key.startswith("bad_manifest.jsonl#"):
            assert key.split("#")[1] in rows
    assert rows["escape"]["image"].startswith("../")
    assert Path(rows["absolute"]["image"]).is_absolute()
    assert not (root / rows["missing"]["image"]).exists()
    assert all(rows["nothing"].get(c) is None for c in ("text", "image", "audio"))
    assert (root / rows["ok_a"]["image"]).is_file()


def test_demo_corpus(tmp_path):
    info = synthetic.write_demo_corpus(tmp_path, n_per_class=2)
    json.dumps(info)  # printable as-is by `mmfp demo`
    assert info["counts"] == {"photos": 20, "catalog": 20, "shards": 20}
    assert Path(info["catalog"]).name == "manifest.jsonl"
    assert len(info["shards"]) == 1
    assert info["expected_errors"] == synthetic.write_broken_inputs(tmp_path / "again")
    for sub in ("photos", "catalog", "shards", "broken"):
        assert (tmp_path / sub).is_dir()
