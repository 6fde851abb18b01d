"""Hostile inputs in every source kind: each one costs exactly one quarantine row with its
reason, the good inputs around it land, and the build never fails.

One corpus holds them all (a directory, a manifest and tar shards), built once; every
case names the input's uri suffix and the error it must be quarantined with (or ``None``
when the input is fine despite looking odd, e.g. a PNG named ``.jpg``).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from features.store import FeatureStore
from jobs.demo import corpus
from pipelines.build import build
from tests.helpers import make_spec

MAX_FILE_BYTES = 200_000
CASES: dict[str, str | None] = {}  # uri suffix -> expected error type (None: a sample)


def _png(seed: int = 0, size: int = 24) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def _jpg(seed: int = 0) -> bytes:
    img = corpus.make_image(np.random.default_rng(seed), seed % 10, 32)
    return cv2.imencode(".jpg", img)[1].tobytes()


def _wav(samples: np.ndarray, rate: int = 16000, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def _case(root: Path, name: str, data: bytes | str, expected: str | None, key: str | None = None):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    CASES[key or name.rsplit(".", 1)[0]] = expected


def write_directory(root: Path) -> None:
    rng = np.random.default_rng(0)
    tone = np.sin(np.linspace(0, 2000, 8000)).astype(np.float32)
    _case(root, "good.jpg", _jpg(1), None)
    _case(root, "png_named.jpg", _png(2), None)  # the content decides, not the name
    _case(root, "wav_named.jpg", _wav(tone), "ImageDecodeError")
    _case(root, "jpeg_named.wav", _jpg(3), "AudioDecodeError")
    _case(root, "gif_named.png", b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "ImageDecodeError")
    _case(root, "nan.wav", _wav(np.full(8000, np.nan, np.float32)), "NonFiniteMedia")
    _case(root, "inf.wav", _wav(np.r_[tone[:100], np.inf, tone[:100]].astype(np.float32)),
          "NonFiniteMedia")  # fmt: skip
    nan_tiff = cv2.imencode(".tiff", np.full((8, 8), np.nan, np.float32))[1].tobytes()
    _case(root, "nan_pixels.tiff", nan_tiff, "NonFiniteMedia")
    _case(root, "huge_file.png", _png(4, size=400), "FileTooLarge")  # ~480 KB > the limit
    _case(root, "bmp_header.bmp", b"BM" + bytes(60) + rng.bytes(40), "ImageDecodeError")
    _case(root, "flac_truncated.flac", b"fLaC\x00\x00\x00\x22" + rng.bytes(20), "AudioDecodeError")
    wav = _wav(tone, subtype="PCM_16")
    _case(root, "wav_truncated.wav", wav[: len(wav) // 3], None)  # a short but valid clip
    lying = bytearray(_wav(tone, subtype="PCM_16"))
    lying[24:28] = (1).to_bytes(4, "little")  # 1 Hz: 8000 frames claim 2 h 13 min
    _case(root, "slow_rate.wav", bytes(lying), "AudioTooLong")
    _case(root, "controls.txt", "a caption\x00with a NUL and \x1b[31mANSI\x1b[0m", None)
    _case(root, "only_bom.txt", "\ufeff   \n\t", "EmptyText")
    _case(root, "zero_width.txt", "\u200b\u200b", None)  # invisible, but text
    for seed in range(6):  # fuzzed JPEGs: decoded or quarantined, never a crash
        data = bytearray(_jpg(10 + seed))
        flips = np.random.default_rng(seed).integers(0, len(data), 40)
        for i in flips:
            data[i] ^= 0xFF
        CASES[f"fuzzed_{seed}"] = "?"  # any reason, or a sample: only never a crash
        (root / f"fuzzed_{seed}.jpg").write_bytes(bytes(data))
    os.mkfifo(root / "fifo.wav")
    CASES["fifo.wav"] = "NotARegularFile"
    (root / "sub").mkdir()
    (root / "sub" / "inner.txt").write_text("a caption in a sub folder")
    CASES["sub/inner"] = None
    os.symlink(".", root / "sub" / "loop")  # a loop: listed once, never followed
    CASES["sub/loop"] = "UnsafePath"
    os.symlink("/", root / "root_link")  # out of the source: never walked
    CASES["root_link"] = "UnsafePath"
    os.symlink(root / "nowhere.jpg", root / "dangling.jpg")
    CASES["dangling.jpg"] = "MissingFile"
    outside = root.parent / "outside.txt"
    outside.write_text("a secret outside the source")
    os.symlink(outside, root / "escape.txt")
    CASES["escape"] = "UnsafePath"


def write_manifest(root: Path) -> Path:
    (root / "media").mkdir(parents=True)
    (root / "media" / "ok.jpg").write_bytes(_jpg(20))
    (root / "a_dir").mkdir()
    rows = [
        ({"id": "ok", "image": "media/ok.jpg", "text": "fine"}, None),
        ({"id": "dot", "image": "."}, "UnsafePath"),
        ({"id": "dir", "image": "a_dir"}, "NotARegularFile"),
        ({"id": "nul", "image": "media/ok\x00.jpg"}, "UnsafePath"),
        ({"id": "newline", "image": "media/\nok.jpg"}, "UnsafePath"),
        ({"id": "uri", "image": "s3://bucket/x.jpg"}, "UnsafePath"),
        ({"id": "unc", "image": "\\\\server\\share\\x.jpg"}, "UnsafePath"),
        ({"id": "up", "audio": "media/../../x.wav"}, "UnsafePath"),
        ({"id": "missing", "image": "media/none.jpg"}, "MissingFile"),
        ({"id": "nothing"}, "BadManifestRow"),
        ({"id": "nested", "text": {"not": "a string"}}, None),  # stored as its text
        ({"id": "twice", "text": "one"}, None),
        ({"id": "twice", "text": "two"}, "AmbiguousSample"),
        ({"text": "same words"}, None),
        ({"text": "same words"}, "DuplicateSample"),
    ]
    manifest = root / "manifest.jsonl"
    seen: dict[str, int] = {}
    with manifest.open("w") as f:
        for row, expected in rows:
            f.write(json.dumps(row) + "\n")
            ident = row.get("id") or row.get("text")
            seen[ident] = seen.get(ident, 0) + 1
            CASES[f"manifest.jsonl#{ident}" + (f"#{seen[ident]}" if seen[ident] > 1 else "")] = (
                expected
            )
    return manifest


def write_shards(root: Path) -> None:
    root.mkdir(parents=True)

    def add(tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        else:
            info.size = len(data)
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

    for shard, seed in (("s0.tar", 30), ("s1_cut.tar", 40)):
        with tarfile.open(root / shard, "w") as tar:
            add(tar, "ok.txt", f"a good caption {seed}".encode())
            add(tar, "ok.jpg", _jpg(seed))
            add(tar, "twice.txt", b"first")
            add(tar, "twice.txt", b"second")  # which one? ambiguous
            add(tar, "big.png", _png(seed, size=400))  # over the byte limit: never read
            add(tar, "link.txt", b"", tarfile.SYMTYPE)
            add(tar, "../../evil.txt", b"a name with dots, nothing written anywhere")
            add(tar, "split.txt", b"part one")
            add(tar, "other.txt", b"between")
            add(tar, "split.jpg", _jpg(seed + 1))  # its group is not contiguous
    for key, expected in [
        ("ok", None), ("twice", "AmbiguousSample"), ("big", "FileTooLarge"),
        ("link.txt", "NotARegularFile"), ("../../evil", None), ("split", None),
        ("other", None), ("split#2", "AmbiguousSample"),
    ]:  # fmt: skip
        CASES[f"s0.tar#{key}"] = expected
    data = (root / "s1_cut.tar").read_bytes()
    (root / "s1_cut.tar").write_bytes(data[: len(data) // 2])  # damaged part-way
    CASES["s1_cut.tar"] = "CorruptShard"
    # the groups before the damage are kept; the one it cuts keeps its own reason
    CASES["s1_cut.tar#ok"] = None
    CASES["s1_cut.tar#twice"] = "AmbiguousSample"
    CASES["s1_cut.tar#big"] = "FileTooLarge"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, ray_session):
    base = tmp_path_factory.mktemp("hostile")
    write_directory(base / "dir")
    manifest = write_manifest(base / "man")
    write_shards(base / "shards")
    spec = make_spec(
        base / "store",
        [
            {"kind": "directory", "uri": str(base / "dir")},
            {"kind": "manifest", "uri": str(manifest)},
            {"kind": "webdataset", "uri": str(base / "shards")},
        ],
        decode={"max_file_bytes": MAX_FILE_BYTES, "max_audio_seconds": 30},
    )
    result = build(spec)
    return FeatureStore(str(base / "store")), result


def _outcomes(store: FeatureStore) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for row in store.to_arrow("quarantine", columns=["uri", "error_type"]).to_pylist():
        found[row["uri"]] = row["error_type"]
    for uri in store.to_arrow("samples", columns=["source_uri"]).column(0).to_pylist():
        found.setdefault(uri, None)
    return found


def _mine(outcomes: dict[str, str | None], case: str) -> dict[str, str | None]:
    """The outcomes whose uri is ``case`` under one of the three sources."""
    return {u: e for u, e in outcomes.items() if u.endswith(f"/{case}")}


def test_every_hostile_input_has_its_exact_outcome(hostile):
    store, _ = hostile
    outcomes = _outcomes(store)
    assert len(CASES) >= 50  # kinds of hostile input, across the three source kinds
    wrong = {}
    for case, expected in sorted(CASES.items()):
        mine = _mine(outcomes, case)
        if len(mine) != 1 or (expected != "?" and next(iter(mine.values())) != expected):
            wrong[case] = (expected, mine)
    assert wrong == {}


def test_nothing_else_was_stored_or_lost(hostile):
    store, result = hostile
    outcomes = _outcomes(store)
    stray = [u for u in outcomes if not any(u.endswith(f"/{c}") for c in CASES)]
    assert stray == []
    ids = store.to_arrow("samples", columns=["sample_id"]).column(0).to_pylist()
    assert len(ids) == len(set(ids))
    assert result.inputs == len(outcomes)
    assert not (Path(store.uri).parent / "evil.txt").exists()  # the tar name wrote nothing
