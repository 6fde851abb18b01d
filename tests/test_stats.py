"""Store stats, their plot and an embedding map, on a pipeline-built store."""

from __future__ import annotations

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from features.stats import embedding_map, plot_stats, stats
from features.store import FeatureStore
from jobs.cli_query import register
from pipelines.build import build
from tests.helpers import corpus_sources, make_spec
from tests.test_search import unit, write_feature_set

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("stats") / "store"
    build(make_spec(root, corpus_sources(corpus)))
    fs = FeatureStore(str(root))
    keys = fs.to_arrow("samples", columns=["sample_id", "split", "label"])
    rng = np.random.default_rng(0)
    centres = {label: rng.standard_normal(8) for label in set(keys.column("label").to_pylist())}
    emb = [
        unit(centres[label] + 0.2 * rng.standard_normal(8)) for label in keys["label"].to_pylist()
    ]
    write_feature_set(fs, "clip", keys, {"emb": emb})
    return fs


def test_stats_counts_add_up(store):
    s = stats(store)
    samples = store.to_arrow("samples").to_pylist()
    assert s["rows"] == len(samples)
    assert sum(s["by_split"].values()) == len(samples)
    assert sum(s["by_label"].values()) == len(samples)
    assert s["by_modality"]["image"] == sum("image" in r["modalities"] for r in samples)
    assert sum(s["image_width"]["counts"]) == sum(r["image_width"] is not None for r in samples)
    assert sum(s["audio_duration"]["counts"]) == sum("audio" in r["modalities"] for r in samples)
    reasons = store.to_arrow("quarantine", columns=["error_type"]).column(0).to_pylist()
    assert s["quarantine"] == {r: reasons.count(r) for r in set(reasons)}
    assert stats(store, "samples", version=0)["rows"] == 0
    feature = stats(store, "features/clip")
    assert feature["rows"] == len(samples)
    assert "image_width" not in feature


def test_plot_and_embedding_map_are_pngs(store, tmp_path):
    out = plot_stats(stats(store), tmp_path / "stats.png")
    assert out.read_bytes()[:8] == PNG
    out = embedding_map(store, "clip", out_png=tmp_path / "map.png", max_points=50)
    assert out.read_bytes()[:8] == PNG


def test_cli_stats_writes_both_pictures(store, tmp_path):
    app, store_app = typer.Typer(), typer.Typer()
    app.add_typer(store_app, name="store")
    register(app, store_app)
    args = ["store", "stats", "features/clip", "--plot", str(tmp_path / "s.png")]
    args += ["--map", str(tmp_path / "m.png"), "--store", store.uri]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG
    result = CliRunner().invoke(app, ["store", "stats", "--store", store.uri])
    assert result.exit_code == 0, result.output
    assert "quarantine reasons" in result.output
