"""Augmented views are a pure function of (sample_id, view, seed), only train rows get them,
and odd inputs become error rows instead of crashing the job."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from features.schema import VIEWS, conform
from jobs.demo.corpus import make_audio, make_caption, make_image
from pipelines.augment import VIEW_ERRORS_SCHEMA, make_views, replay_view, view_seed
from pipelines.augment_audio import MIN_STFT_FRAMES, augment_audio
from pipelines.augment_image import augment_image
from pipelines.augment_spec import AudioAugment, AugmentSpec, ImageOp, TextAugment
from pipelines.augment_text import augment_text
from pipelines.errors import AugmentError

ROOT = Path(__file__).resolve().parents[1]
STAMP = datetime(2024, 1, 1, tzinfo=UTC)
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXAMPLE_YAML = """
augment:
  views_per_sample: 3
  seed: 7
  image:
    - {name: RandomResizedCrop, params: {size: [48, 48], scale: [0.6, 1.0]}}
    - {name: HorizontalFlip, params: {p: 0.5}}
    - {name: ColorJitter, params: {brightness: 0.3, contrast: 0.3, p: 0.8}}
  audio:
    sample_rate: 16000
    crop_seconds: 0.4
    pitch_shift: null
    p: 0.7
  text:
    word_delete_p: 0.15
    templates: ["{text}", "a recording of {text}"]
