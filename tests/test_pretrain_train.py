"""End to end on a local 2-CPU Ray: 2-worker CPU TorchTrainer runs that learn, resume and recover.

Four fits in all: ``run_a`` (through the CLI; learns, is the uninterrupted
baseline), ``run_c`` (fails after a checkpoint, rerun resumes and matches A),
``run_b`` (trainable towers + SigLIP, a worker process dies, the group restarts).
Runs use 0.5 CPU per worker so Ray Data's read tasks get the second CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from features.store import FeatureStore
from jobs.demo.synthetic_features import write_synthetic_feature_set
from jobs.pretrain import checkpoint as ckpt
from jobs.pretrain.config import parse_config
from pipelines.errors import SpecError

MODS = ("audio", "image", "text")
PINNED: dict[str, int] = {}  # the synthetic table's first full version, pinned by every run


@pytest.fixture(scope="module", autouse=True)
def fast_controller():
    """Ray Train's controller polls workers every 2 s; 0.25 s keeps these short runs short."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_session) -> FeatureStore:
    store = FeatureStore(str(tmp_path_factory.mktemp("trainstore")))
    PINNED["syn"] = write_synthetic_feature_set(store, "syn", inputs=True)
    return store


def _config(store: FeatureStore, name: str, **over) -> dict:
    raw = {
        "name": name,
        "store": store.uri,
        "feature_set": "syn",
        "version": PINNED["syn"],
        "modalities": {
            m: {"kind": "projection", "input": f"{m}_emb", "hidden": 64, "out_dim": 32}
            for m in MODS
        },
        "epochs": 5,
        "batch_size": 24,  # 144 train rows / 2 workers / 24 = 3 steps per epoch
        "num_workers": 2,
        "cpus_per_worker": 0.5,
        "optimizer": {"lr": 0.005, "weight_decay": 0.01},
        "warmup_steps": 2,
        "checkpoint_every_steps": 5,
        "shuffle_buffer": 48,
        "seed": 3,
    }
    raw.update(over)
    return raw


def _history(checkpoint_path: str) -> list[dict]:
    return ckpt.read_metrics(checkpoint_path)


@pytest.fixture(scope="module")
def run_a(store, tmp_path_factory):
    """The baseline, started the way a user does: ``mmfp train CONFIG``."""
    from jobs.cli_train import app

    path = tmp_path_factory.mktemp("cfg") / "a.yaml"
    path.write_text(yaml.safe_dump(_config(store, "a")))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    assert "checkpoint:" in result.output
    from ray.train import Result

    return Result.from_path(str(Path(store.uri) / "_train" / "a"))


def test_a_run_learns_and_exports(run_a, store):
    from jobs.evaluate import evaluate
    from jobs.pretrain.model import load_tower

    directory = run_a.checkpoint.path
    meta = ckpt.read_meta(directory)
    assert meta["step"] == 15
    assert meta["feature_set"] == "syn"
    assert meta["version"] == PINNED["syn"]
    assert meta["shapes"] == {"audio_emb": [24], "image_emb": [48], "text_emb": [32]}
    history = _history(directory)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    result = evaluate(directory, split="test")
    chance = 1 / result.rows  # 48 test rows
    recall1 = [v for k, v in result.recall.items() if k.endswith("/r@1")]  # not class_r@1
    assert len(recall1) == 6
    assert min(recall1) > 5 * chance, result.recall
    assert all(acc > 0.3 for acc in result.zero_shot.values()), result.zero_shot  # chance 0.1
    for name in ("eval_test.json", "eval_test.parquet", "curves.png"):
        assert (Path(directory) / name).is_file()
    tower, tower_meta = load_tower(Path(directory) / ckpt.EXPORT_DIR, "image")
    assert tower_meta["input"] == "image_emb"
    assert tower_meta["input_shape"] == [48]


def test_interrupted_run_resumes_from_its_checkpoint(run_a, store, tmp_path):
    """Fails after step 5 (a checkpoint); the rerun starts at step 5 and ends where A did."""
    from ray.train import TrainingFailedError

    from jobs.pretrain.train import run_training

    fault = {"after_step": 5, "mode": "raise", "marker": str(tmp_path / "fault-c")}
    config = parse_config(_config(store, "c", fault=fault))
    with pytest.raises(TrainingFailedError, match="injected fault after step 5"):
        run_training(config)
    assert (tmp_path / "fault-c").exists()
    partial = ckpt.latest_run_checkpoint(str(Path(store.uri) / "_train" / "c"))
    # step 5's checkpoint, unless Ray Train's controller had not recorded that report
    # when the worker failed right after it (seen once on a loaded machine): then an
    # earlier one, and the rerun repeats the steps since
    assert 0 < partial["step"] <= 5

    result = run_training(config)  # same name: Ray Train restores the run's latest checkpoint
    history = _history(result.checkpoint.path)
    resumed = [row["resumed_from_step"] for row in history]
    assert resumed == [None, partial["step"], None, None, None]
    assert history[-1]["step"] == 15
    baseline = _history(run_a.checkpoint.path)
    for got, want in zip(history, baseline, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-3)
    final_keys = [k for k in baseline[-1] if k.startswith("val/")]
    for key in final_keys:
        assert history[-1][key] == pytest.approx(baseline[-1][key], abs=0.05), key


