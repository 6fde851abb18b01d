"""Towers build from configs and recorded shapes, export to safetensors and load back."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.pretrain.config import parse_config
from jobs.pretrain.model import ContrastiveModel, export_towers, load_tower, param_groups
from jobs.pretrain.step import cosine_with_warmup

SHAPES = {
    "image_emb": [48],
    "text_emb": [32],
    "image_pixels": [3, 16, 16],
    "audio_logmel": [8, 32],
    "text_ids": [12],
}
TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 64,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 16,
}
TINY_VIT = {
    "model_type": "vit",
    "image_size": 16,
    "patch_size": 8,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}
TINY_AST = {
    "model_type": "audio-spectrogram-transformer",
    "num_mel_bins": 8,
    "max_length": 32,
    "patch_size": 4,
    "frequency_stride": 4,
    "time_stride": 4,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
}


def _inputs(n: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (n, 12), dtype=torch.int32)
    ids[:, -3:] = 0
    ids[0] = 0  # an all-padding row must not produce NaN
    return {
        "image_emb": torch.randn(n, 48),
        "text_emb": torch.randn(n, 32),
        "image_pixels": torch.randn(n, 3, 16, 16),
        "audio_logmel": torch.randn(n, 8, 32) * 20 - 40,
        "text_ids": ids,
    }


TOWER_SETS = {
    "projection": {
        "image": {"kind": "projection", "input": "image_emb", "hidden": 0, "out_dim": 8},
        "text": {"kind": "projection", "input": "text_emb", "hidden": 16, "out_dim": 8},
    },
    "scratch": {
        "image": {"kind": "cnn", "input": "image_pixels", "channels": [4, 8], "out_dim": 8},
        "audio": {"kind": "cnn", "input": "audio_logmel", "channels": [4], "out_dim": 8},
        "text": {"kind": "transformer", "vocab_size": 64, "width": 16, "heads": 2, "out_dim": 8},
    },
    "speech": {
        "audio": {
            "kind": "tdnn",
            "input": "audio_logmel",
            "n_mfcc": 6,
            "channels": 8,
            "out_dim": 8,
        },
        "image": {"kind": "projection", "input": "image_emb", "hidden": 0, "out_dim": 8},
    },
    "hf": {
        "image": {"kind": "hf", "input": "image_pixels", "config": TINY_VIT, "out_dim": 8},
        "audio": {"kind": "hf", "input": "audio_logmel", "config": TINY_AST, "out_dim": 8},
        "text": {"kind": "hf", "input": "text_ids", "config": TINY_BERT, "out_dim": 8},
    },
}


def _config(towers: dict, loss: str = "infonce"):
    return parse_config({"feature_set": "syn", "modalities": towers, "loss": loss})


@pytest.mark.parametrize("name", list(TOWER_SETS))
def test_towers_give_normalised_features_that_train(name):
    torch.manual_seed(0)
    cfg = _config(TOWER_SETS[name])
    model = ContrastiveModel(cfg, SHAPES)
    batch = {f"x_{m}": _inputs()[t.input] for m, t in cfg.modalities.items()}
    out = model(batch)
    for m in cfg.modalities:
        assert out[m].shape == (3, 8)
        torch.testing.assert_close(out[m].norm(dim=-1), torch.ones(3))
    assert float(out["scale"].detach()) == pytest.approx(1 / 0.07, rel=1e-5)
    sum(out[m].sum() for m in cfg.modalities).backward()
    assert all(t.weight.grad is not None for t in model.modules() if isinstance(t, torch.nn.Linear))


def test_hf_tower_loads_from_a_local_directory(tmp_path):
    from transformers import AutoConfig, AutoModel

    AutoModel.from_config(AutoConfig.for_model(**TINY_BERT)).save_pretrained(tmp_path / "bert")
    towers = {
        "text": {"kind": "hf", "input": "text_ids", "path": str(tmp_path / "bert"), "out_dim": 8},
        "image": {"kind": "projection", "input": "image_emb", "out_dim": 8},
    }
    model = ContrastiveModel(_config(towers), SHAPES)
    assert model.encode("text", _inputs()["text_ids"]).shape == (3, 8)


def test_siglip_bias_trains_and_infonce_bias_is_frozen():
    towers = TOWER_SETS["projection"]
    assert ContrastiveModel(_config(towers, "siglip"), SHAPES).logit_bias.requires_grad
    model = ContrastiveModel(_config(towers), SHAPES)
    assert not model.logit_bias.requires_grad
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(p is model.logit_scale for p in no_decay["params"])


def test_scale_is_clamped():
    model = ContrastiveModel(_config(TOWER_SETS["projection"]), SHAPES)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.scale().detach()) == pytest.approx(100.0)


@pytest.mark.parametrize("name", ["projection", "scratch", "speech"])
def test_export_round_trip(tmp_path, name):
    cfg = _config(TOWER_SETS[name])
    model = ContrastiveModel(cfg, SHAPES).eval()
    info = {
        "config": cfg.public_dict(),
        "shapes": SHAPES,
        "feature_set": "syn",
        "version": 3,
        "encoders": [],
    }
    export_towers(model, tmp_path, info)
    for m, tower_cfg in cfg.modalities.items():
        tower, meta = load_tower(tmp_path, m)
        x = _inputs()[tower_cfg.input]
        with torch.no_grad():
            want = model.encode(m, x)
            got = torch.nn.functional.normalize(tower(x), dim=-1)
        torch.testing.assert_close(got, want)
        assert meta["input"] == tower_cfg.input
        assert meta["version"] == 3
        assert json.loads((tmp_path / f"{m}.json").read_text())["out_dim"] == 8


def test_cosine_schedule_warms_up_then_decays_to_zero():
    f = cosine_with_warmup(4, 20)
    assert [round(f(s), 3) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(12) == pytest.approx(0.5)
    assert f(20) == pytest.approx(0.0)


def test_training_augmentations_are_seeded_and_change_only_training_inputs():
    from jobs.pretrain.augment import augment_batch
    from jobs.pretrain.config import TrainAugment

    x_audio = torch.full((4, 16, 40), -100.0)
    x_audio[:, :, :20] = torch.randn(4, 16, 20) * 10 - 40  # speech, then silence
    batch = {"x_audio": x_audio, "x_image": torch.randn(4, 3, 8, 8), "x_text": torch.ones(4, 5)}
    cfg = TrainAugment.model_validate({"audio": {}, "image": {"shift": 2}})
    a = augment_batch(batch, cfg, seed=1, step=7, rank=0)
    again = augment_batch(batch, cfg, seed=1, step=7, rank=0)
    other = augment_batch(batch, cfg, seed=1, step=8, rank=0)
    for key in ("x_audio", "x_image"):
        assert torch.equal(a[key], again[key])  # a resumed run draws the same variants
        assert not torch.equal(a[key], other[key])
        assert not torch.equal(a[key], batch[key])
        assert a[key].shape == batch[key].shape
    assert a["x_text"] is batch["x_text"]  # text is left alone
    assert float(a["x_audio"].min()) >= -100.0  # never below the silence floor
    none = TrainAugment.model_validate({"audio": {"time_masks": 0, "freq_masks": 0,
                                                  "shift": 0, "gain_db": 0}})  # fmt: skip
    assert torch.equal(augment_batch(batch, none, seed=1, step=7, rank=0)["x_audio"], x_audio)


def test_duplicates_are_found_before_augmentation_makes_them_differ():
    """Four copies of one recording and one image: augmented, they differ, but the
    loss still treats them as positives of each other (4 per row, not 1)."""
    from jobs.pretrain.step import Stepper

    towers = {m: TOWER_SETS["scratch"][m] for m in ("audio", "image")}
    cfg = parse_config({
        "feature_set": "syn", "modalities": towers,
        "augment": {"audio": {}, "image": {"shift": 2}}, "warmup_steps": 1,
    })  # fmt: skip
    stepper = Stepper(cfg, SHAPES, total_steps=2, device=torch.device("cpu"))
    one = _inputs(1)
    batch = {
        "x_audio": one["audio_logmel"].repeat(4, 1, 1),
        "x_image": one["image_pixels"].repeat(4, 1, 1, 1),
        "has_audio": torch.ones(4, dtype=torch.bool),
        "has_image": torch.ones(4, dtype=torch.bool),
    }
    stepper.train_step(batch)
    assert stepper.running_means()["positives_audio_image"] == 4.0


def test_token_deletion_keeps_order_and_closes_up_before_the_padding():
    from jobs.pretrain.augment import augment_batch
    from jobs.pretrain.config import TrainAugment

    ids = torch.arange(1, 13, dtype=torch.int32).repeat(64, 1)
    ids[:, 9:] = 0  # nine tokens, then padding
    cfg = TrainAugment.model_validate({"text": {"drop": 0.3}})
    out = augment_batch({"x_text": ids}, cfg, seed=0, step=1, rank=0)["x_text"]
    assert out.shape == ids.shape
    assert out.dtype == ids.dtype
    lengths = (out != 0).sum(1)
    assert int(lengths.min()) >= 1
    assert int(lengths.max()) <= 9
    assert float(lengths.float().mean()) == pytest.approx(9 * 0.7, abs=0.6)
    for row, n in zip(out.tolist(), lengths.tolist(), strict=True):
        assert row[:n] == sorted(set(row[:n]))  # a subsequence, in order
        assert set(row[:n]) <= set(range(1, 10))
        assert row[n:] == [0] * (12 - n)  # pads close the row
    floats = {"x_text": torch.randn(4, 32)}  # text embeddings are not token ids: untouched
    assert augment_batch(floats, cfg, seed=0, step=1, rank=0)["x_text"] is floats["x_text"]


def test_cmvn_standardises_each_mel_bin_over_voiced_frames():
    from jobs.pretrain.model import _cmvn

    x = torch.full((2, 8, 30), -100.0)
    x[:, :, :12] = torch.randn(2, 8, 12) * 7 - 30 + torch.arange(8).view(1, 8, 1) * 5  # a tilt
    out = _cmvn(x)
    voiced = out[:, :, :12]
    assert voiced.mean(dim=2).abs().max() < 1e-4  # every bin centred: the tilt is gone
    assert (voiced.std(dim=2, unbiased=False) - 1).abs().max() < 1e-3
    assert out[:, :, 12:].abs().max() == 0  # padding carries nothing
    loud = _cmvn(torch.where(x > -100, x + 20, x))  # a louder recording of the same speech
    assert torch.allclose(loud, out, atol=1e-4)


def test_speech_tower_reads_mfccs_of_the_voiced_frames_only():
    """The TDNN's coefficients are librosa's MFCCs of the same log-mel; where a word sits
    in its second, and how much silence pads it, change nothing."""
    import librosa

    from jobs.pretrain.config import TdnnTower
    from jobs.pretrain.model import SpeechTdnn, dct_matrix

    torch.manual_seed(0)
    logmel = torch.randn(16, 30) * 10 - 40
    want = librosa.feature.mfcc(S=logmel.numpy(), n_mfcc=12)
    torch.testing.assert_close(
        dct_matrix(12, 16) @ logmel, torch.from_numpy(want), atol=1e-3, rtol=1e-4
    )

    tower = SpeechTdnn(
        TdnnTower(kind="tdnn", input="audio_logmel", n_mfcc=12, channels=8), [16, 80]
    ).eval()
    word = torch.randn(16, 25) * 10 - 40
    early, late = torch.full((2, 16, 80), -100.0), torch.full((2, 16, 80), -100.0)
    early[0, :, :25], late[0, :, 40:65] = word, word
    early[1, :, 5:20] = late[1, :, 60:75] = word[:, :15]
    with torch.no_grad():
        torch.testing.assert_close(tower(early), tower(late), atol=1e-4, rtol=1e-4)
        padded = torch.full((1, 16, 120), -100.0)
        padded[0, :, 10:35] = word
        torch.testing.assert_close(tower(padded), tower(early[:1]), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(tower(early[:1]), tower(early[1:]))  # a shorter word differs


def test_spec_masks_leave_the_padding_silent():
    from jobs.pretrain.augment import augment_logmel
    from jobs.pretrain.config import AudioAugment

    x = torch.full((8, 16, 40), -100.0)
    x[:, :, :20] = torch.randn(8, 16, 20) * 10 - 40
    masks = AudioAugment(time_masks=2, freq_masks=3, freq_width=8, shift=0, gain_db=0)
    out = augment_logmel(x, masks, torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :, 20:], x[:, :, 20:])  # silence stays silence
    assert not torch.equal(out[:, :, :20], x[:, :, :20])


def test_vocal_tract_warp_moves_formants_and_keeps_silence_silent():
    """A peak at mel bin 20 lands within 20 * (1 +- warp) after the warp, padding frames
    stay exactly at the floor; with every augmentation off a row is untouched."""
    from jobs.pretrain.augment import augment_logmel, warp_mels
    from jobs.pretrain.config import AudioAugment

    x = torch.full((64, 40, 30), -100.0)
    x[:, :, :10] = -60.0
    x[:, 20, :10] = -20.0  # one formant
    floor = x.amin(dim=(1, 2), keepdim=True)
    out = warp_mels(x, floor, 0.2, torch.Generator().manual_seed(0))
    peaks = out[:, :, :10].mean(dim=2).argmax(dim=1).float()
    assert ((peaks >= 20 * 0.8 - 1) & (peaks <= 20 * 1.2 + 1)).all()
    assert len(set(peaks.tolist())) > 3  # each row its own factor
    assert torch.equal(out[:, :, 10:], x[:, :, 10:])  # silence stays silence
    plain = AudioAugment(shift=0, gain_db=0, time_masks=0, freq_masks=0)
    a = augment_logmel(x, plain, torch.Generator().manual_seed(1))
    assert torch.equal(a, x)


def test_image_affine_moves_rotates_and_zooms_the_pixels():
    """A blob's centre of mass: a rotation keeps its distance from the image centre and
    turns it, a zoom scales that distance within 1 +- scale, a shift moves it whole."""
    from jobs.pretrain.augment import affine_images
    from jobs.pretrain.config import ImageAugment

    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = torch.exp(-((ys - 4) ** 2 + (xs - 11) ** 2) / 2).view(1, 1, 16, 16).repeat(6, 1, 1, 1)

    def offsets(img: torch.Tensor) -> torch.Tensor:  # centre of mass - image centre, per image
        mass = img.sum(dim=(1, 2, 3))
        cy = (img[:, 0] * ys).sum(dim=(1, 2)) / mass - 7.5
        cx = (img[:, 0] * xs).sum(dim=(1, 2)) / mass - 7.5
        return torch.stack([cy, cx], 1)

    before = offsets(blob)
    turned = offsets(affine_images(blob, ImageAugment(shift=0, rotate=60.0),
                                   torch.Generator().manual_seed(0)))  # fmt: skip
    assert torch.allclose(turned.norm(dim=1), before.norm(dim=1), atol=0.1)
    assert (turned - before).norm(dim=1).max() > 0.5  # it did turn
    zoomed = offsets(affine_images(blob, ImageAugment(shift=0, scale=0.3),
                                   torch.Generator().manual_seed(1)))  # fmt: skip
    ratio = zoomed.norm(dim=1) / before.norm(dim=1)
    assert bool(((ratio > 0.68) & (ratio < 1.32)).all())
    assert float(ratio.std()) > 0.01  # each image its own zoom
    moved = offsets(affine_images(blob, ImageAugment(shift=2), torch.Generator().manual_seed(3)))
    steps = moved - before
    assert torch.allclose(steps, steps.round(), atol=0.05)  # whole pixels
    assert float(steps.abs().max()) <= 2.05
    nothing = ImageAugment(shift=0)
    assert torch.equal(affine_images(blob, nothing, torch.Generator().manual_seed(0)), blob)
