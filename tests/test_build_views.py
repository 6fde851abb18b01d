"""The augment stage in a build: views of train samples, replayable bit for bit, incremental."""

from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
import soundfile as sf

from features.store import FeatureStore
from pipelines.augment import AugmentSpec, replay_view
from pipelines.build import build
from tests.helpers import make_spec

pytestmark = pytest.mark.usefixtures("ray_session")

AUGMENT = {
    "views_per_sample": 2,
    "seed": 3,
    "image": [
        {"name": "HorizontalFlip", "params": {"p": 0.5}},
        {"name": "ColorJitter", "params": {"p": 0.8}},
    ],
    "audio": {"sample_rate": 16000, "pitch_shift": None},
}


@pytest.fixture(scope="module")
def odd_corpus(tmp_path_factory, corpus):
    """The photos source plus odd inputs: grayscale, RGBA, a 1-sample clip, a stereo clip."""
    import shutil

    root = tmp_path_factory.mktemp("odd") / "photos"
    shutil.copytree(corpus["photos"], root)
    odd = root / "odd"
    odd.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(odd / "gray.png"), rng.integers(0, 255, (20, 24), np.uint8))
    (odd / "gray.txt").write_text("a grey square")
    cv2.imwrite(str(odd / "rgba.png"), rng.integers(0, 255, (20, 24, 4), np.uint8))
    (odd / "rgba.txt").write_text("a see-through circle")
    for i in range(4):  # 1-sample clips: time stretch cannot run on them
        sf.write(odd / f"click{i}.wav", np.array([0.5], np.float32), 16000)
        (odd / f"click{i}.txt").write_text(f"single click number {i}")
    (odd / "notes.xyz").write_text("not a modality: quarantined by collect")
    sf.write(odd / "stereo.wav", rng.uniform(-0.5, 0.5, (8000, 2)).astype(np.float32), 16000)
    (odd / "stereo.txt").write_text("a stereo hum")
    return root


def _digest(row: dict) -> str:
    h = hashlib.sha256()
    for key in ("image", "audio", "text", "transforms"):
        value = row[key]
        h.update(b"-" if value is None else value if isinstance(value, bytes) else value.encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def views_store(odd_corpus, tmp_path_factory):
    store_dir = tmp_path_factory.mktemp("views") / "store"
    spec = make_spec(
        store_dir,
        [{"kind": "directory", "uri": str(odd_corpus), "class_folders": True}],
        split={"ratios": {"train": 0.7, "val": 0.15, "test": 0.15}, "by": "sample"},
        augment=AUGMENT,
    )
    return spec, build(spec), FeatureStore(str(store_dir))


def test_views_for_train_samples_only(views_store):
    _, result, store = views_store
    samples = store.to_arrow("samples", columns=["sample_id", "split"]).to_pylist()
    train = {s["sample_id"] for s in samples if s["split"] == "train"}
    views = store.to_arrow("views").to_pylist()
    view_errors = [q for q in store.to_arrow("quarantine").to_pylist() if q["stage"] == "augment"]
    assert {v["sample_id"] for v in views} <= train
    assert len(views) + len(view_errors) == 2 * len(train)
    assert result.view_counts["views"] == len(views)
    assert all(v["split"] == "train" and v["seed"] == 3 for v in views)
    assert {v["view"] for v in views} == {0, 1}


def test_odd_inputs_make_views_or_quarantine_rows(views_store):
    _, _, store = views_store
    samples = {
        s["source_uri"].rsplit("/", 1)[-1]: s
        for s in store.to_arrow("samples", columns=["sample_id", "source_uri", "split"]).to_pylist()
    }
    views = store.to_arrow("views").to_pylist()
    quarantine = store.to_arrow("quarantine").to_pylist()
    for name in ("gray", "rgba", "stereo"):
        if samples[name]["split"] == "train":
            made = [v for v in views if v["sample_id"] == samples[name]["sample_id"]]
            assert len(made) == 2
            image = cv2.imdecode(np.frombuffer(made[0]["image"] or b"\0", np.uint8), -1)
            assert made[0]["image"] is None or image.shape[:2] == (20, 24)
    clicks = [samples[f"click{i}"] for i in range(4) if samples[f"click{i}"]["split"] == "train"]
    assert clicks  # the split is deterministic: at least one click is a train sample
    for click in clicks:
        errors = [q for q in quarantine if q["uri"].startswith(click["sample_id"])]
        assert len(errors) == 2
        assert all(q["error_type"] == "AugmentError" for q in errors)
        assert all(q["stage"] == "augment" for q in errors)
        assert "too short" in errors[0]["message"]
        assert not [v for v in views if v["sample_id"] == click["sample_id"]]


def test_views_replay_bit_for_bit_in_the_driver(views_store):
    _, _, store = views_store
    samples = {s["sample_id"]: s for s in store.to_arrow("samples").to_pylist()}
    spec = AugmentSpec.model_validate(AUGMENT)
    views = store.to_arrow("views").to_pylist()
    assert views
    for view in views[:6]:
        replayed = replay_view(samples[view["sample_id"]], view["view"], spec)
        assert _digest(replayed) == _digest(view)


def test_view_index_changes_the_output(views_store):
    _, _, store = views_store
    by_sample: dict[str, list[str]] = {}
    for v in store.to_arrow("views").to_pylist():
        by_sample.setdefault(v["sample_id"], []).append(_digest(v))
    pairs = [d for d in by_sample.values() if len(d) == 2]
    assert pairs
    assert all(a != b for a, b in pairs)


def test_rerun_adds_no_views_and_one_quarantine_commit_per_run(views_store):
    spec, first, store = views_store
    before = store.version("views")
    again = build(spec)
    assert again.view_counts.get("views", 0) == 0
    assert store.version("views") == before
    runs = [h["run_id"] for h in store.history("quarantine") if h["run_id"]]
    assert runs.count(first.run_id) == 1


def test_more_views_per_sample_adds_only_new_indices(views_store, tmp_path):
    spec, _, store = views_store
    before = store.to_arrow("views").num_rows
    bigger = spec.model_copy(
        update={"augment": AugmentSpec.model_validate({**AUGMENT, "views_per_sample": 3})}
    )
    result = build(bigger)
    views = store.to_arrow("views").to_pylist()
    added = [v for v in views if v["run_id"] == result.run_id]
    assert added
    assert {v["view"] for v in added} == {2}
    assert len(views) == before + len(added)