def test_killed_worker_restarts_and_finishes(store, tmp_path):
    """A worker process exits after step 4 (os._exit); with max_failures=1 the run finishes."""
    from jobs.pretrain.train import run_training

    raw = _config(
        store,
        "b",
        modalities={
            "image": {"kind": "cnn", "input": "image_pixels", "channels": [8, 16], "out_dim": 16},
            "audio": {"kind": "cnn", "input": "audio_logmel", "channels": [8], "out_dim": 16},
            "text": {
                "kind": "transformer",
                "vocab_size": 64,
                "width": 16,
                "heads": 2,
                "layers": 1,
                "out_dim": 16,
            },
        },  # fmt: skip
        loss="siglip",
        epochs=2,
        checkpoint_every_steps=2,
        max_failures=1,
        fault={"after_step": 4, "mode": "exit", "rank": 1, "marker": str(tmp_path / "fault-b")},
    )
    result = run_training(parse_config(raw))
    assert (tmp_path / "fault-b").exists()
    history = _history(result.checkpoint.path)
    assert [row["epoch"] for row in history] == [1, 2]
    # Resumed from a checkpoint, not from zero: step 4's, or an earlier one when the worker
    # died before the controller had polled the last reports (os._exit drops its queue).
    resumed = [row["resumed_from_step"] for row in history if row["resumed_from_step"]]
    assert len(resumed) == 1
    assert 0 < resumed[0] <= 4
    assert history[-1]["step"] == 6
    assert all(row["train_loss"] == row["train_loss"] for row in history)  # no NaN


def test_resume_refuses_a_changed_feature_set(run_a, store):
    """New encoder output (other dimension, other config hash): resuming run A is refused."""
    from jobs.pretrain.train import run_training

    meta = store.feature_set("syn")
    image = meta.columns["image_emb"].model_copy(update={"shape": [64]})
    encoders = [
        e.model_copy(update={"config_hash": "retrained"}) if e.name == "synthetic-text" else e
        for e in meta.encoders
    ]
    changed = meta.model_copy(
        update={"columns": {**meta.columns, "image_emb": image}, "encoders": encoders}
    )
    store.set_properties("features/syn", changed.to_properties())
    changed = store.version("features/syn")
    with pytest.raises(SpecError, match="refusing to resume") as err:
        run_training(parse_config(_config(store, "a", version=changed)))
    message = str(err.value)
    assert "image_emb shape: checkpoint [48]" in message
    assert "[64]" in message
    assert "text_emb config_hash" in message


def test_too_few_rows_for_one_batch_is_a_spec_error(store):
    from jobs.pretrain.train import run_training

    with pytest.raises(SpecError, match="not one full batch"):
        run_training(parse_config(_config(store, "tiny", batch_size=500)))


def test_select_keeps_the_best_checkpoint_and_stops_early(store, tmp_path):
    """Validation every 2 steps, selection by class-match recall with a gain no run can
    make (min_delta 1): the first validation stays the best, two more without a gain stop
    the run at step 4 of 15; the best checkpoint is kept and exported, with labels used by
    the supervised term."""
    from jobs.cli_train import best_checkpoint
    from jobs.pretrain.train import run_training

    select = {"metric": "val/mean_class_r@1", "patience": 2, "min_delta": 1.0}
    cfg = parse_config(
        _config(store, "sel", storage_path=str(tmp_path), val_every_steps=2, select=select,
                keep_checkpoints=1, checkpoint_every_steps=None,
                loss={"supervised_weight": 0.5})
    )  # fmt: skip
    result = run_training(cfg)
    assert result.error is None
    assert result.metrics["step"] == 4
    assert result.metrics["stopped_early"] is True
    assert result.metrics["best_step"] == 2
    best = best_checkpoint(result)
    assert best is not None
    assert best.path != result.checkpoint.path
    with best.as_directory() as d:
        assert ckpt.read_meta(d)["step"] == 2
        assert (Path(d) / ckpt.EXPORT_DIR).is_dir()  # the best one is usable as is
    history = _history(result.checkpoint.path)
    assert [row["step"] for row in history] == [2, 3, 4]  # every validation, in order
    assert all("val/mean_class_r@1" in row for row in history)
    assert all("train_supcon_audio_image" in row or "supcon_audio_image" in row
               for row in history)  # fmt: skip
    kept = sorted(Path(tmp_path, "sel").glob("checkpoint_step*"))
    assert [p.name for p in kept] == ["checkpoint_step0000002", "checkpoint_step0000004"]
    again = run_training(cfg)  # the same command again: the run is over, nothing trains
    assert again.error is None
    assert again.metrics["step"] == 4
    assert sorted(Path(tmp_path, "sel").glob("checkpoint_step*")) == kept


