"""An encoder that fails on one row never blocks the store: that row is quarantined at
stage ``encode`` and the rest of its batch lands; later builds do not fail on it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from features.schema import SAMPLES, conform
from features.store import FeatureStore
from pipelines.build import build
from pipelines.encode import Encode, Preprocess, as_feature_input
from pipelines.encoders import EncoderConfig
from tests.adversarial.fragile_encoder import CountsCalls
from tests.helpers import make_spec

CAPTIONS = {
    "plain": "a plain caption",
    "boom": "this one says boom",  # FailsInPreprocess raises on it
    "thirteen": "13 characters",  # FailsInForward raises on length 13
    "other": "another caption",
}


@pytest.mark.usefixtures("ray_session")
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


def test_a_batch_that_passes_runs_each_step_once():
    """The row-by-row search for a failing row runs only when the batch fails: a passing
    batch is preprocessed once and goes through the model once (a GPU forward is costly)."""
    config = EncoderConfig(name="tests.adversarial.fragile_encoder:CountsCalls", batch_size=8)
    texts = ["a plain caption", "another caption", None]
    samples = conform(pa.table({"sample_id": ["a", "b", "c"], "text": texts}), SAMPLES)
    rows = as_feature_input(samples, is_view=False)
    CountsCalls.rows.update(preprocess=0, encode=0)
    out = Encode([config])(Preprocess([config])(rows))
    assert CountsCalls.rows == {"preprocess": 3, "encode": 3}
    assert out.column("error_type").null_count == 3

    texts[1] = "13 characters"  # FailsInForward raises on length 13
    samples = conform(pa.table({"sample_id": ["a", "b", "c"], "text": texts}), SAMPLES)
    rows = as_feature_input(samples, is_view=False)
    CountsCalls.rows.update(preprocess=0, encode=0)
    out = Encode([config])(Preprocess([config])(rows))
    # the batch failed in the model: once as a batch, once per row, once without the bad row
    assert CountsCalls.rows == {"preprocess": 3, "encode": 3 + 3 + 3}
    assert out.column("error_type").to_pylist() == [None, "EncodeFailed", None]