"""


def png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def wav(y: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def sample(sid: str, *, split: str = "train", k: int = 0, **overrides: object) -> dict:
    rng = np.random.default_rng(k)
    row = {
        "sample_id": sid,
        "split": split,
        "modalities": ["image", "audio", "text"],
        "text": make_caption(rng, k),
        "image": png(make_image(rng, k, size=48)),
        "audio": wav(make_audio(rng, k, seconds=0.25)),
        "audio_sample_rate": 16000,
        "audio_duration": 0.25,
        "label": f"class{k}",
        "labels": [f"class{k}"],
    }
    return row | overrides


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@pytest.fixture(scope="module")
def spec() -> AugmentSpec:
    return AugmentSpec(seed=3)


def test_same_view_same_bytes(spec):
    row = sample("s0", k=2)
    a, b = replay_view(row, 1, spec), replay_view(dict(row), 1, spec)
    assert a["error_type"] is None
    for key in ("image", "audio", "text", "transforms"):
        assert a[key] == b[key], key
    t1 = make_views(pa.Table.from_pylist([row]), spec=spec, run_id="r", created_at=STAMP)
    t2 = make_views(pa.Table.from_pylist([row]), spec=spec, run_id="r", created_at=STAMP)
    assert t1.equals(t2)
    # Row order does not matter: a view depends on its own sample only.
    other = sample("s1", k=5)
    swapped = make_views(pa.Table.from_pylist([other, row]), spec=spec, run_id="r")
    assert swapped.slice(2, 2).column("image").to_pylist() == t1.column("image").to_pylist()


def test_same_view_same_bytes_in_another_process(spec):
    """A fresh interpreter with another hash seed (another worker) writes identical bytes."""
    row = sample("cross", k=4)
    here = replay_view(row, 1, spec)
    code = (
        "import hashlib, sys; sys.path.insert(0, 'tests');"
        "from test_augment import sample; from pipelines.augment import replay_view;"
        "from pipelines.augment_spec import AugmentSpec;"
        "v = replay_view(sample('cross', k=4), 1, AugmentSpec(seed=3));"
        "print(*(hashlib.sha256(v[k] if isinstance(v[k], bytes) else v[k].encode()).hexdigest()"
        " for k in ('image', 'audio', 'text', 'transforms')))"
    )
    env = os.environ | {"PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    theirs = out.stdout.split()
    assert theirs == [sha(here[k]) for k in ("image", "audio", "text", "transforms")]


def test_views_differ_by_index_and_seed(spec):
    row = sample("s2", k=1)
    views = [replay_view(row, v, spec) for v in range(4)]
    assert len({v["image"] for v in views}) == 4
    assert len({v["audio"] for v in views}) == 4
    assert len({v["text"] for v in views}) > 1
    reseeded = replay_view(row, 0, AugmentSpec(seed=4))
    assert reseeded["image"] != views[0]["image"]
    assert reseeded["seed"] == 4
    assert views[0]["seed"] == 3
    seeds = {view_seed("s2", v, 3, m) for v in range(4) for m in ("image", "audio", "text")}
    assert len(seeds) == 12


def test_only_train_rows_get_views(spec):
    rows = [sample("tr", k=0), sample("va", split="val"), sample("te", split="test")]
    rows.append(sample("none", split=None))
    out = make_views(pa.Table.from_pylist(rows), spec=spec, run_id="run-1")
    assert out.schema == VIEW_ERRORS_SCHEMA
    assert out.column("sample_id").to_pylist() == ["tr", "tr"]
    assert out.column("view").to_pylist() == [0, 1]
    assert set(out.column("split").to_pylist()) == {"train"}
    assert set(out.column("run_id").to_pylist()) == {"run-1"}
    only_val = make_views(pa.Table.from_pylist(rows[1:3]), spec=spec, run_id="r")
    assert only_val.num_rows == 0
    assert only_val.schema == VIEW_ERRORS_SCHEMA


def test_good_views_conform_to_views_table(spec):
    out = make_views(pa.Table.from_pylist([sample("c", k=3)]), spec=spec, run_id="r")
    views = conform(out.drop_columns(["error_stage", "error_type", "error_message"]), VIEWS)
    assert views.num_rows == 2
    for row in views.to_pylist():
        img = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert img.shape == (row["image_height"], row["image_width"], 3)
        y, sr = sf.read(io.BytesIO(row["audio"]))
        assert sr == row["audio_sample_rate"] == 16000
        assert row["audio_duration"] == pytest.approx(len(y) / sr)
        record = json.loads(row["transforms"])
        assert set(record) == {"image", "audio", "text"}
        assert row["transforms"] == json.dumps(record, sort_keys=True)
        assert record["image"]["ops"] == [op.name for op in AugmentSpec().image]


def test_grayscale_and_rgba_inputs():
    rng = np.random.default_rng(0)
    flip = [ImageOp(name="HorizontalFlip", params={"p": 1.0})]
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    out, record = augment_image(png(gray), ops=flip, seed=1)
    decoded = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.shape == (20, 30, 3)
    assert np.array_equal(decoded[:, :, 0], gray[:, ::-1])
    assert record["input_shape"] == [20, 30]
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    out, record = augment_image(png(rgba), ops=flip, seed=1)
    decoded = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded, rgba[:, ::-1])  # alpha moves with the pixels
    assert record["output_shape"] == [20, 30, 4]
    deep = (rng.integers(0, 65536, (8, 8, 3))).astype(np.uint16)
    out, _ = augment_image(png(deep), ops=[], seed=0)
    assert cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED).dtype == np.uint8


def test_ops_get_independent_random_streams():
    """Compose(seed=s) alone gives every transform the same stream, so two p=0.5 flips would
    always fire together; each view pipeline reseeds its transforms apart."""
    img = png(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    ops = [ImageOp(name=n, params={"p": 0.5}) for n in ("HorizontalFlip", "VerticalFlip")]
    fired = {
        len(augment_image(img, ops=ops, seed=s)[1]["applied"]) for s in range(40)
    }  # how many of the two fired
    assert fired == {0, 1, 2}


def test_bad_inputs_become_error_rows(spec):
    rows = [
        sample("one_frame", k=1, audio=wav(np.array([0.5], np.float32))),
        sample("empty_caption", k=2, text="   "),
        sample("garbage_image", k=3, image=b"not an image at all"),
        sample("empty_wav", k=4, audio=wav(np.zeros(0, np.float32))),
        sample("fine", k=5),
    ]
    out = make_views(pa.Table.from_pylist(rows), spec=spec, run_id="r").to_pylist()
    assert len(out) == 10
    by_id = {r["sample_id"]: r for r in out}
    for sid, modality in [
        ("one_frame", "audio"),
        ("empty_caption", "text"),
        ("garbage_image", "image"),
        ("empty_wav", "audio"),
    ]:
        row = by_id[sid]
        assert row["error_stage"] == "augment"
        assert row["error_type"] == "AugmentError"
        assert row["error_message"].startswith(f"{modality}:"), row["error_message"]
        assert all(row[k] is None for k in ("image", "audio", "text", "transforms"))
        assert row["sample_id"] == sid
        assert row["label"].startswith("class")
    assert "too short" in by_id["one_frame"]["error_message"]
    assert "not an image" not in by_id["garbage_image"]["error_message"]  # bytes not echoed
    assert "no frames" in by_id["empty_wav"]["error_message"]
    fine = [r for r in out if r["sample_id"] == "fine"]
    assert all(r["error_type"] is None and r["image"] and r["audio"] and r["text"] for r in fine)


def test_crop_larger_than_image_is_an_error_row():
    spec = AugmentSpec(image=[ImageOp(name="RandomCrop", params={"height": 40, "width": 40})])
    small = sample("small", k=1, image=png(np.zeros((20, 30, 3), np.uint8)))
    big = sample("big", k=2, image=png(np.zeros((50, 60, 3), np.uint8)))
    out = make_views(pa.Table.from_pylist([small, big]), spec=spec, run_id="r").to_pylist()
    assert [r["error_type"] for r in out] == ["AugmentError", "AugmentError", None, None]
    assert "RandomCrop" in out[0]["error_message"]
    assert (out[2]["image_width"], out[2]["image_height"]) == (40, 40)


def test_short_clip_works_without_stft_ops():
    spec = AudioAugment(time_stretch=None, pitch_shift=None, p=1.0)
    data, sr, duration, record = augment_audio(wav(np.array([0.5], np.float32)), spec=spec, seed=1)
    assert (sr, duration, record["frames"]) == (16000, 1 / 16000, 1)
    with pytest.raises(AugmentError, match=f"at least {MIN_STFT_FRAMES}"):
        augment_audio(wav(np.full(100, 0.1, np.float32)), spec=AudioAugment(), seed=1)


def test_stereo_audio():
    t = np.arange(8000) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)], 1)
    data = wav(stereo.astype(np.float32) * 0.5, 44100)
    plain = AudioAugment(time_stretch=None, pitch_shift=None, time_shift_max=0, p=0.0)
    out, sr, duration, record = augment_audio(data, spec=plain, seed=0)
    y, read_sr = sf.read(io.BytesIO(out))
    assert (sr, read_sr, y.ndim, record["input_channels"]) == (16000, 16000, 1, 2)
    assert duration == pytest.approx(8000 / 44100, abs=1e-3)
    keep = plain.model_copy(update={"mono": False, "p": 1.0, "crop_seconds": 0.25})
    out, _, duration, record = augment_audio(data, spec=keep, seed=0)
    y, _ = sf.read(io.BytesIO(out), always_2d=True)
    assert y.shape == (4000, 2)
    assert duration == 0.25
    assert record["channels"] == 2
    assert np.abs(y).max() <= 1.0


def test_text_augment():
    spec = TextAugment(word_delete_p=0.5, word_swaps=2, case_noise_p=0.5, punct_noise_p=0.5)
    out, record = augment_text("a red circle on a plain background", spec=spec, seed=9)
    assert out == augment_text("a red circle on a plain background", spec=spec, seed=9)[0]
    assert out.strip()
    assert len(record["swaps"]) == 2
    one, _ = augment_text("x", spec=TextAugment(word_delete_p=0.99, templates=[]), seed=0)
    assert one.rstrip(".,!?;") in {"x", "X"}
    with pytest.raises(AugmentError, match="empty"):
        augment_text(" \n", spec=spec, seed=0)


def test_passthrough_when_a_modality_is_off():
    row = sample("p", k=6)
    view = replay_view(row, 0, AugmentSpec(audio=None, text=None, image=[]))
    assert view["audio"] == row["audio"]
    assert view["text"] == row["text"]
    assert json.loads(view["transforms"])["audio"] == {"passthrough": True}
    decoded = cv2.imdecode(np.frombuffer(view["image"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded, cv2.imdecode(np.frombuffer(row["image"], np.uint8), -1))


def test_spec_validation_messages():
    with pytest.raises(ValidationError, match="did you mean HorizontalFlip"):
        AugmentSpec(image=[{"name": "HorizontalFlp"}])
    with pytest.raises(ValidationError, match="unknown albumentations transform 'Nope'"):
        ImageOp(name="Nope")
    with pytest.raises(ValidationError, match="image op GaussNoise: invalid params"):
        ImageOp(name="GaussNoise", params={"std_range": [2, 1]})
    with pytest.raises(ValidationError, match="image op HorizontalFlip.*'flip_ratio'"):
        ImageOp(name="HorizontalFlip", params={"flip_ratio": 1})
    with pytest.raises(ValidationError, match="'Normalize' cannot run in a view pipeline"):
        ImageOp(name="Normalize")  # float output: not a view op
    with pytest.raises(ValidationError, match="'OneOf' cannot run in a view pipeline"):
        ImageOp(name="OneOf")  # a composition, not one transform
    with pytest.raises(ValidationError, match="e.g. HorizontalFlip"):
        ImageOp(name="zzzzzz")
    with pytest.raises(ValidationError, match="extra"):
        AugmentSpec(views=3)
    with pytest.raises(ValidationError, match="low <= high"):
        AudioAugment(gain_db=(6, -6))
    with pytest.raises(ValidationError, match="slot"):
        TextAugment(templates=["no slot here"])
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        AugmentSpec(views_per_sample=0)


def test_example_yaml_validates():
    spec = AugmentSpec.model_validate(yaml.safe_load(EXAMPLE_YAML)["augment"])
    assert spec.views_per_sample == 3
    assert spec.audio.pitch_shift is None
    view = replay_view(sample("y", k=7), 2, spec)
    assert view["error_type"] is None
    assert (view["image_width"], view["image_height"]) == (48, 48)
    assert view["audio_duration"] == pytest.approx(0.4)


@FAST
@given(
    h=st.integers(4, 40),
    w=st.integers(4, 40),
    channels=st.sampled_from([1, 3, 4]),
    seed=st.integers(0, 2**64 - 1),
)
def test_image_shapes_and_dtypes(h, w, channels, seed):
    rng = np.random.default_rng(seed % 1000)
    shape = (h, w) if channels == 1 else (h, w, channels)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    ops = AugmentSpec.model_fields["image"].default_factory()
    out, record = augment_image(png(img), ops=ops, seed=seed)
    decoded = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_UNCHANGED)
    expected = (h, w, 4 if channels == 4 else 3)
    assert decoded.dtype == np.uint8
    assert decoded.shape == expected
    assert record["output_shape"] == list(expected)
    assert record["seed"] == seed
    json.dumps(record)  # the record is plain JSON
    assert augment_image(png(img), ops=ops, seed=seed)[0] == out


@FAST
@given(
    seconds=st.floats(0.05, 0.4),
    sr=st.sampled_from([8000, 16000, 22050, 44100]),
    channels=st.sampled_from([1, 2]),
    mono=st.booleans(),
    crop=st.sampled_from([None, 0.2]),
    seed=st.integers(0, 2**32),
)
def test_audio_shapes_and_dtypes(seconds, sr, channels, mono, crop, seed):
    frames = max(round(seconds * sr), MIN_STFT_FRAMES * sr // 16000 + 2)
    y = np.random.default_rng(seed).uniform(-0.5, 0.5, (frames, channels)).astype(np.float32)
    spec = AudioAugment(mono=mono, crop_seconds=crop, p=1.0)
    out, out_sr, duration, record = augment_audio(wav(y, sr), spec=spec, seed=seed)
    decoded, read_sr = sf.read(io.BytesIO(out), dtype="float32", always_2d=True)
    assert read_sr == out_sr == 16000
    assert decoded.shape[1] == (1 if mono else channels) == record["channels"]
    assert decoded.shape[0] == record["frames"]
    assert duration == pytest.approx(decoded.shape[0] / 16000)
    if crop is not None:
        assert decoded.shape[0] == round(crop * 16000)
    assert np.abs(decoded).max() <= 1.0
    assert augment_audio(wav(y, sr), spec=spec, seed=seed)[0] == out