def test_an_unknown_select_metric_is_a_spec_error(store):
    raw = _config(store, "bad-select", select={"metric": "val/image->video/r@1"})
    with pytest.raises(SpecError, match="not a validation metric of this run; known: val/mean"):
        parse_config(raw)


def test_selecting_by_labels_without_labelled_val_rows_is_refused(store):
    """Class-match recall over unlabelled val rows is NaN at every validation: refused on
    the driver, before a worker starts; a NaN in a run is neither a gain nor a stall."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import write_deltalake

    from jobs.pretrain.config import SelectConfig
    from jobs.pretrain.selection import Selection
    from jobs.pretrain.train import run_training

    version = write_synthetic_feature_set(store, "nolabels", inputs=False, files=1)
    rows = store.to_arrow("features/nolabels")
    val = pc.equal(rows.column("split"), "val")
    labels = pc.if_else(val, pa.scalar(None, pa.string()), rows.column("label"))
    rows = rows.set_column(rows.schema.get_field_index("label"), "label", labels)
    write_deltalake(store.table_uri("features/nolabels"), rows, mode="overwrite")
    select = {"metric": "val/mean_class_r@1"}
    cfg = parse_config(_config(store, "nolabels", feature_set="nolabels", version=version + 1,
                               select=select))  # fmt: skip
    with pytest.raises(SpecError, match="no labelled val rows"):
        run_training(cfg)
    selection = Selection(SelectConfig.model_validate({**select, "patience": 1}))
    assert selection.update({"val/mean_class_r@1": 0.5}, step=1)
    assert not selection.update({"val/mean_class_r@1": float("nan")}, step=2)
    assert (selection.best, selection.best_step, selection.should_stop) == (0.5, 1, False)


def test_mmfp_tune_runs_trials_with_the_same_trainer_and_writes_the_best_config(store, tmp_path):
    from jobs.cli_train import app

    raw = _config(store, "tuned", epochs=1, storage_path=str(tmp_path / "runs"), loss="infonce",
                  checkpoint_every_steps=None, select={"metric": "val/mean_r@1"})  # fmt: skip
    path = tmp_path / "tuned.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(
        app, ["tune", str(path), "--num-samples", "2", "--search", "optimizer.lr=choice:0.001,0.02",
              "--search", "loss.duplicates=choice:positive,negative"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert out.output.count(" done ") == 2  # two trials, each a full `mmfp train` run
    best = yaml.safe_load((tmp_path / "tuned.best.yaml").read_text())
    assert best["optimizer"]["lr"] in (0.001, 0.02)
    assert best["loss"]["duplicates"] in ("positive", "negative")
    assert best["loss"]["kind"] == "infonce"  # the shorthand `loss: infonce`, written out
    assert best["name"] == "tuned"  # the user's config, with the best values only
    trial_runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if "-tune-" in p.name)
    assert len(trial_runs) == 2  # each trial is its own Ray Train run, with checkpoints
    assert all(any((tmp_path / "runs" / r).glob("checkpoint_step*")) for r in trial_runs)


def test_a_bad_search_space_is_refused_before_any_trial(store, tmp_path):
    from jobs.cli_train import app

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_config(store, "t")))
    for bad, message in (("optimizer.lr=normal:0:1", "KIND one of loguniform, uniform, choice"),
                         ("optimizer.lr=uniform:0.1", "takes two numbers"),
                         ("optimizer.lrr=choice:0.1", "optimizer.lrr")):  # fmt: skip
        out = CliRunner().invoke(app, ["tune", str(path), "--search", bad])
        assert out.exit_code == 2, out.output
        assert message in out.output


def test_find_lr_runs_the_range_test_and_suggests_a_rate(store, tmp_path):
    """The run's own step with a rising rate, in this process: a curve, a suggestion
    inside the range, a plot; no Ray Train run."""
    from jobs.cli_train import app
    from jobs.pretrain.lr_find import find_lr

    raw = _config(store, "lr", storage_path=str(tmp_path / "runs"))
    curve = find_lr(parse_config(raw), steps=40, start=1e-5, end=10.0)
    assert 3 <= len(curve.lrs) <= 40
    assert curve.lrs == sorted(curve.lrs)
    assert 1e-5 <= curve.steepest <= curve.at_minimum <= 10.0
    assert min(curve.losses) < curve.losses[0]  # the loss fell somewhere in the range
    path = tmp_path / "lr.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = CliRunner().invoke(app, ["train", str(path), "--find-lr", "--lr-steps", "20"])
    assert out.exit_code == 0, out.output
    assert "suggested optimizer.lr: " in out.output
    assert (tmp_path / "lr.lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "runs").exists()  # nothing trained
