"""Quality stats on known inputs, filters in a build, and ``mmfp filter`` moving samples
out and back (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import soundfile as sf
from deltalake import DeltaTable
from typer.testing import CliRunner

from features.stats import stats as table_stats
from features.tables import TableStore
from jobs.cli import app
from jobs.demo.corpus import make_image
from pipelines.build import build
from pipelines.build.refilter import latest_stats
from pipelines.errors import SpecError
from pipelines.filters import QualitySpec, stat_table
from pipelines.quality import (
    audio_stats,
    image_stats,
    perceptual_hash,
    sample_stats,
    text_stats,
)
from pipelines.spec import load_spec, parse_spec, write_spec
from tests.helpers import make_spec

SR = 16_000
COLOUR_JOINT = "tests.colour_encoder:ColourJoint"  # image and caption in one space
SOURCE = {"kind": "directory", "name": "src"}
CAPTIONS = [
    "a small red circle drawn on a white page",
    "the number seven written by hand in black ink",
    "two blue squares next to each other on grey paper",
    "a green triangle pointing up in the middle of the picture",
    "an orange star with five points on a dark background",
    "three yellow dots in a row across the image",
]


def _tone(rng: np.random.Generator, seconds: float = 0.5, level: float = 0.4) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    y = level * np.sin(2 * np.pi * rng.uniform(200, 600) * t) + rng.normal(0, 0.002, t.size)
    return y.astype(np.float32)


def test_text_stats_on_known_inputs():
    plain = text_stats("the quick brown fox jumps over the lazy dog near the river bank")
    spam = text_stats("buy now and save " * 12)
    assert plain["text_repeat_ratio"] == 0.0
    assert spam["text_repeat_ratio"] > 0.9
    assert plain["text_words"] == 13
    assert plain["text_chars"] == 63
    assert text_stats("ABC def")["text_upper_ratio"] == pytest.approx(0.5)
    assert text_stats("1234 ab")["text_digit_ratio"] == pytest.approx(4 / 7)
    assert text_stats("!!!???")["text_special_ratio"] == 1.0
    assert plain["text_lang"] == "en"
    german = "Der schnelle braune Fuchs springt über den faulen Hund und läuft nach Hause."
    assert text_stats(german)["text_lang"] == "de"
    assert text_stats("12345")["text_lang"] is None  # no letters: no language


def test_image_stats_on_known_inputs():
    rng = np.random.default_rng(0)
    sharp = make_image(rng, 3, size=128)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 4)
    assert image_stats(blurred)["image_blur"] < image_stats(sharp)["image_blur"] / 5
    grey = np.full((32, 48, 3), 128, np.uint8)
    stats = image_stats(grey)
    assert stats["image_colourfulness"] == pytest.approx(0.0)
    assert stats["image_brightness"] == pytest.approx(128 / 255, abs=1e-3)
    assert stats["image_aspect"] == pytest.approx(1.5)
    assert image_stats(np.full((8, 8, 3), (0, 0, 255), np.uint8))["image_colourfulness"] > 80


def test_phash_survives_reencoding_and_separates_different_images():
    rng = np.random.default_rng(1)
    a, b = make_image(rng, 0, size=128), make_image(rng, 5, size=128)
    ok, jpeg = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 40])
    reencoded = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    smaller = cv2.resize(a, (96, 96))

    def bits(x, y):
        return bin(int(x, 16) ^ int(y, 16)).count("1")

    grey = [cv2.cvtColor(x, cv2.COLOR_BGR2GRAY) for x in (a, b, reencoded, smaller)]
    ha, hb, hr, hs = map(perceptual_hash, grey)
    assert bits(ha, hr) <= 4
    assert bits(ha, hs) <= 6
    assert bits(ha, hb) >= 16


def test_audio_stats_on_known_inputs():
    rng = np.random.default_rng(2)
    clean = _tone(rng)[:, None]
    clipped = np.clip(clean * 10, -1, 1)
    padded = np.concatenate([np.zeros((SR, 1), np.float32), clean])
    spoken = np.concatenate([clean, np.zeros_like(clean)])  # a word, then a pause
    spoken += rng.normal(0, 0.002, spoken.shape).astype(np.float32)
    noisy = spoken + rng.normal(0, 0.1, spoken.shape).astype(np.float32)
    assert audio_stats(clean, SR)["audio_clip_ratio"] == 0.0
    assert audio_stats(clipped, SR)["audio_clip_ratio"] > 0.5
    assert audio_stats(padded, SR)["audio_silence_ratio"] == pytest.approx(2 / 3, abs=0.02)
    assert audio_stats(padded, SR)["audio_duration"] == pytest.approx(1.5)
    assert audio_stats(spoken, SR)["audio_snr_db"] > 30
    assert audio_stats(noisy, SR)["audio_snr_db"] < 12
    assert audio_stats(clean, SR)["audio_rms_db"] == pytest.approx(-11.0, abs=0.2)  # 0.4 / √2
    silent = audio_stats(np.zeros((SR, 2), np.float32), SR)
    assert silent["audio_rms_db"] == -100.0
    assert silent["audio_snr_db"] == 0.0


@pytest.mark.parametrize(
    ("pixels", "audio", "text"),
    [
        (np.zeros((1, 1), np.uint8), np.zeros((1, 1), np.float32), "😀😀😀"),
        (np.zeros((1, 500, 4), np.uint8), np.ones((10, 2), np.float32), "\u200b"),
        ((np.arange(1200) * 50).astype(np.uint16).reshape(20, 20, 3), None, "x" * 20_000),
        (np.linspace(0, 1, 300, dtype=np.float32).reshape(10, 10, 3), None, "日本語のテキストです"),
    ],
)
def test_stats_of_degenerate_media_are_defined(pixels, audio, text):
    """A stat that raised would refuse a good input (``UnreadableInput``): none does on
    one-pixel, four-channel, 16-bit or float images, one-frame or full-scale audio, or
    text with no letters."""
    stats = sample_stats(text, pixels, audio, SR if audio is not None else None)
    numeric = [v for k, v in stats.items() if isinstance(v, float)]
    assert numeric
    assert all(np.isfinite(numeric))
    assert len(stats["image_phash"]) == 16


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ([{"stat": "image_sharpness", "min": 1}], "unknown stat 'image_sharpness'"),
        ([{"stat": "image_blur", "min": 5, "max": 1}], "min 5.0 > max 1.0"),
        ([{"stat": "image_blur", "allowed": ["x"]}], "is a number"),
        ([{"stat": "text_lang", "min": 1}], "is not a number"),
        ([{"stat": "image_blur", "min": 1}, {"stat": "image_blur", "max": 9}], "repeated"),
        ([{"predicate": "not a path"}], "package.module:function"),
    ],
)
def test_bad_filters_are_refused_with_the_reason(filters, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(
            {"sources": [{"kind": "directory", "uri": "x"}], "quality": {"filters": filters}}
        )


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """Six good samples and three bad ones: a blurred image, a clipped recording, a
    caption that repeats itself; plus a narrow image for the predicate."""
    root = tmp_path / "src"
    root.mkdir()
    rng = np.random.default_rng(7)
    for i, caption in enumerate(CAPTIONS):
        cv2.imwrite(str(root / f"good{i}.png"), make_image(rng, i, size=96))
        sf.write(root / f"good{i}.wav", _tone(rng), SR, subtype="PCM_16")
        (root / f"good{i}.txt").write_text(caption)
    sharp = make_image(rng, 7, size=96)
    cv2.imwrite(str(root / "blurry.png"), cv2.GaussianBlur(sharp, (0, 0), 6))
    (root / "blurry.txt").write_text("a photo of a cat sitting on a chair by the window")
    sf.write(root / "loud.wav", np.clip(_tone(rng) * 10, -1, 1), SR, subtype="PCM_16")
    (root / "loud.txt").write_text("a dog barking very loudly in the back yard today")
    (root / "spam.txt").write_text("click here for free prizes " * 8)
    cv2.imwrite(str(root / "narrow.png"), make_image(rng, 2, size=96)[:, :40])
    return root


FILTERS = [
    {"stat": "image_blur", "min": 100, "name": "blur"},
    {"stat": "audio_clip_ratio", "max": 0.01},
    {"stat": "text_repeat_ratio", "max": 0.5},
]


def _spec(tmp_path: Path, source: Path, filters: list[dict], **sections):
    return make_spec(
        tmp_path / "store",
        [SOURCE | {"uri": str(source)}],
        quality={"filters": filters},
        **sections,
    )


def _state(store: TableStore) -> tuple[set[str], dict[str, str]]:
    """(source names of the samples, source name -> quarantine type)."""
    kept = {Path(u).name for u in store.to_arrow("samples").column("source_uri").to_pylist()}
    rows = store.to_arrow("quarantine").to_pylist()
    return kept, {Path(r["uri"]).name: r["error_type"] for r in rows}


@pytest.mark.usefixtures("ray_session")
def test_filters_move_exactly_the_failing_samples_and_filter_moves_them_back(tmp_path, source):
    spec = _spec(tmp_path, source, FILTERS, augment={"views_per_sample": 1, "seed": 0})
    result = build(spec)
    store = TableStore(spec.store.uri)
    kept, quarantined = _state(store)
    assert quarantined == {
        "blurry": "Filtered:blur",
        "loud": "Filtered:audio_clip_ratio",
        "spam": "Filtered:text_repeat_ratio",
    }
    assert kept == {f"good{i}" for i in range(6)} | {"narrow"}
    assert result.counts["filtered"] == 3
    assert result.counts["quarantined"] == 0
    message = {r["error_type"]: r["message"] for r in store.to_arrow("quarantine").to_pylist()}
    assert message["Filtered:blur"].startswith("image_blur=")
    assert "< min 100" in message["Filtered:blur"]
    stats = latest_stats(store, store.version("quality"))
    assert stats.num_rows == 10  # kept and filtered samples alike
    assert len(set(stats.column("sample_id").to_pylist())) == 10
    ledger = {
        Path(r["input_key"]).name: r["outcome"] for r in store.to_arrow("_inputs").to_pylist()
    }
    assert ledger["loud"] == "Filtered:audio_clip_ratio"
    assert ledger["good0"] == "sample"

    # a rebuild re-reads everything and adds nothing: no second stats or quarantine rows
    build(spec)
    assert store.to_arrow("quality").num_rows == 10
    assert _state(store) == (kept, quarantined)

    # tighter: the predicate refuses the narrow image; looser: the clipping filter goes
    tighter = [*FILTERS[:1], FILTERS[2], {"predicate": "tests.qualityfns:wide_enough"}]
    changed = _spec(tmp_path, source, tighter, augment={"views_per_sample": 1, "seed": 0})
    spec_path = tmp_path / "changed.yaml"
    write_spec(changed, spec_path)
    runner = CliRunner()
    dry = runner.invoke(app, ["filter", str(spec_path), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.output)
    assert (plan["move_out"], plan["bring_back"], plan["backfill"]) == (1, 1, 0)
    per_filter = {f["filter"]: f for f in plan["filters"]}
    assert per_filter["wide_enough"]["kept_failing"] == 1
    assert per_filter["blur"]["refused_now"] == 1
    assert _state(store) == (kept, quarantined)  # a dry run changes nothing

    applied = runner.invoke(app, ["filter", str(spec_path)])
    assert applied.exit_code == 0, applied.output
    kept, quarantined = _state(store)
    assert quarantined == {
        "blurry": "Filtered:blur",
        "spam": "Filtered:text_repeat_ratio",
        "narrow": "Filtered:wide_enough",
    }
    assert "loud" in kept
    assert "narrow" not in kept
    sample_ids = set(store.to_arrow("samples").column("sample_id").to_pylist())
    view_ids = set(store.to_arrow("views").column("sample_id").to_pylist())
    train = store.to_arrow("samples").filter(pc.equal(pc.field("split"), "train"))
    assert view_ids == set(train.column("sample_id").to_pylist()) <= sample_ids

    # the same spec from scratch ends in the same store: filtering again is not lossy
    fresh = _spec(tmp_path / "fresh", source, tighter, augment={"views_per_sample": 1, "seed": 0})
    (tmp_path / "fresh").mkdir()
    build(fresh)
    assert _state(TableStore(fresh.store.uri)) == (kept, quarantined)
    again = runner.invoke(app, ["filter", str(spec_path), "--dry-run", "--json"])
    assert (json.loads(again.output)["move_out"], json.loads(again.output)["bring_back"]) == (0, 0)


@pytest.mark.usefixtures("ray_session")
def test_filter_backfills_stats_of_a_store_built_without_them(tmp_path, source):
    plain = make_spec(
        tmp_path / "store", [{"kind": "directory", "uri": str(source), "name": "src"}]
    )
    build(plain)
    store = TableStore(plain.store.uri)
    assert not store.exists("quality")
    assert store.to_arrow("samples").num_rows == 10
    spec_path = tmp_path / "quality.yaml"
    write_spec(_spec(tmp_path, source, FILTERS), spec_path)
    result = CliRunner().invoke(app, ["filter", str(spec_path)])
    assert result.exit_code == 0, result.output
    assert "10 stored samples got stats first" in " ".join(result.output.split())
    kept, quarantined = _state(store)
    assert set(quarantined) == {"blurry", "loud", "spam"}
    assert len(kept) == 7
    # a filter run killed after its samples commit, before its ledger commit, leaves an
    # input the ledger calls stored with no sample: the next run reads it again
    gone = store.to_arrow("samples").column("sample_id")[0].as_py()
    DeltaTable(store.table_uri("samples")).delete(f"sample_id = '{gone}'")
    healed = CliRunner().invoke(app, ["filter", str(spec_path)])
    assert healed.exit_code == 0, healed.output
    assert "1 inputs whose sample is missing read again" in " ".join(healed.output.split())
    assert _state(store) == (kept, quarantined)
    summary = table_stats(store, "quality")
    assert summary["rows"] == 10
    blur = summary["stats"]["image_blur"]
    assert sum(p["n"] for p in blur["splits"].values()) == 8  # every sample with an image
    assert sum(sum(p["counts"]) for p in blur["splits"].values()) == 8


def test_a_broken_predicate_is_a_clear_error(tmp_path, source):
    spec = _spec(tmp_path, source, [{"predicate": "tests.qualityfns:one_value"}])
    quality = spec.quality
    assert isinstance(quality, QualitySpec)
    stats = stat_table(pa.table({"image_width": pa.array([10, 60], pa.int32())}))
    with pytest.raises(SpecError, match="returned 1 values for 2 rows"):
        quality.first_failure(stats)
    missing = QualitySpec(filters=[{"predicate": "tests.qualityfns:nope"}])
    with pytest.raises(SpecError, match="cannot be imported"):
        missing.first_failure(stats)
    spec_path = tmp_path / "spec.yaml"
    write_spec(spec, spec_path)
    runner = CliRunner()
    nothing = runner.invoke(app, ["filter", str(spec_path), "--dry-run"])
    assert nothing.exit_code == 2
    assert "no samples in" in nothing.output
    write_spec(make_spec(tmp_path / "store", [SOURCE | {"uri": str(source)}]), spec_path)
    unfiltered = runner.invoke(app, ["filter", str(spec_path), "--dry-run"])
    assert unfiltered.exit_code == 2
    assert "the spec has no `quality` section" in unfiltered.output


def test_cross_modal_similarity_of_a_joint_encoders_columns(tmp_path):
    from deltalake import write_deltalake

    from features.crossmodal import joint_pairs, similarities
    from features.metadata import ColumnMeta, EncoderMeta, FeatureSetMeta
    from features.schema import conform, feature_schema, list_of

    meta = FeatureSetMeta(
        encoders=[EncoderMeta(name="joint"), EncoderMeta(name="other")],
        columns={
            "image_emb": ColumnMeta(shape=[2], encoder="joint"),
            "text_emb": ColumnMeta(shape=[2], encoder="joint"),
            "audio_emb": ColumnMeta(shape=[3], encoder="other"),  # another space: no pair
        },
        samples_version=0,
    )
    assert joint_pairs(meta) == [("image_emb", "text_emb")]
    floats = list_of(pa.float32())
    rows = pa.table(
        {
            "sample_id": ["same", "orthogonal", "opposite", "no-text", "flat", "same"],
            "view": pa.array([-1, -1, -1, -1, -1, 0], pa.int32()),  # a view's row is left out
            "split": ["train", "train", "test", "test", "test", "train"],
            "image_emb": pa.array([[1, 0], [2, 0], [1, 1], [1, 0], [0, 0], [0, 1]], floats),
            "text_emb": pa.array([[3, 0], [0, 1], [-1, -1], None, [1, 0], [1, 0]], floats),
            "audio_emb": pa.array([[1, 0, 0]] * 6, floats),
        }
    )
    store = TableStore(str(tmp_path / "store"))
    schema = feature_schema({c: floats for c in ("image_emb", "text_emb", "audio_emb")})
    store.ensure_table("features/fs", schema=schema, properties=meta.to_properties())
    write_deltalake(store.table_uri("features/fs"), conform(rows, schema), mode="append")

    sims = similarities(store, "fs").sort_by("sample_id").to_pylist()
    got = {r["sample_id"]: r["image_text_similarity"] for r in sims}
    assert got["no-text"] is None  # a missing modality
    assert got["flat"] is None  # an all-zero embedding has no direction
    known = {k: got[k] for k in ("same", "orthogonal", "opposite")}
    assert known == pytest.approx({"same": 1.0, "orthogonal": 0.0, "opposite": -1.0})
    plot = tmp_path / "fs.png"
    result = CliRunner().invoke(
        app, ["store", "stats", "features/fs", "--store", store.uri, "--plot", str(plot)]
    )
    assert result.exit_code == 0, result.output
    assert "cross-modal similarity" in result.output
    lowest = result.output[result.output.index("lowest image_text_similarity") :]
    assert lowest.index("opposite") < lowest.index("orthogonal") < lowest.index("same")
    assert plot.stat().st_size > 5_000


@pytest.mark.usefixtures("ray_session")
def test_cross_modal_filter_moves_captions_that_do_not_match_their_image(tmp_path):
    root = tmp_path / "colours"
    root.mkdir()
    bgr = {"red": (0, 0, 255), "green": (0, 255, 0), "blue": (255, 0, 0)}
    for name, (colour, caption) in {
        "red": ("red", "a red square"),
        "blue": ("blue", "a blue square"),
        "liar": ("green", "a red square"),  # the caption names another colour
    }.items():
        image = np.zeros((64, 64, 3), np.uint8)
        image[8:56, 8:56] = bgr[colour]
        cv2.imwrite(str(root / f"{name}.png"), image)
        (root / f"{name}.txt").write_text(caption)
    encode = {"feature_sets": [{"name": "colours", "encoders": [{"name": COLOUR_JOINT}]}]}

    def spec_with(minimum: float) -> Path:
        spec = make_spec(
            tmp_path / "store",
            [SOURCE | {"uri": str(root)}],
            quality={
                "cross_modal": "colours",
                "filters": [{"stat": "image_text_similarity", "min": minimum, "name": "mismatch"}],
            },
            encode=encode,
        )
        path = tmp_path / "spec.yaml"
        write_spec(spec, path)
        return path

    path = spec_with(0.5)
    build(load_spec(str(path)))  # the spec as written: relative paths resolved
    store = TableStore(str(tmp_path / "store"))
    assert _state(store) == ({"red", "blue", "liar"}, {})  # measured after encoding only
    runner = CliRunner()
    dry = runner.invoke(app, ["filter", str(path), "--dry-run", "--json"])
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output[dry.output.index("{") :])["move_out"] == 1
    assert runner.invoke(app, ["filter", str(path)]).exit_code == 0
    assert _state(store) == ({"red", "blue"}, {"liar": "Filtered:mismatch"})
    stats = latest_stats(store, store.version("quality")).to_pylist()
    by_name = {Path(r["source_uri"]).name: r["image_text_similarity"] for r in stats}
    assert by_name == pytest.approx({"red": 1.0, "blue": 1.0, "liar": 0.0}, abs=1e-5)
    quality_rows = store.to_arrow("quality").num_rows

    # again: nothing moves, nothing comes back, no new stats rows
    again = runner.invoke(app, ["filter", str(path), "--json"])
    plan = json.loads(again.output[again.output.index("{") :])
    assert (plan["move_out"], plan["bring_back"]) == (0, 0)
    assert store.to_arrow("quality").num_rows == quality_rows
    # a looser threshold brings the refused sample back, and it stays
    path = spec_with(-0.5)
    assert runner.invoke(app, ["filter", str(path)]).exit_code == 0
    assert _state(store)[0] == {"red", "blue", "liar"}
    assert runner.invoke(app, ["filter", str(path)]).exit_code == 0
    assert _state(store)[0] == {"red", "blue", "liar"}


def test_a_cross_modal_filter_needs_its_feature_set():
    with pytest.raises(SpecError, match="needs `cross_modal: FEATURE_SET`"):
        parse_spec(
            {
                "sources": [{"kind": "directory", "uri": "x"}],
                "quality": {"filters": [{"stat": "audio_text_similarity", "min": 0.2}]},
            }
        )
