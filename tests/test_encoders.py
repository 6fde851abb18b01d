"""Encoder registry: featurizers and Hugging Face encoders on tiny offline checkpoints.

No Ray: every stage is called directly on a 5-row Arrow table whose rows each
lack one modality or carry an awkward variant (grayscale, stereo 44.1 kHz,
longer than the model's window, undecodable bytes, blank text).
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from features.metadata import ColumnMeta
from features.schema import list_of
from jobs.demo import corpus as synthetic
from jobs.demo import tiny_models
from pipelines.encoders import (
    ENCODERS,
    Encoder,
    EncoderConfig,
    device_for_actor,
    get_encoder,
    hf_inputs,
)
from pipelines.encoders.fingerprint import model_identity
from pipelines.encoders.model_inputs import CLIP_MEAN, CLIP_STD, SILENCE_DB
from pipelines.encoders.runtime import to_device
from pipelines.errors import SpecError

# Which rows have each modality in the `batch` fixture.
PRESENT = {
    "text": [True, True, True, False, False],
    "image": [True, False, True, True, False],
    "audio": [True, True, False, True, True],
}

# id -> (registry name, tiny model or None, params, {output column: expected width})
CASES: dict[str, tuple[str, str | None, dict, dict[str, int]]] = {
    "image_pixels": ("image_pixels", None, {"size": 32}, {"image_pixels": 3 * 32 * 32}),
    "audio_logmel": ("audio_logmel", None, {"n_mels": 32, "frames": 50}, {"audio_logmel": 1600}),
    "text_ids": ("text_ids", "bert", {"max_length": 16}, {"text_ids": 16}),
    "hf_text-bert": ("hf_text", "bert", {"max_length": 16}, {"text_emb": 24}),
    "hf_text-clip": ("hf_text", "clip", {}, {"text_emb": 12}),
    "hf_image-vit": ("hf_image", "vit", {}, {"image_emb": 16}),
    "hf_image-vit-nopooler": ("hf_image", "vit_nopool", {}, {"image_emb": 16}),
    "hf_image-clip": ("hf_image", "clip", {}, {"image_emb": 12}),
    "hf_audio-ast": ("hf_audio", "ast", {"max_seconds": 1.0}, {"audio_emb": 16}),
    "hf_audio-wav2vec2": ("hf_audio", "wav2vec2", {"max_seconds": 1.0}, {"audio_emb": 16}),
    "hf_audio-whisper": ("hf_audio", "whisper", {}, {"audio_emb": 16}),
    "hf_audio-clap": ("hf_audio", "clap", {}, {"audio_emb": 8}),
    "clip": ("clip", "clip", {}, {"image_emb": 12, "text_emb": 12}),
    "clap": ("clap", "clap", {}, {"audio_emb": 8, "text_emb": 8}),
}
MODEL_CASES = [k for k, (name, *_) in CASES.items() if ENCODERS[name].needs_model]


class CaptionLength(Encoder):
    """A user encoder, loaded by dotted path in a test below."""

    modality = "text"
    needs_model: ClassVar[bool] = False

    def output_columns(self) -> dict[str, tuple[pa.DataType, tuple[int, ...]]]:
        return {"text_len": (list_of(pa.float32()), (1,))}

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        texts = batch.column("text").to_pylist()
        lengths = [[len(t or "")] for t in texts]
        return {
            "text_len": np.array(lengths, np.float32),
            "text_mask": np.array([bool(t) for t in texts]),
        }

    def encode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return inputs


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    made = {
        name: getattr(tiny_models, f"tiny_{name}")(root / name)
        for name in ("bert", "vit", "clip", "ast", "wav2vec2", "whisper", "clap")
    }
    made["vit_nopool"] = tiny_models.tiny_vit(root / "vit_nopool", pooler=False)
    return made


def _image(kind: str, rng: np.random.Generator, cls: int) -> bytes:
    img = synthetic.make_image(rng, cls, size=64)
    if kind == "jpg":
        img = cv2.resize(img, (80, 48))
    if kind == "gray":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return cv2.imencode(".jpg" if kind == "jpg" else ".png", img)[1].tobytes()


def _audio(rng: np.random.Generator, cls: int, *, rate: int, seconds: float, stereo=False) -> bytes:
    wave = synthetic.make_audio(rng, cls, sample_rate=rate, seconds=seconds)
    if stereo:
        wave = np.stack([wave, 0.5 * wave], axis=1)
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="FLAC" if stereo else "WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def batch() -> pa.Table:
    rng = np.random.default_rng(7)
    captions = [synthetic.make_caption(rng, k) for k in range(3)]
    return pa.table(
        {
            "text": pa.array([*captions, None, "   "], pa.string()),
            "image": pa.array(
                [_image("png", rng, 0), None, _image("jpg", rng, 2), _image("gray", rng, 3)]
                + [b"NOTANIMAGE" * 20],
                pa.binary(),
            ),
            "audio": pa.array(
                [
                    _audio(rng, 0, rate=16000, seconds=0.5),
                    _audio(rng, 1, rate=44100, seconds=2.0, stereo=True),  # > every window
                    None,
                    _audio(rng, 3, rate=8000, seconds=0.3),
                    _audio(rng, 4, rate=16000, seconds=0.8),
                ],
                pa.binary(),
            ),
        }
    )


def _config(case: str, models: dict[str, Path], **overrides) -> EncoderConfig:
    name, model, params, _ = CASES[case]
    fields = {"name": name, "model": str(models[model]) if model else None, "params": params}
    return EncoderConfig(**(fields | overrides))


@pytest.fixture(scope="module")
def encoded(models, batch):
    """case -> (encoder, inputs, outputs), computed once per case."""
    cache: dict[str, tuple] = {}

    def run(case: str):
        if case not in cache:
            encoder = get_encoder(_config(case, models))
            inputs = encoder.preprocess(batch)
            cache[case] = (encoder, inputs, encoder.encode(inputs))
        return cache[case]

    return run


# -- every encoder ------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_declared_columns(case, encoded, batch):
    encoder, _, outputs = encoded(case)
    declared = encoder.output_columns()
    assert {k: int(np.prod(s)) for k, (_, s) in declared.items()} == CASES[case][3]
    for column, (arrow_type, shape) in declared.items():
        values = outputs[column]
        assert values.shape == (batch.num_rows, *shape)
        assert values.dtype == (np.int32 if column == "text_ids" else np.float32)
        assert np.isfinite(values).all()
        modality = column.split("_")[0]
        assert outputs[f"{modality}_mask"].tolist() == PRESENT[modality]
        assert arrow_type == list_of(pa.int32() if column == "text_ids" else pa.float32())


@pytest.mark.parametrize("case", list(CASES))
def test_to_arrow_nulls_missing_rows(case, encoded):
    encoder, _, outputs = encoded(case)
    table = encoder.to_arrow(outputs)
    for column, (arrow_type, shape) in encoder.output_columns().items():
        assert table.schema.field(column).type == arrow_type
        present = PRESENT[column.split("_")[0]]
        values = table.column(column).to_pylist()
        assert [v is not None for v in values] == present
        assert {len(v) for v in values if v is not None} == {int(np.prod(shape))}
        first = present.index(True)
        np.testing.assert_array_equal(np.asarray(values[first]), outputs[column][first].ravel())


@pytest.mark.parametrize("case", MODEL_CASES)
def test_embeddings_unit_norm_and_zero_when_missing(case, encoded):
    encoder, _, outputs = encoded(case)
    for column in encoder.output_columns():
        present = np.array(PRESENT[column.split("_")[0]])
        norms = np.linalg.norm(outputs[column], axis=1)
        np.testing.assert_allclose(norms[present], 1.0, atol=1e-5)
        assert (outputs[column][~present] == 0).all()


@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_across_instances(case, encoded, models, batch):
    """A fresh encoder (new processor, new model load) reproduces every output bit."""
    _, inputs, outputs = encoded(case)
    again = get_encoder(_config(case, models))
    inputs_again = again.preprocess(batch)
    assert inputs_again.keys() == inputs.keys()
    for key in inputs:
        np.testing.assert_array_equal(inputs_again[key], inputs[key], err_msg=key)
    outputs_again = again.encode(inputs_again)
    for key in outputs:
        np.testing.assert_array_equal(outputs_again[key], outputs[key], err_msg=key)


@pytest.mark.parametrize("case", list(CASES))
def test_empty_batch(case, encoded, batch):
    encoder = encoded(case)[0]
    table = encoder.to_arrow(encoder.encode(encoder.preprocess(batch.slice(0, 0))))
    assert table.num_rows == 0
    assert table.column_names == list(encoder.output_columns())


@pytest.mark.parametrize("case", ["hf_text-bert", "hf_audio-wav2vec2", "hf_audio-clap", "clip"])
def test_rows_do_not_depend_on_their_batch(case, encoded, batch):
    """Fixed padding and masked pooling: a row encodes the same alone or in a batch."""
    encoder, _, outputs = encoded(case)
    single = encoder.encode(encoder.preprocess(batch.slice(0, 1)))
    for column in encoder.output_columns():
        np.testing.assert_allclose(single[column][0], outputs[column][0], atol=1e-5)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_pickled_encoder_is_light_and_equivalent(case, encoded, batch):
    """What Ray ships holds config only; the copy loads its own model and agrees."""
    encoder, inputs, outputs = encoded(case)
    blob = pickle.dumps(encoder)
    assert len(blob) < 20_000
    copy = pickle.loads(blob)
    assert copy._lazy == {}
    assert copy.device is None
    out = copy.encode(inputs)
    for column in encoder.output_columns():
        np.testing.assert_array_equal(out[column], outputs[column])


# -- featurizers --------------------------------------------------------------------------


def test_image_pixels_are_normalised_rgb():
    bgr = np.zeros((40, 60, 3), np.uint8)
    bgr[:] = (0, 0, 255)  # pure red in OpenCV's BGR order
    png = cv2.imencode(".png", bgr)[1].tobytes()
    encoder = get_encoder(EncoderConfig(name="image_pixels", params={"size": 16}))
    pixels = encoder.encode(encoder.preprocess(pa.table({"image": [png]})))["image_pixels"][0]
    expected = (np.array([1.0, 0.0, 0.0]) - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(pixels.mean(axis=(1, 2)), expected, atol=1e-4)
    assert pixels.shape == (3, 16, 16)


def test_image_pixels_crop_keeps_aspect_stretch_does_not():
    bgr = np.zeros((20, 60, 3), np.uint8)
    bgr[:, :20] = 255  # white left third: a centre crop of the wide image drops it
    png = cv2.imencode(".png", bgr)[1].tobytes()
    batch = pa.table({"image": [png]})
    left = {}
    for crop in (True, False):
        enc = get_encoder(EncoderConfig(name="image_pixels", params={"size": 20, "crop": crop}))
        left[crop] = enc.preprocess(batch)["image_pixels"][0, 0, :, 0].mean()
    assert left[True] < 0 < left[False]  # black (below the mean) vs white


def test_audio_logmel_resamples_downmixes_and_pads_with_silence():
    def tone(rate: int) -> np.ndarray:
        t = np.arange(int(rate * 0.2)) / rate
        return (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)

    buf = io.BytesIO()
    sf.write(buf, np.stack([tone(44100), tone(44100)], axis=1), 44100, format="WAV")
    encoder = get_encoder(EncoderConfig(name="audio_logmel", params={"frames": 40, "n_mels": 40}))
    mel = encoder.preprocess(pa.table({"audio": [buf.getvalue()]}))["audio_logmel"][0]
    assert mel.shape == (40, 40)
    assert (mel[:, 22:] == SILENCE_DB).all()  # 0.2 s = 21 frames of 10 ms, then padding
    reference = encoder._logmel(tone(16000))  # the same tone recorded at 16 kHz mono
    mel, reference = mel[:, 2:18], reference[:, 2:18]
    loud = reference > -40  # bands carrying the tone (quiet ones hold PCM16 dither)
    assert loud.sum() >= 16
    np.testing.assert_allclose(mel[loud], reference[loud], atol=1.0)


def test_text_ids_match_the_tokenizer(models):
    from transformers import AutoTokenizer

    encoder = get_encoder(EncoderConfig(name="text_ids", model=str(models["bert"])))
    text = "a red circle on a dark background " * 10  # longer than max_length
    ids = encoder.preprocess(pa.table({"text": [text]}))["text_ids"][0]
    tokenizer = AutoTokenizer.from_pretrained(models["bert"])
    assert ids.tolist() == tokenizer(text, truncation=True, max_length=32)["input_ids"]
    assert tiny_models.UNK_ID not in ids.tolist()  # the tiny vocabulary covers captions


def test_describe_matches_the_feature_set_contract(encoded):
    from transformers import AutoTokenizer

    encoder, columns = encoded("clip")[0].describe()
    assert encoder.name == "clip"
    assert encoder.config_hash == encoded("clip")[0].config_hash()
    assert encoder.config == encoded("clip")[0].config.model_dump(mode="json")
    assert columns["image_emb"] == ColumnMeta(
        shape=[12], dtype="float32", encoder="clip", kind="embedding", normalized=True
    )
    ids = encoded("text_ids")[0].describe()[1]["text_ids"]
    assert ids.kind == "input"
    assert ids.dtype == "int32"
    assert ids.pad_id == tiny_models.PAD_ID
    assert ids.vocab_size == len(AutoTokenizer.from_pretrained(encoded("text_ids")[0].config.model))


def test_text_ids_without_a_tokenizer_are_utf8_bytes():
    """No tokenizer directory to make by hand: byte + 1, 0 pads, 257 ids, recorded."""
    encoder = get_encoder(EncoderConfig(name="text_ids", params={"max_length": 8}))
    texts = pa.table({"text": ["Seven", "naïve number nine", None]})
    out = encoder.preprocess(texts)
    ids = out["text_ids"]
    assert (ids.dtype, ids.shape) == (np.int32, (3, 8))
    assert ids[0].tolist() == [ord(c) + 1 for c in "Seven"] + [0, 0, 0]
    assert ids[1].tolist() == [b + 1 for b in "naïve number nine".encode()[:8]]  # truncated
    assert out["text_mask"].tolist() == [True, True, False]
    folded = get_encoder(
        EncoderConfig(name="text_ids", params={"max_length": 8, "lowercase": True})
    ).preprocess(texts)["text_ids"]
    assert folded[0].tolist()[:5] == [ord(c) + 1 for c in "seven"]
    column = encoder.describe()[1]["text_ids"]
    assert (column.pad_id, column.vocab_size, column.kind) == (0, 257, "input")
    assert int(ids.max()) < column.vocab_size


# -- model details ------------------------------------------------------------------------


def test_single_tower_encoders_agree_with_joint_model(encoded):
    """hf_image/hf_text on a CLIP checkpoint and hf_audio on CLAP give the joint spaces."""
    pairs = [("hf_image-clip", "clip", "image_emb"), ("hf_text-clip", "clip", "text_emb")]
    pairs.append(("hf_audio-clap", "clap", "audio_emb"))
    for single, joint, column in pairs:
        np.testing.assert_allclose(encoded(single)[2][column], encoded(joint)[2][column], atol=1e-5)


@pytest.mark.parametrize("case", ["clip", "clap", "hf_text-bert"])
def test_embed_texts_matches_batch_text_emb(case, encoded, batch):
    encoder, _, outputs = encoded(case)
    texts = batch.column("text").to_pylist()[:3]
    np.testing.assert_allclose(encoder.embed_texts(texts), outputs["text_emb"][:3], atol=1e-5)


def test_embed_texts_refused_without_a_text_tower(encoded):
    with pytest.raises(TypeError, match="does not embed text"):
        encoded("hf_image-vit")[0].embed_texts(["a red circle"])


def test_missing_pooler_falls_back_to_cls(models, encoded):
    """A checkpoint without pooler weights would get a random pooler at each load."""
    encoder = encoded("hf_image-vit-nopooler")[0]
    assert encoder.pooler_missing
    strict = get_encoder(
        EncoderConfig(
            name="hf_image", model=str(models["vit_nopool"]), params={"pooling": "pooler"}
        )
    )
    with pytest.raises(SpecError, match="no trained pooler"):
        strict.load("cpu")


def test_normalize_off(models, batch):
    encoder = get_encoder(_config("hf_text-bert", models, normalize=False))
    outputs = encoder.encode(encoder.preprocess(batch))
    norms = np.linalg.norm(outputs["text_emb"][:3], axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)
    column = encoder.to_arrow(outputs).column("text_emb")
    assert column.type == list_of(pa.float32())
    np.testing.assert_allclose(column[0].as_py(), outputs["text_emb"][0], rtol=1e-6)


def test_only_storable_dtypes_are_offered():
    """Delta has no half-precision type: float16 is refused when the spec is read."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="float32"):
        EncoderConfig(name="clip", model="m", dtype="float16")


