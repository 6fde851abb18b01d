"""Zero-shot labels through the label stage's model slot, on a case with a known answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from features.store import FeatureStore
from pipelines.build import build
from pipelines.errors import SpecError
from pipelines.label import LabelSpec
from pipelines.spec import write_spec
from tests.helpers import make_spec

ROOT = Path(__file__).resolve().parents[1]
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


def test_a_cli_build_labels_in_process_with_the_model_loaded_once(tmp_path):
    """Without Ray, collect stays in the CLI process at any size: the labeller's model
    loads there and the forked workers share it; the labels are the same."""
    colours = [("red", (0, 0, 250)), ("green", (0, 250, 0)), ("blue", (250, 0, 0))] * 4
    manifest = _manifest(tmp_path, [(None, bgr) for _, bgr in colours])
    label = {"sources": [ZERO_SHOT], "vocabulary": ["red", "green", "blue"]}
    resources = {"batch_size": 2, "in_process_workers": 2}
    source = [{"kind": "manifest", "uri": str(manifest)}]
    write_spec(
        make_spec(tmp_path / "store", source, label=label, resources=resources),
        tmp_path / "spec.yaml",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"PYTHONPATH": str(ROOT), "MMFP_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs", "build", str(tmp_path / "spec.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = FeatureStore(str(tmp_path / "store"))
    expected = {f"{manifest}#{i}": name for i, (name, _) in enumerate(colours)}
    rows = store.to_arrow("samples").to_pylist()
    assert {r["source_uri"]: r["label"] for r in rows} == expected
    stages = {s["stage"]: s["cpus"] for s in store.to_arrow("_stages").to_pylist()}
    assert stages["collect"] == 2  # forked workers ran the labeller
    assert "start ray" not in stages
