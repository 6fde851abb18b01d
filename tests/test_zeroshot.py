"""Zero-shot labels through the label stage's model slot, on a case with a known answer."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from features.store import FeatureStore
from pipelines.build import build
from pipelines.errors import SpecError
from pipelines.label import LabelSpec
from tests.helpers import make_spec

ZERO_SHOT = {
    "kind": "zero_shot",
    "encoder": {"name": "tests.colour_encoder:ColourJoint"},
    "prompt": "a {label} thing",
}


def _manifest(root, colours):
    rows = []
    for i, (name, bgr) in enumerate(colours):
        image = np.zeros((16, 16, 3), np.uint8)
        image[:] = bgr
        cv2.imwrite(str(root / f"{i}.png"), image)
        rows.append({"id": str(i), "image": f"{i}.png", "text": f"shape number {i}", "label": name})
    (root / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root / "m.jsonl"


@pytest.mark.usefixtures("ray_session")
def test_zero_shot_labels_unlabelled_samples_with_confidence(tmp_path):
    colours = [("red", (0, 0, 250)), ("green", (0, 250, 0)), ("blue", (250, 0, 0))] * 2
    manifest = _manifest(tmp_path, [(None, bgr) for _, bgr in colours])
    label = {"sources": [{"kind": "manifest"}, ZERO_SHOT], "vocabulary": ["red", "green", "blue"]}
    result = build(
        make_spec(tmp_path / "store", [{"kind": "manifest", "uri": str(manifest)}], label=label)
    )
    assert result.counts["samples"] == 6
    rows = FeatureStore(str(tmp_path / "store")).to_arrow("samples").to_pylist()
    expected = {f"{manifest}#{i}": name for i, (name, _) in enumerate(colours)}
    for row in rows:
        assert row["label"] == expected[row["source_uri"]]
        assert row["label_source"] == "zero_shot"
        assert row["label_confidence"] > 0.9


def test_zero_shot_needs_labels_and_a_joint_model():
    with pytest.raises(ValueError, match="needs `labels` or the spec's `vocabulary`"):
        LabelSpec.model_validate({"sources": [ZERO_SHOT]})
    with pytest.raises(ValueError, match="joint image\\+text encoder"):
        LabelSpec.model_validate(
            {
                "sources": [{**ZERO_SHOT, "encoder": {"name": "image_pixels"}}],
                "vocabulary": ["a", "b"],
            }
        )
    with pytest.raises((ValueError, SpecError), match="unknown encoder"):
        LabelSpec.model_validate(
            {"sources": [{**ZERO_SHOT, "encoder": {"name": "nope"}}], "vocabulary": ["a", "b"]}
        )