def test_batch_without_the_modality_column(encoded):
    encoder = encoded("hf_image-vit")[0]
    outputs = encoder.encode(encoder.preprocess(pa.table({"text": ["only text", "more"]})))
    assert outputs["image_emb"].shape == (2, 16)
    assert not outputs["image_mask"].any()
    assert (outputs["image_emb"] == 0).all()
    assert encoder.to_arrow(outputs).column("image_emb").null_count == 2


def test_undecodable_image_is_logged_not_raised(encoded, batch, caplog):
    encoder = encoded("image_pixels")[0]
    with caplog.at_level("WARNING"):
        mask = encoder.preprocess(batch.slice(4, 1))["image_mask"]
    assert mask.tolist() == [False]
    assert "did not decode" in caplog.text


# -- config hash --------------------------------------------------------------------------


def test_config_hash_stable_and_ignores_resources(models):
    base = get_encoder(_config("hf_text-bert", models)).config_hash()
    assert base == get_encoder(_config("hf_text-bert", models)).config_hash()
    resources = _config("hf_text-bert", models, batch_size=7, num_gpus=0.5, concurrency=3)
    assert get_encoder(resources).config_hash() == base
    defaults = EncoderConfig(name="image_pixels", params={})
    explicit = EncoderConfig(name="image_pixels", params={"size": 224, "crop": True})
    assert get_encoder(defaults).config_hash() == get_encoder(explicit).config_hash()


