"""End to end on a local Ray: sources -> samples + quarantine in a real Delta store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pyarrow.dataset as pads
import pytest

from features.store import FeatureStore
from pipelines.build import build
from pipelines.errors import SpecError
from tests.helpers import corpus_sources, expected_quarantine, make_spec

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """One full build of the corpus (good and broken sources) and its store."""
    store_dir = tmp_path_factory.mktemp("built") / "store"
    spec = make_spec(store_dir, corpus_sources(corpus))
    result = build(spec)
    return spec, result, FeatureStore(str(store_dir))


def _good_count(corpus) -> int:
    # good inputs of the broken sources: good_000..002 (dir) and ok_a, ok_b (manifest)
    return sum(corpus["counts"].values()) + 3 + 2


def test_every_input_is_a_sample_or_a_quarantine_row(built, corpus):
    _, result, store = built
    samples = store.to_arrow("samples")
    quarantine = store.to_arrow("quarantine")
    assert samples.num_rows == _good_count(corpus)
    assert samples.num_rows + quarantine.num_rows == result.inputs
    assert result.counts["samples"] == samples.num_rows
    assert len(set(samples.column("sample_id").to_pylist())) == samples.num_rows


def test_each_broken_input_is_quarantined_with_its_reason(built, corpus):
    _, _, store = built
    got = {
        r["uri"]: r["error_type"]
        for r in store.to_arrow("quarantine", columns=["uri", "error_type"]).to_pylist()
    }
    assert got == expected_quarantine(corpus)
    assert len(set(got.values())) >= 10


def test_samples_keep_bytes_and_media_facts(built):
    _, _, store = built
    rows = store.to_arrow("samples").to_pylist()
    by_source = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    assert set(by_source) == {"photos", "catalog", "shards", "broken", "broken-manifest"}
    for row in rows:
        assert row["split"] in {"train", "val", "test"}
        assert row["run_id"]
        assert row["ingested_at"] is not None
        if "image" in row["modalities"]:
            assert row["image"][:2] in (b"\xff\xd8", b"\x89P")
            assert row["image_width"] > 0
            assert row["image_height"] > 0
        if "audio" in row["modalities"]:
            assert row["audio_sample_rate"] == 16000
            assert row["audio_duration"] == pytest.approx(0.5, abs=0.01)
    photos = by_source["photos"]
    assert all(r["label"] and r["label_source"] == "folder" for r in photos)
    assert all(r["label_source"] == "manifest" and r["group_id"] for r in by_source["catalog"])
    assert all(r["label_source"] == "webdataset" for r in by_source["shards"])
    assert {"text", "image", "audio"} == {m for r in photos for m in r["modalities"]}
    assert any(len(r["modalities"]) < 3 for r in photos)  # subsets of modalities are fine


def test_groups_never_straddle_splits(built):
    _, _, store = built
    rows = store.to_arrow("samples", columns=["group_id", "split"]).to_pylist()
    splits_by_group = {}
    for r in rows:
        if r["group_id"]:
            splits_by_group.setdefault(r["group_id"], set()).add(r["split"])
    assert splits_by_group
    assert all(len(s) == 1 for s in splits_by_group.values())


def test_rebuild_adds_nothing_and_commits_nothing(built):
    spec, first, store = built
    before = {name: store.version(name) for name in ("samples", "quarantine", "_runs")}
    again = build(spec)
    assert again.counts["samples"] == 0
    assert again.counts["quarantined"] == 0
    assert again.counts["already_stored"] == first.counts["samples"] + first.counts["duplicates"]
    assert not again.changed
    assert {name: store.version(name) for name in before} == before


def test_changed_split_settings_are_refused_before_anything_moves(built):
    """A new seed or a newly pinned group would split new samples of a stored group
    differently from the stored ones: the build refuses and commits nothing."""
    spec, _, store = built
    before = store.version("samples")
    assert json.loads(store.properties("samples")["mmfp.split"])["seed"] == spec.split.seed
    group = store.to_arrow("samples", columns=["group_id"]).column(0).drop_null()[0].as_py()
    for change in ({"seed": spec.split.seed + 1}, {"groups": {"test": [group]}}):
        moved = spec.model_copy(update={"split": spec.split.model_copy(update=change)})
        with pytest.raises(SpecError, match="split settings changed"):
            build(moved)
    assert store.version("samples") == before


def test_more_sources_append_only_new_samples(corpus, tmp_path):
    store_dir = tmp_path / "store"
    first = build(make_spec(store_dir, corpus_sources(corpus, broken=False)[:1]))
    store = FeatureStore(str(store_dir))
    v1 = store.version("samples")
    # the same photos again (copied under another name) plus the manifest source
    copy = tmp_path / "photos-copy"
    shutil.copytree(corpus["photos"], copy)
    sources = [
        {"kind": "directory", "name": "photos-copy", "uri": str(copy), "class_folders": True},
        corpus_sources(corpus, broken=False)[1],
    ]
    second = build(make_spec(store_dir, sources))
    assert second.counts["already_stored"] == first.counts["samples"]
    assert second.counts["samples"] == corpus["counts"]["catalog"]
    assert store.version("samples") == v1 + 1
    assert store.to_arrow("samples").num_rows == first.counts["samples"] + second.counts["samples"]
    old = store.to_arrow("samples", version=v1)
    assert old.num_rows == first.counts["samples"]  # time travel to the first build
    runs = store.to_arrow("_runs").to_pylist()
    assert [r["samples_written"] for r in sorted(runs, key=lambda r: r["started_at"])] == [
        first.counts["samples"],
        second.counts["samples"],
    ]


def test_exact_duplicates_within_a_run_land_once(corpus, tmp_path):
    copy = tmp_path / "photos-twice"
    shutil.copytree(corpus["photos"], copy / "a")
    shutil.copytree(corpus["photos"], copy / "b")
    result = build(make_spec(tmp_path / "store", [{"kind": "directory", "uri": str(copy)}]))
    n = corpus["counts"]["photos"]
    assert result.counts["samples"] == n
    assert result.counts["duplicates"] == n
    quarantine = FeatureStore(str(tmp_path / "store")).to_arrow("quarantine").to_pylist()
    assert {q["error_type"] for q in quarantine} == {"DuplicateSample"}
    assert all("same content as" in q["message"] for q in quarantine)


def test_file_uri_source_reads_like_a_path(corpus, tmp_path):
    uri = Path(corpus["photos"]).as_uri()
    result = build(make_spec(tmp_path / "store", [{"kind": "directory", "uri": uri}]))
    assert result.counts["samples"] == corpus["counts"]["photos"]


def test_store_reads_back_through_ray_duckdb_and_pyarrow(built):
    _, result, store = built
    n = result.counts["samples"]
    ds = store.table("samples", columns=["sample_id", "split"])
    assert ds.count() == n
    assert set(ds.to_pandas()["split"]) <= {"train", "val", "test"}
    assert store.to_pandas("samples", columns=["sample_id"]).shape == (n, 1)
    assert store.sql("SELECT count(*) AS n FROM samples").column("n")[0].as_py() == n
    # plain pyarrow + DuckDB over the files the Delta log lists, as a user would
    dt = store.delta("samples")
    files = dt.file_uris()
    assert pads.dataset(files, format="parquet").count_rows() == n
    con = duckdb.connect()
    con.register("samples", dt.to_pyarrow_dataset())
    by_split = dict(con.sql("SELECT split, count(*) FROM samples GROUP BY 1").fetchall())
    assert sum(by_split.values()) == n
    assert by_split["train"] > by_split["test"]


def test_history_records_the_run(built):
    _, result, store = built
    latest = store.history("samples")[0]
    assert latest["run_id"] == result.run_id
    assert latest["rows_added"] == result.counts["samples"]
    run = store.to_arrow("_runs").to_pylist()[0]
    assert run["run_id"] == result.run_id
    assert run["inputs"] == result.inputs
    assert run["spec_hash"]
    assert run["code_version"].startswith("0.1.0")


def test_label_stage_rules_vocabulary_and_quarantine(corpus, tmp_path):
    sources = corpus_sources(corpus, broken=False)[:2]
    vocabulary = ["circle", "square", "triangle", "star", "cross"]
    label = {
        "sources": [
            {"kind": "rules", "keywords": {"circle": ["circle"], "square": ["square"]}},
            {"kind": "manifest"},
            {"kind": "folder"},
        ],
        "vocabulary": vocabulary,
    }
    result = build(make_spec(tmp_path / "store", sources, label=label))
    store = FeatureStore(str(tmp_path / "store"))
    samples = store.to_arrow("samples", columns=["text", "label", "label_source"]).to_pylist()
    quarantine = store.to_arrow("quarantine").to_pylist()
    assert samples
    assert all(r["label"] in vocabulary for r in samples)
    for r in samples:
        if r["label_source"] == "rules":
            assert r["label"] in r["text"]
    assert {"rules", "manifest", "folder"} <= {r["label_source"] for r in samples}
    assert quarantine
    assert {q["error_type"] for q in quarantine} == {"UnknownLabel"}
    assert all(q["stage"] == "label" for q in quarantine)
    assert result.inputs == len(samples) + len(quarantine)
    props = store.properties("samples")
    assert json.loads(props["mmfp.label_vocabulary"]) == vocabulary
