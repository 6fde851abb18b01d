"""An encoder that fails on one row never blocks the store: that row is quarantined at
stage ``encode`` and the rest of its batch lands; later builds do not fail on it."""

from __future__ import annotations

import pytest

from features.store import FeatureStore
from pipelines.build import build
from tests.helpers import make_spec

pytestmark = pytest.mark.usefixtures("ray_session")
CAPTIONS = {
    "plain": "a plain caption",
    "boom": "this one says boom",  # FailsInPreprocess raises on it
    "thirteen": "13 characters",  # FailsInForward raises on length 13
    "other": "another caption",
}


def test_failing_rows_are_quarantined_and_the_rest_encoded(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for stem, text in CAPTIONS.items():
        (data / f"{stem}.txt").write_text(text)
    encoders = {
        "cpu": "tests.adversarial.fragile_encoder:FailsInPreprocess",
        "model": "tests.adversarial.fragile_encoder:FailsInForward",
    }
    encode = {
        "feature_sets": [
            {"name": name, "encoders": [{"name": path, "batch_size": 8}], "views": False}
            for name, path in encoders.items()
        ]
    }
    spec = make_spec(tmp_path / "store", [{"kind": "directory", "uri": str(data)}], encode=encode)
    first = build(spec)
    store = FeatureStore(str(tmp_path / "store"))
    rows = store.to_arrow("samples", columns=["sample_id", "text"]).to_pylist()
    texts = {r["sample_id"]: r["text"] for r in rows}
    for name, bad in (("cpu", CAPTIONS["boom"]), ("model", CAPTIONS["thirteen"])):
        ids = store.to_arrow(f"features/{name}", columns=["sample_id"]).column(0).to_pylist()
        encoded = {texts[i] for i in ids}
        assert encoded == set(CAPTIONS.values()) - {bad}
        assert first.feature_counts[name] == len(CAPTIONS) - 1
    quarantine = store.to_arrow("quarantine").to_pylist()
    assert sorted((q["stage"], q["error_type"]) for q in quarantine) == [
        ("encode", "EncodeFailed"),
        ("encode", "EncodeFailed"),
    ]
    assert any("says boom" in q["message"] for q in quarantine)
    assert any("illegal memory access" in q["message"] for q in quarantine)
    again = build(spec)  # the failing rows are tried again, and never quarantined twice
    assert again.counts["samples"] == 0
    assert store.to_arrow("quarantine").num_rows == 2
