"""Contrastive losses against NumPy, masking, and gradients through the cross-worker gather."""

from __future__ import annotations

import socket

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from jobs.pretrain.arrays import label_codes
from jobs.pretrain.loss import (
    contrastive_loss,
    gather_with_local_grad,
    infonce,
    input_keys,
    same_key,
    siglip,
)


def _normed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_infonce(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    logits = scale * a @ b.T
    i2t = -np.mean(np.diag(_log_softmax(logits, axis=1)))
    t2i = -np.mean(np.diag(_log_softmax(logits, axis=0)))
    return (i2t + t2i) / 2


def np_siglip(a: np.ndarray, b: np.ndarray, scale: float, bias: float) -> float:
    logits = scale * a @ b.T + bias
    z = 2 * np.eye(len(a)) - 1
    return float(np.sum(np.log1p(np.exp(-z * logits))) / len(a))


@pytest.mark.parametrize("n", [2, 5, 9])
def test_infonce_matches_numpy(n):
    rng = np.random.default_rng(n)
    a, b = _normed(rng, n, 7), _normed(rng, n, 7)
    got = infonce(torch.tensor(a), torch.tensor(b), torch.tensor(14.3))
    assert float(got) == pytest.approx(np_infonce(a, b, 14.3), rel=1e-6)


@pytest.mark.parametrize("n", [2, 5, 9])
def test_siglip_matches_numpy(n):
    rng = np.random.default_rng(10 + n)
    a, b = _normed(rng, n, 6), _normed(rng, n, 6)
    got = siglip(torch.tensor(a), torch.tensor(b), torch.tensor(10.0), torch.tensor(-3.0))
    assert float(got) == pytest.approx(np_siglip(a, b, 10.0, -3.0), rel=1e-6)


def np_multi_positive(a: np.ndarray, b: np.ndarray, scale: float, p: np.ndarray) -> float:
    """Soft-target InfoNCE: each row's target spread evenly over its positives."""
    logits = scale * a @ b.T
    rows = -np.mean(np.sum(p / p.sum(1, keepdims=True) * _log_softmax(logits, 1), axis=1))
    cols = -np.mean(np.sum(p.T / p.T.sum(1, keepdims=True) * _log_softmax(logits.T, 1), axis=1))
    return (rows + cols) / 2


def test_multi_positive_infonce_matches_numpy_and_reduces_to_infonce():
    rng = np.random.default_rng(3)
    a, b = _normed(rng, 6, 5), _normed(rng, 6, 5)
    p = np.eye(6, dtype=bool)
    p[0, 3] = p[3, 0] = True  # rows 0 and 3 carry the same caption
    got = infonce(torch.tensor(a), torch.tensor(b), torch.tensor(9.0), torch.tensor(p))
    assert float(got) == pytest.approx(np_multi_positive(a, b, 9.0, p), rel=1e-6)
    eye = infonce(torch.tensor(a), torch.tensor(b), torch.tensor(9.0), torch.eye(6).bool())
    assert float(eye) == pytest.approx(np_infonce(a, b, 9.0), rel=1e-6)


def test_identical_captions_are_not_pushed_apart():
    """Rows 0 and 1 share a caption: with input keys the loss is the multi-positive one
    (image 0 - caption 1 and image 1 - caption 0 are positives), without it is CLIP's."""
    text = torch.tensor([[5, 6, 0], [5, 6, 0], [7, 8, 9], [1, 2, 3]], dtype=torch.int32)
    keys = {"text": input_keys(text), "image": input_keys(torch.eye(4))}
    rng = np.random.default_rng(4)
    img, cap = _normed(rng, 4, 8), _normed(rng, 4, 8)
    cap[1] = cap[0]  # the same caption, the same features
    features = {"image": torch.tensor(img), "text": torch.tensor(cap)}
    present = {m: torch.ones(4, dtype=torch.bool) for m in features}
    pairs, scale = [("image", "text")], torch.tensor(10.0)
    plain, _ = contrastive_loss(features, present, pairs, kind="infonce", scale=scale)
    multi, _ = contrastive_loss(features, present, pairs, kind="infonce", scale=scale, keys=keys)
    p = np.eye(4, dtype=bool)
    p[0, 1] = p[1, 0] = True
    assert float(plain) == pytest.approx(np_infonce(img, cap, 10.0), rel=1e-6)
    assert float(multi) == pytest.approx(np_multi_positive(img, cap, 10.0, p), rel=1e-6)


def test_a_shared_caption_makes_rows_positives_in_every_pair_with_any():
    """Rows 0 and 1 share a caption, 2 and 3 lack text (zeros, equal to each other): with
    ``any_modality`` audio 0 - image 1 is a positive too; absent text matches nothing."""
    text = torch.tensor([[5, 6], [5, 6], [0, 0], [0, 0]], dtype=torch.int32)
    audio, image = torch.randn(4, 6), torch.randn(4, 5)
    keys = {"text": input_keys(text), "audio": input_keys(audio), "image": input_keys(image)}
    rng = np.random.default_rng(2)
    features = {m: torch.tensor(_normed(rng, 4, 8)) for m in ("audio", "image", "text")}
    present = {m: torch.ones(4, dtype=torch.bool) for m in features}
    present["text"] = torch.tensor([True, True, False, False])
    pairs, scale = [("audio", "image")], torch.tensor(10.0)
    runs = {
        any_modality: contrastive_loss(
            features,
            present,
            pairs,
            kind="infonce",
            scale=scale,
            keys=keys,
            any_modality=any_modality,
        )  # fmt: skip
        for any_modality in (False, True)
    }
    assert runs[False][1]["positives_audio_image"] == 1.0  # audio and image all differ
    assert runs[True][1]["positives_audio_image"] == (2 + 2 + 1 + 1) / 4
    a, b = features["audio"].numpy(), features["image"].numpy()
    p = np.eye(4, dtype=bool)
    p[0, 1] = p[1, 0] = True
    assert float(runs[True][0]) == pytest.approx(np_multi_positive(a, b, 10.0, p), rel=1e-6)


def test_input_keys_match_identical_rows_only():
    x = torch.rand(5, 3, 8, 8)
    x[3] = x[1]
    x[4] = x[1]
    x[4, 0, 0, 0] += 1e-6  # almost the same image is another image
    same = same_key(input_keys(x))
    assert bool(same[1, 3])
    assert bool(same[3, 1])
    assert not same[1, 4]
    assert int(same.sum()) == 5 + 2


def test_the_supervised_term_makes_same_label_rows_positives():
    rng = np.random.default_rng(5)
    img, cap = _normed(rng, 4, 6), _normed(rng, 4, 6)
    features = {"image": torch.tensor(img), "text": torch.tensor(cap)}
    present = {m: torch.ones(4, dtype=torch.bool) for m in features}
    labels = torch.tensor(label_codes(pa.array(["seven", "two", "seven", None])))
    assert labels.tolist()[0] == labels.tolist()[2] != labels.tolist()[1]
    assert labels.tolist()[3] == -1
    total, stats = contrastive_loss(
        features, present, [("image", "text")], kind="infonce", scale=torch.tensor(10.0),
        labels=labels, supervised_weight=0.5,
    )  # fmt: skip
    p = np.eye(4, dtype=bool)
    p[0, 2] = p[2, 0] = True  # the unlabelled row is only its own positive
    expected = np_infonce(img, cap, 10.0) + 0.5 * np_multi_positive(img, cap, 10.0, p)
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert stats["supcon_image_text"] == pytest.approx(np_multi_positive(img, cap, 10.0, p))


def test_perfect_pairs_have_low_infonce():
    eye = torch.eye(6)
    assert float(infonce(eye, eye, torch.tensor(100.0))) < 1e-6


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_masked_rows_are_left_out_of_pairs(kind):
    rng = np.random.default_rng(3)
    feats = {m: torch.tensor(_normed(rng, 8, 5), dtype=torch.float32) for m in ("image", "text")}
    present = {"image": torch.ones(8, dtype=torch.bool), "text": torch.ones(8, dtype=torch.bool)}
    present["text"][[1, 4]] = False
    scale, bias = torch.tensor(10.0), torch.tensor(-2.0)
    loss, stats = contrastive_loss(
        feats, present, [("image", "text")], kind=kind, scale=scale, bias=bias
    )
    keep = present["text"].numpy()
    a, b = feats["image"].numpy()[keep], feats["text"].numpy()[keep]
    want = np_infonce(a, b, 10.0) if kind == "infonce" else np_siglip(a, b, 10.0, -2.0)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert stats["loss_image_text"] == pytest.approx(want, rel=1e-5)


def test_pair_without_two_shared_rows_is_skipped_but_graph_stays():
    feats = {m: torch.randn(4, 3, requires_grad=True) for m in ("audio", "image", "text")}
    present = {m: torch.ones(4, dtype=torch.bool) for m in feats}
    present["audio"][:] = torch.tensor([True, False, False, False])
    scale = torch.tensor(5.0, requires_grad=True)
    normed = {m: F.normalize(f, dim=-1) for m, f in feats.items()}
    pairs = [("audio", "image"), ("image", "text")]
    loss, stats = contrastive_loss(normed, present, pairs, kind="infonce", scale=scale)
    assert set(stats) == {"loss_image_text"}
    loss.backward()
    assert feats["audio"].grad is not None
    assert torch.all(feats["audio"].grad == 0)
    assert feats["image"].grad.abs().sum() > 0


def test_gather_is_identity_with_grad_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    y = gather_with_local_grad(x)
    y.sum().backward()
    assert torch.equal(y, x)
    assert torch.equal(x.grad, torch.ones_like(x))


# ---- two processes, one gloo group ------------------------------------------------


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    a = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    b = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    present = torch.ones(8, dtype=torch.bool)
    present[[2, 5]] = False  # one masked row in each worker's half
    return a, b, present


def _loss_and_grads(a, b, present, kind):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    scale = torch.tensor(12.0, requires_grad=True)
    bias = torch.tensor(-4.0, requires_grad=True)
    loss, _ = contrastive_loss(
        {"image": a, "text": b},
        {"image": torch.ones(len(a), dtype=torch.bool), "text": present},
        [("image", "text")],
        kind=kind,
        scale=scale,
        bias=bias if kind == "siglip" else None,
    )
    loss.backward()
    return float(loss.detach()), a.grad, b.grad


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        a, b, present = _data()
        rows = slice(rank * 4, rank * 4 + 4)
        for kind in KINDS:
            result = _loss_and_grads(a[rows], b[rows], present[rows], kind)
            torch.save(result, f"{out}/{kind}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KINDS = ("infonce", "siglip")


def test_two_worker_gather_gives_exact_local_gradients(tmp_path):
    """Each worker's loss equals the global one, and its local grads equal the global grads."""
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b, present = _data()
    for kind in KINDS:
        loss, ga, gb = _loss_and_grads(a, b, present, kind)
        for rank in (0, 1):
            w_loss, w_ga, w_gb = torch.load(tmp_path / f"{kind}-{rank}.pt", weights_only=True)
            rows = slice(rank * 4, rank * 4 + 4)
            assert w_loss == pytest.approx(loss, rel=1e-6), kind
            torch.testing.assert_close(w_ga, ga[rows], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(w_gb, gb[rows], rtol=1e-5, atol=1e-7)