def test_an_added_param_at_its_default_keeps_old_stores_hash():
    """`lowercase` came after stores were written: at its default the hash is the one
    those stores recorded (pinned from the code before it), so their builds stay
    incremental; set, it is a new computation."""
    written_before = "784de07ff336dffce9da853fef4d5892"
    config = EncoderConfig(name="text_ids", model="tok-dir", params={"max_length": 16})
    assert get_encoder(config).config_hash() == written_before
    lowered = config.model_copy(update={"params": {"max_length": 16, "lowercase": True}})
    assert get_encoder(lowered).config_hash() != written_before


def test_config_hash_changes_with_params_and_options(models):
    hashes = {
        get_encoder(_config("hf_text-bert", models, **change)).config_hash()
        for change in (
            {},
            {"params": {"max_length": 8}},
            {"params": {"pooling": "cls"}},
            {"normalize": False},
        )
    }
    assert len(hashes) == 4


def test_config_hash_follows_the_model_files_not_their_path(models, tmp_path):
    original = get_encoder(_config("hf_text-bert", models)).config_hash()
    moved = shutil.copytree(models["bert"], tmp_path / "moved")
    assert get_encoder(_config("hf_text-bert", {"bert": moved})).config_hash() == original

    edited = shutil.copytree(models["bert"], tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (edited / "config.json").write_text(json.dumps(config))
    assert get_encoder(_config("hf_text-bert", {"bert": edited})).config_hash() != original

    retrained = shutil.copytree(models["bert"], tmp_path / "retrained")
    weights = retrained / "model.safetensors"  # same config and shapes, one weight changed
    weights.write_bytes(weights.read_bytes()[:-4] + np.float32(0.125).tobytes())
    assert get_encoder(_config("hf_text-bert", {"bert": retrained})).config_hash() != original


def test_config_hash_changes_with_class_version(models):
    class Bumped(ENCODERS["image_pixels"]):
        version = "2"

    config = EncoderConfig(name="image_pixels")
    assert Bumped(config).config_hash() != get_encoder(config).config_hash()


def test_hub_model_identity_is_id_and_revision():
    assert model_identity("org/model", "abc123") == "hub:org/model@abc123"
    assert model_identity("org/model") != model_identity("org/model", "abc123")
    assert model_identity(None) is None


# -- registry and errors ------------------------------------------------------------------


def test_unknown_encoder_lists_known_names():
    with pytest.raises(SpecError, match="unknown encoder 'bert_base'") as info:
        get_encoder(EncoderConfig(name="bert_base"))
    for name in ENCODERS:
        assert name in str(info.value)


def test_dotted_path_user_encoder():
    encoder = get_encoder(EncoderConfig(name="tests.test_encoders:CaptionLength"))
    assert type(encoder).__name__ == "CaptionLength"
    outputs = encoder.encode(encoder.preprocess(pa.table({"text": ["abc", None]})))
    assert encoder.to_arrow(outputs).column("text_len").to_pylist() == [[3.0], None]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tests.test_encoders:Missing", "cannot import encoder"),
        ("no_such_module_xyz:Thing", "cannot import encoder"),
        ("tests.test_encoders:PRESENT", "not a subclass"),
    ],
)
def test_bad_dotted_paths(name, message):
    with pytest.raises(SpecError, match=message):
        get_encoder(EncoderConfig(name=name))


