"""Near-duplicate search (issue 16): fingerprints on known inputs, the pair search and the
keep rule, the generated precision/recall benchmark, and ``mmfp dedup`` marking without
deleting, reporting leakage, and readers leaving marked samples out."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import cv2
import librosa
import numpy as np
import pyarrow as pa
import pytest
import ray.data
from deltalake import DeltaTable, write_deltalake
from typer.testing import CliRunner

from benchmarks.neardup import accuracy, clustered_vectors, write_corpus
from features.duplicates import excluded_ids, write_duplicates
from features.errors import StoreError
from features.tables import TableStore
from jobs.cli import app
from jobs.demo.corpus import make_audio, make_image
from jobs.pretrain.arrays import row_filter
from pipelines.build import build
from pipelines.errors import SpecError
from pipelines.fingerprints import (
    audio_fingerprint,
    fingerprint_batch,
    image_fingerprint,
    normalise_text,
    text_signature,
)
from pipelines.neardup import embedding_prints, mark
from pipelines.pairs import IDENTICAL_RUN, cosine_pairs, pairs_in_group
from pipelines.spec import parse_spec, write_spec

SPOKEN = "a small red circle drawn on a white page next to a blue square"


def _jpeg(pixels: np.ndarray, quality: int, scale: float) -> np.ndarray:
    height, width = pixels.shape[:2]
    resized = cv2.resize(pixels, (round(width * scale), round(height * scale)))
    ok, data = cv2.imencode(".jpg", resized, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


def test_image_fingerprint_survives_reencoding_and_separates_one_class():
    rng = np.random.default_rng(0)
    images = [make_image(rng, 3) for _ in range(12)]  # one class: same shape and colour
    prints = np.array([image_fingerprint(p) for p in images])
    copies = np.array([image_fingerprint(_jpeg(p, 50, 0.75)) for p in images])
    assert (np.sum(prints * copies, axis=1) >= 0.99).all()
    similar = prints @ prints.T
    assert similar[np.triu_indices(12, 1)].max() < 0.99
    grey = cv2.cvtColor(images[0], cv2.COLOR_BGR2GRAY)  # a grey copy of a colour image
    assert float(image_fingerprint(grey) @ prints[0]) > 0.5
    blank = image_fingerprint(np.full((16, 16), 90, np.uint8))  # flat images are all alike
    assert float(blank @ image_fingerprint(np.zeros((40, 30, 3), np.uint8))) == pytest.approx(1)


def test_audio_fingerprint_survives_resampling_and_gain_and_separates_recordings():
    rng = np.random.default_rng(1)
    clips = [
        np.concatenate([make_audio(rng, k, 16_000, 0.25) for k in (2, *rng.integers(10, size=3))])
        for _ in range(10)
    ]
    prints = np.array([audio_fingerprint(c, 16_000) for c in clips])
    copies = [0.4 * librosa.resample(c, orig_sr=16_000, target_sr=22_050) for c in clips]
    moved = np.array([audio_fingerprint(c, 22_050) for c in copies])
    assert (np.sum(prints * moved, axis=1) >= 0.99).all()
    assert (prints @ prints.T)[np.triu_indices(10, 1)].max() < 0.99
    stereo = np.stack([clips[0], clips[0]], axis=1)
    assert float(audio_fingerprint(stereo, 16_000) @ prints[0]) > 0.999
    silent = audio_fingerprint(np.zeros(8000, np.float32), 8000)
    assert np.isfinite(silent).all()
    assert np.isfinite(audio_fingerprint(np.ones(10, np.float32) * 0.1, 8000)).all()  # tiny


def test_text_signature_ignores_spacing_and_case_only():
    assert normalise_text("  A small\tred\n circle ") == "a small red circle"
    same = text_signature(SPOKEN) == text_signature("  " + SPOKEN.upper().replace(" ", " \t "))
    assert same.all()
    other = text_signature(SPOKEN.replace("red", "green").replace("blue", "black"))
    assert np.mean(text_signature(SPOKEN) == other) < 0.9
    assert text_signature("").shape == text_signature(SPOKEN).shape


def test_pairs_in_a_group_and_the_keep_rule():
    vectors = np.eye(4, dtype=np.float32)
    vectors[1] = [0.999, 0.0447, 0, 0]  # near 0
    vectors[3] = [0.0, 0.0, 0.999, 0.0447]  # near 2
    group = pa.table(
        {"sample_id": ["a", "b", "c", "d"], "fingerprint": [v.tolist() for v in vectors]}
    )
    pairs = pairs_in_group(group, threshold=0.99, kind="cosine")
    assert pairs.select(["a", "b"]).to_pylist() == [{"a": "a", "b": "b"}, {"a": "c", "b": "d"}]
    signatures = pa.table(
        {"sample_id": ["x", "y", "z"], "fingerprint": [[1, 2, 3, 4], [1, 2, 3, 5], [9, 9, 9, 9]]}
    )
    near = pairs_in_group(signatures, threshold=0.75, kind="minhash")
    assert near.to_pylist() == [{"a": "x", "b": "y", "score": 0.75}]

    # a chain a~b~c: a is kept first, b is its duplicate, c is near only b (not kept): kept
    chain = pa.table(
        {"a": ["a", "b"], "b": ["b", "c"], "score": pa.array([0.99, 0.995], pa.float32())}
    )
    marks = mark(chain, {"a": 0, "b": 1, "c": 2})
    assert marks.select(["sample_id", "duplicate_of"]).to_pylist() == [
        {"sample_id": "b", "duplicate_of": "a"}
    ]
    # keeping c first instead: b is c's duplicate, a is kept (a and c are not near)
    marks = mark(chain, {"c": 0, "b": 1, "a": 2})
    assert marks.select(["sample_id", "duplicate_of"]).to_pylist() == [
        {"sample_id": "b", "duplicate_of": "c"}
    ]


def test_edge_cases_of_the_search():
    # identical fingerprints beyond IDENTICAL_RUN: a star around the first, not every pair
    same = [[1.0, 0.0]] * (IDENTICAL_RUN + 5)
    group = pa.table(
        {
            "sample_id": [f"s{i:05d}" for i in range(len(same) + 1)],
            "fingerprint": [*same, [0.9999, 0.0141]],  # and one near them
        }
    )
    pairs = pairs_in_group(group, threshold=0.99, kind="cosine")
    assert pairs.num_rows == IDENTICAL_RUN + 4 + 1  # the star, plus the near one to its centre
    assert set(pairs.column("a").to_pylist()) == {"s00000"}
    # a threshold of 1 still finds identical unit vectors (float32 products round below 1)
    unit = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    unit /= np.linalg.norm(unit)
    twins = pa.table({"sample_id": ["a", "b"], "fingerprint": [unit.tolist()] * 2})
    assert pairs_in_group(twins, threshold=1.0, kind="cosine").num_rows == 1
    # a block of views only (or of samples without the column) fingerprints to nothing
    views = pa.table({"sample_id": ["v"], "view": pa.array([0], pa.int32()), "e": [[1.0, 0.0]]})
    assert embedding_prints(views, column="e").num_rows == 0
    # a stored file the limits refuse now is left out, not a failed search
    ok, png = cv2.imencode(".png", make_image(np.random.default_rng(1), 0))
    batch = pa.table(
        {"sample_id": ["good", "huge", "none"], "image": [png.tobytes(), png.tobytes()[:40], None]}
    )
    prints = fingerprint_batch(batch, modality="image", max_image_pixels=10**7, max_audio_seconds=1)
    assert prints.column("sample_id").to_pylist() == ["good"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"methods": [{"method": "semantic"}]}, "needs `feature_set` and `column`"),
        ({"methods": [{"method": "image", "column": "x"}]}, "for semantic, not image"),
        (
            {"methods": [{"method": "image"}], "keep": "keep_highest_quality"},
            "needs `quality_stat`",
        ),
        ({"methods": [{"method": "image"}, {"method": "image"}]}, "methods repeat"),
        ({"methods": []}, "at least 1"),
        ({"methods": [{"method": "image", "threshold": 1.5}]}, "less than or equal to 1"),
    ],
)
def test_bad_near_duplicate_sections_are_refused(section, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({"sources": [{"kind": "directory", "uri": "x"}], "near_duplicates": section})


def test_a_spec_without_the_section_keeps_its_hash():
    raw = {"sources": [{"kind": "directory", "uri": "x"}]}
    # recorded by the code before near_duplicates existed (scheduled slots are keyed by it)
    assert parse_spec(raw).spec_hash() == parse_spec(dict(raw, near_duplicates=None)).spec_hash()
    with_section = dict(raw, near_duplicates={"methods": [{"method": "image"}]})
    assert parse_spec(with_section).spec_hash() != parse_spec(raw).spec_hash()


@pytest.mark.usefixtures("ray_session")
def test_cosine_pairs_across_clusters_find_the_injected_copies():
    vectors, truth = clustered_vectors(3000, 32, copies=30, seed=3)
    table = pa.table(
        {
            "sample_id": [f"v{i:08d}" for i in range(len(vectors))],
            "fingerprint": [v.tolist() for v in vectors],
        }
    )
    ds = ray.data.from_arrow(table).repartition(4)
    # 3 clusters, each vector compared in all of them (probes beyond the clusters: all)
    pairs = cosine_pairs(ds, 0.98, cluster_rows=1000, probes=4, seed=0)
    found = {frozenset((r["a"], r["b"])) for r in pairs.to_pylist()}
    assert found >= set(truth)
    exact = vectors @ vectors.T
    assert len(found) == int((exact[np.triu_indices(len(vectors), 1)] >= 0.98).sum())
    assert pairs.column("score").to_numpy().min() >= 0.98
    assert len(found) == pairs.num_rows  # each pair once, though found in every cluster


@pytest.mark.usefixtures("ray_session")
def test_injected_copies_are_found_with_precision_and_recall_over_095(tmp_path):
    args = Namespace(corpus="synthetic", samples=80, copy_fraction=0.25, seed=0)
    results = accuracy(args, tmp_path)
    assert results.pop("_corpus") == {"samples": 100, "injected": 20}
    for name, r in results.items():
        assert r["precision"] >= 0.95, (name, r)
        assert r["recall"] >= 0.95, (name, r)
    assert results["all (image, audio, text)"]["marked_correctly"] == 20


def _dedup_spec(tmp_path: Path, sections: dict | None = None, **section) -> tuple[Path, object]:
    write_corpus(tmp_path / "corpus", "synthetic", 24, 0.25, seed=1)
    raw = {
        "name": "dups",
        "sources": [
            {"kind": "manifest", "uri": str(tmp_path / "corpus" / "manifest.jsonl"), "name": "m"}
        ],
        "split": {"ratios": {"train": 0.5, "test": 0.5}, "seed": 3},
        "store": {"uri": str(tmp_path / "store")},
        "quality": {},
        "near_duplicates": {"methods": [{"method": "image"}, {"method": "audio"}], **section},
        **(sections or {}),
    }
    spec = parse_spec(raw)
    path = tmp_path / "spec.yaml"
    write_spec(spec, path)
    return path, spec


def _ids_by_name(store: TableStore) -> dict[str, str]:
    samples = store.to_arrow("samples", columns=["sample_id", "source_uri"])
    return {
        uri.rsplit("#", 1)[1]: sid
        for sid, uri in zip(*(c.to_pylist() for c in samples.columns), strict=True)
    }


def _splits(store: TableStore, table: str) -> dict[str, str]:
    rows = store.to_arrow(table, columns=["sample_id", "split"])
    return dict(zip(*(c.to_pylist() for c in rows.columns), strict=True))


@pytest.mark.usefixtures("ray_session")
def test_dedup_marks_copies_joins_their_splits_everywhere_and_readers_leave_them_out(
    tmp_path, monkeypatch
):
    encode = {"feature_sets": [{"name": "px", "encoders": [
        {"name": "image_pixels", "params": {"size": 8}}]}]}  # fmt: skip
    path, spec = _dedup_spec(tmp_path, {"encode": encode})
    build(spec)
    store = TableStore(spec.store.uri)
    rows_before = store.to_arrow("samples").num_rows
    ids = _ids_by_name(store)
    copies = {ids[n]: ids[n.removesuffix("-copy")] for n in ids if n.endswith("-copy")}
    assert len(copies) == 6
    split = _splits(store, "samples")
    crossing = sum(split[a] != split[b] for a, b in copies.items())
    assert crossing > 0  # every row is its own group: copies land by their own hash
    runner = CliRunner()

    dry = runner.invoke(app, ["dedup", str(path), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    report = json.loads(dry.output[dry.output.index("{") :])
    assert report["marked"] == 6
    assert report["written_version"] is None
    assert sum(report["cross_split_found"].values()) == crossing
    assert sum(report["moved"].values()) == crossing == report["joined_sets"]
    assert report["cross_split"] == {}  # what would be left once moved
    assert not store.exists("duplicates")
    assert _splits(store, "samples") == split

    # killed after moving samples, before the feature set and quality rows follow
    from features import split_moves

    commit = split_moves.RunCommits.commit

    def killed_after_samples(self, name):
        if name != "samples":
            raise KeyboardInterrupt
        return commit(self, name)

    monkeypatch.setattr(split_moves.RunCommits, "commit", killed_after_samples)
    assert runner.invoke(app, ["dedup", str(path)]).exit_code == 130
    monkeypatch.undo()
    moved = _splits(store, "samples")
    assert all(moved[a] == moved[b] for a, b in copies.items())
    assert _splits(store, "features/px") != moved  # not aligned yet
    assert not store.exists("duplicates")

    plot = tmp_path / "sets.png"  # the next dedup finishes the job
    done = runner.invoke(app, ["dedup", str(path), "--plot", str(plot)])
    assert done.exit_code == 0, done.output
    assert "6 samples marked from 6 pairs; written as duplicates v" in done.output
    assert "no near duplicate crosses a split" in done.output
    assert plot.stat().st_size > 10_000
    for table in ("features/px", "quality"):
        assert _splits(store, table) == moved, table
    assert _splits(store, "samples") == moved
    group = {r["sample_id"]: r["group_id"] for r in store.to_arrow("samples").to_pylist()}
    recorded = store.to_arrow("_split_moves").to_pylist()
    assert len(recorded) == crossing
    assert all(moved[ids[r["group_id"]]] == r["split"] for r in recorded)
    marks = store.to_arrow("duplicates").to_pylist()
    # keep_first. A copy was listed after its original, so it was ingested with it or later;
    # either way each original-copy pair is one mark, and the kept one is the other
    assert {frozenset((m["sample_id"], m["duplicate_of"])) for m in marks} == {
        frozenset(p) for p in copies.items()
    }
    assert {m["method"] for m in marks} == {"image+audio"}
    assert all(m["split"] == m["duplicate_of_split"] for m in marks)
    assert store.to_arrow("samples").num_rows == rows_before  # marked, never deleted
    stats = runner.invoke(app, ["store", "stats", "samples", "--store", spec.store.uri])
    assert "near duplicates marked by mmfp dedup" in stats.output
    assert "(cross-split)" not in stats.output
    again = runner.invoke(app, ["dedup", str(path), "--json"])
    assert json.loads(again.output[again.output.index("{") :])["moved_versions"] == {}

    # readers: the excluded ids, a training split filter, and an export
    marked = {m["sample_id"] for m in marks}
    assert set(excluded_ids(store).to_pylist()) == marked
    table = store.to_arrow("samples", columns=["sample_id", "split"]).append_column(
        "view", pa.array([-1] * rows_before, pa.int32())
    )
    for name in ("train", "test"):
        kept = table.filter(row_filter(name, include_views=False, exclude=excluded_ids(store)))
        assert (
            set(kept.column("sample_id").to_pylist())
            == {r["sample_id"] for r in table.to_pylist() if r["split"] == name} - marked
        )
    out = tmp_path / "export"
    exported = runner.invoke(
        app,
        ["export", str(out), "--to", "parquet", "--exclude-duplicates", "--store", spec.store.uri],
    )
    assert exported.exit_code == 0, exported.output
    written = pa.concat_tables(
        [pa.parquet.read_table(p) for p in sorted(out.glob("*.parquet"))]
    ).column("sample_id")
    assert set(written.to_pylist()) == set(ids.values()) - marked
    manifest = json.loads((out / "_mmfp-export.json").read_text())
    assert manifest["excluded_duplicates"] == 6
    assert manifest["versions"]["duplicates"] == store.version("duplicates")

    # an unlucky operator deletes a kept sample: its duplicate is no longer left out
    kept_one = marks[0]["duplicate_of"]
    DeltaTable(store.table_uri("samples")).delete(f"sample_id = '{kept_one}'")
    assert marks[0]["sample_id"] not in set(excluded_ids(store).to_pylist())
    # a search of an older samples version must not replace a newer one's marks
    newer = store.to_arrow("duplicates")
    write_duplicates(store, newer, samples_version=store.version("samples"), run_id="r2")
    with pytest.raises(StoreError, match="run it again on the latest version"):
        write_duplicates(store, newer, samples_version=0, run_id="r3")

    # a sample of a moved group that arrives later lands where its group now is
    mover = recorded[0]["group_id"]
    manifest = tmp_path / "corpus" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    entry = next(e for e in map(json.loads, lines) if e["group"] == mover)
    entry.update(id="late", text="a late caption")
    with manifest.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    build(spec)
    late = _ids_by_name(store)["late"]
    assert group[ids[mover]] == mover
    assert _splits(store, "samples")[late] == recorded[0]["split"]


@pytest.mark.usefixtures("ray_session")
def test_keep_quality_keeps_the_larger_image_and_text_alone_can_match(tmp_path):
    path, spec = _dedup_spec(
        tmp_path, keep="keep_highest_quality", quality_stat="image_width", same_split=False
    )
    build(spec)
    store = TableStore(spec.store.uri)
    result = CliRunner().invoke(app, ["dedup", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["moved"] == {}  # same_split: false only reports the leaks
    assert report["cross_split"] == report["cross_split_found"] != {}
    assert not store.exists("_split_moves")
    width = {
        r["sample_id"]: r["image_width"]
        for r in store.to_arrow("samples", columns=["sample_id", "image_width"]).to_pylist()
    }
    marks = store.to_arrow("duplicates").to_pylist()
    assert len(marks) == 6
    for m in marks:
        assert width[m["duplicate_of"]] >= width[m["sample_id"]]

    # match: all whose first method finds nothing: no candidates to confirm
    strict = {"methods": [{"method": "image", "threshold": 0.999999}, {"method": "audio"}]}
    empty = tmp_path / "none.png"  # and a picture of no duplicates says so
    assert _dry_run(path, spec, strict, "--plot", str(empty)) == {"image": 0, "audio": 0}
    assert empty.stat().st_size > 1000
    # match: any with text alone: every copy's caption differs only in spacing
    assert _dry_run(path, spec, {"methods": [{"method": "text"}], "match": "any"}) == {"text": 6}

    # semantic: a feature set's embeddings (here the image fingerprints themselves, plus a
    # row of a sample no longer stored that copies a stored one: it must not count)
    samples = store.to_arrow("samples", columns=["sample_id", "split", "image"]).to_pylist()
    vectors = [
        image_fingerprint(cv2.imdecode(np.frombuffer(r["image"], np.uint8), cv2.IMREAD_COLOR))
        for r in samples
    ]
    ids = [r["sample_id"] for r in samples]
    rows = pa.table(
        {
            "sample_id": [*ids, "gone"],
            "view": pa.array([-1] * (len(ids) + 1), pa.int32()),
            "split": [r["split"] for r in samples] + ["train"],
            "image_embedding": [v.tolist() for v in [*vectors, vectors[0]]],
        }
    )
    write_deltalake(store.table_uri("features/fp"), rows)
    semantic = {"method": "semantic", "feature_set": "fp", "column": "image_embedding"}
    found = _dry_run(path, spec, {"methods": [dict(semantic, epsilon=0.01)]})
    assert found == {"semantic:fp:image_embedding": 6}
    # a features/ table without mmfp's description still has its stats (no cross-modal part)
    result = CliRunner().invoke(app, ["store", "stats", "features/fp", "--store", spec.store.uri])
    assert result.exit_code == 0, result.output
    assert "cross-modal" not in result.output


def _dry_run(path: Path, spec: object, section: dict, *options: str) -> dict[str, int]:
    """``mmfp dedup --dry-run --json`` with another near_duplicates section: pairs per method."""
    changed = parse_spec({**json.loads(spec.model_dump_json()), "near_duplicates": section})
    write_spec(changed, path)
    result = CliRunner().invoke(app, ["dedup", str(path), "--dry-run", "--json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])["pairs_by_method"]


def test_dedup_without_a_section_is_a_clear_error(tmp_path):
    spec = parse_spec({"sources": [{"kind": "directory", "uri": str(tmp_path)}],
                       "store": {"uri": str(tmp_path / "store")}})  # fmt: skip
    path = tmp_path / "spec.yaml"
    write_spec(spec, path)
    result = CliRunner().invoke(app, ["dedup", str(path)])
    assert result.exit_code != 0
    assert "no `near_duplicates` section" in result.output
    assert "Traceback" not in result.output


def test_a_dedup_that_loses_a_race_writes_nothing(tmp_path, monkeypatch):
    from features import duplicates
    from features.schema import DUPLICATES, conform

    store = TableStore(str(tmp_path / "store"))

    def marks(sample: str, version: int) -> pa.Table:
        row = {"sample_id": sample, "duplicate_of": "kept", "samples_version": version}
        return conform(pa.Table.from_pylist([row]), DUPLICATES)

    write_duplicates(store, marks("first", 1), samples_version=1, run_id="a")
    checked = duplicates.marked_version

    def a_second_writer_commits_meanwhile(dt):
        answer = checked(dt)
        write_deltalake(store.table_uri("duplicates"), marks("other", 3), mode="overwrite")
        return answer

    monkeypatch.setattr(duplicates, "marked_version", a_second_writer_commits_meanwhile)
    with pytest.raises(StoreError, match="another `mmfp dedup` committed"):
        write_duplicates(store, marks("mine", 2), samples_version=2, run_id="b")
    assert store.to_arrow("duplicates").column("sample_id").to_pylist() == ["other"]