def test_bad_params_and_models_are_spec_errors(models, tmp_path):
    with pytest.raises(SpecError, match="Valid params: size, crop, mean, std"):
        get_encoder(EncoderConfig(name="image_pixels", params={"sise": 32}))
    with pytest.raises(SpecError, match="needs `model`"):
        get_encoder(EncoderConfig(name="hf_text"))
    with pytest.raises(SpecError, match="cannot read its Hugging Face config"):
        get_encoder(EncoderConfig(name="hf_text", model=str(tmp_path / "nowhere")))
    with pytest.raises(SpecError, match="multi-tower"):
        get_encoder(EncoderConfig(name="hf_image", model=str(models["clap"])))
    with pytest.raises(SpecError, match="expected a CLIP model"):
        get_encoder(EncoderConfig(name="clip", model=str(models["bert"])))


def test_encoder_config_forbids_unknown_fields():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="extra"):
        EncoderConfig(name="clip", gpus=1)
    with pytest.raises(ValidationError, match="float32"):
        EncoderConfig(name="clip", dtype="bfloat16")


# -- devices ------------------------------------------------------------------------------


def test_device_for_actor_needs_cuda_and_a_ray_gpu(monkeypatch):
    import ray
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for_actor() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert device_for_actor() == "cpu"  # a CPU actor on a GPU node
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    assert device_for_actor() == "cuda"


def test_to_device_dtypes():
    import torch

    assert to_device(np.array([1, 2], np.int32), "cpu").dtype == torch.int64
    assert to_device(np.array([1.0], np.float64), "cpu").dtype == torch.float32
    assert to_device(np.array([True]), "cpu").dtype == torch.bool
    assert to_device(np.array([7], np.uint8), "cpu").dtype == torch.uint8  # pixels


@pytest.mark.parametrize("case", ["hf_image-vit", "hf_image-clip", "clip"])
def test_pixels_ship_as_uint8_and_are_normalised_on_the_device(case, encoded, batch):
    """A quarter of the bytes between preprocessing and the accelerator, same embeddings."""
    encoder, inputs, outputs = encoded(case)
    assert inputs["image__pixel_values"].dtype == np.uint8
    processor = encoder.image_processor()
    as_before = inputs | hf_inputs.image_inputs(processor, batch, scale=None)
    assert as_before["image__pixel_values"].dtype == np.float32
    before = encoder.encode(as_before)["image_emb"]
    np.testing.assert_allclose(outputs["image_emb"], before, rtol=0, atol=1e-5)


class _ShiftedAfterNormalising:
    """A processor with one more step after its normalisation (as a padding one has)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __getattr__(self, name: str):
        return getattr(self.processor, name)

    def __call__(self, images, **kwargs):
        out = dict(self.processor(images=images, **kwargs))
        if kwargs.get("do_normalize", True):
            out["pixel_values"] = np.asarray(out["pixel_values"]) + 0.5
        return out


def test_a_processor_the_device_cannot_reproduce_keeps_float32_pixels(encoded, batch):
    processor = encoded("hf_image-vit")[0].image_processor()
    assert hf_inputs.pixel_scale(processor) is not None
    shifted = _ShiftedAfterNormalising(processor)
    assert hf_inputs.pixel_scale(shifted) is None
    pixels = hf_inputs.image_inputs(shifted, batch, hf_inputs.pixel_scale(shifted))
    expected = hf_inputs.image_inputs(processor, batch)["image__pixel_values"]
    mask = np.array(PRESENT["image"])
    np.testing.assert_allclose(pixels["image__pixel_values"][mask], expected[mask] + 0.5)
