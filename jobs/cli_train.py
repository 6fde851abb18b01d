"""``mmfp train CONFIG`` and ``mmfp evaluate CHECKPOINT``: thin commands over jobs.pretrain.

Register them in ``jobs/cli.py`` with ``app.command("train")(train)`` and
``app.command("evaluate")(evaluate)``; ``app`` here holds both for ``add_typer``.
``python -m jobs.pretrain CONFIG`` runs ``train`` on its own.
User mistakes (bad config, unknown feature set, mismatched checkpoint) print
one line and exit 2; a training run that fails exits 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from jobs.errors import user_errors
from jobs.options import RayAddressOpt, key_values
from jobs.report import console, table
from pipelines.errors import MmfpError


@user_errors
def train(
    config: Annotated[Path, typer.Argument(help="Train config (YAML).")],
    address: RayAddressOpt = None,
    find_lr: Annotated[
        bool,
        typer.Option(
            "--find-lr", help="Only run a learning-rate range test (in this process) and plot it."
        ),
    ] = False,
    lr_steps: Annotated[int, typer.Option(min=3, help="Steps of the range test.")] = 100,
    head: Annotated[
        str | None,
        typer.Option(
            help="classify: train a fusion classifier over feature sets or a run's towers "
            "(CONFIG is a head config; also chosen by a `head:` key in it)."
        ),
    ] = None,
) -> None:
    """Contrastive pretraining on a feature set with Ray Train; a rerun of a name resumes it.
    With --head classify, a fusion classifier head instead (in this process)."""
    from ray.train import TrainingFailedError

    from jobs.pretrain.config import load_config
    from jobs.pretrain.train import run_training
    from jobs.report import print_log_file
    from jobs.runtime import start_job

    if head is not None or _is_head_config(config):
        train_head_command(config, head)
        return
    cfg = load_config(config)
    if find_lr:
        print_lr_range_test(cfg, Path(config).with_suffix(".lr_find.png"), lr_steps)
        return
    _, log_file = start_job(address, prefix=f"train-{cfg.name}-")
    try:
        result = run_training(cfg)
    except TrainingFailedError as e:
        typer.secho(f"training failed: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from e
    print_train_summary(cfg.name, result)
    print_log_file(log_file)


def _is_head_config(path: Path) -> bool:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # the train config loader says what is wrong
    return isinstance(raw, dict) and "head" in raw


def train_head_command(config: Path, head: str | None) -> None:
    from jobs.head.config import load_head_config
    from jobs.head.fit import train_head

    if head not in (None, "classify"):
        raise MmfpError(f"--head must be classify, got {head!r}")
    print_head_result(train_head(load_head_config(config)))


def print_head_result(result: Any) -> None:
    """Accuracy per split and branch group (fused first), then the files written."""
    splits = sorted(result.accuracy, key=("val", "test").index)
    names = list(dict.fromkeys(n for s in splits for n in result.accuracy[s]))
    rows = [[name, *(_accuracy(result.accuracy[s].get(name)) for s in splits)] for name in names]
    columns = ["accuracy", *(f"{s} ({result.rows[s]} rows)" for s in splits)]
    title = (
        f"{result.fusion} fusion, {len(result.classes)} classes, best epoch "
        f"{result.best_epoch}/{result.epochs}" + (", stopped early" if result.stopped_early else "")
    )
    console.print(title)
    console.print(table("", columns, rows, right=columns[1:]))
    console.print(f"run: {result.run_dir}", soft_wrap=True)
    for kind, path in result.files.items():
        console.print(f"{kind}: {path}", soft_wrap=True)


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@user_errors
def evaluate(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="Checkpoint directory (checkpoint_step...) or a head run directory."),
    ],
    split: Annotated[str, typer.Option(help="val or test.")] = "test",
    storage_option: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE for the store (repeatable).")
    ] = None,
    export_embeddings: Annotated[
        bool,
        typer.Option(help="Also write each split's embeddings as embeddings_<split>.parquet."),
    ] = False,
) -> None:
    """Recall@1/5/10 per modality pair and zero-shot accuracy of a checkpoint; writes a plot.
    A head run (``--head classify``): fused and per-modality accuracy, a confusion matrix."""
    from jobs.evaluate import evaluate as run_evaluate
    from jobs.head.fit import HEAD_FILE, evaluate_head

    if split not in ("val", "test"):
        raise MmfpError(f"--split must be val or test, got {split!r}")
    options = key_values(storage_option, "--storage-option")
    if (checkpoint / HEAD_FILE).is_file():
        print_head_result(evaluate_head(checkpoint, split=split, storage_options=options))
        return
    result = run_evaluate(
        checkpoint,
        split=split,
        storage_options=options,
        export_embeddings=export_embeddings,
    )
    print_eval_summary(result)


def print_train_summary(name: str, result: Any) -> None:
    """Final epoch metrics, the checkpoint and the exported towers."""
    metrics = result.metrics or {}
    shown = [
        [key, f"{value:.4g}" if isinstance(value, float) else str(value)]
        for key, value in sorted(metrics.items())
        if key == "train_loss" or key.endswith("r@1") or key in ("logit_scale", "lr")
    ]
    title = f"run {name}: epoch {metrics.get('epoch')} (step {metrics.get('step')})"
    console.print(table(title, ["metric", "value"], shown, right=["value"], centered=True))
    if metrics.get("stopped_early"):
        console.print(f"stopped early: {metrics['stale']} validations without a gain")
    best = best_checkpoint(result)
    if best is not None and best.path != getattr(result.checkpoint, "path", None):
        console.print(
            f"best: step {metrics.get('best_step')}, {metrics.get('best_value'):.4g}",
            soft_wrap=True,
        )
    shown = best or result.checkpoint
    if shown is not None:
        console.print(f"checkpoint: {shown.path}", soft_wrap=True)
        console.print(f"evaluate:   mmfp evaluate {shown.path}", soft_wrap=True)


def print_lr_range_test(cfg: Any, plot: Path, steps: int) -> None:
    from jobs.pretrain.lr_find import find_lr, plot_curve

    curve = find_lr(cfg, steps=steps)
    rows = [[f"{lr:.2e}", f"{loss:.4f}"] for lr, loss in zip(curve.lrs, curve.losses, strict=True)]
    shown = rows[:: max(1, len(rows) // 12)]
    console.print(table("LR range test (loss smoothed)", ["lr", "loss"], shown, right=["loss"]))
    console.print(
        f"suggested optimizer.lr: {curve.steepest:.2e} (steepest fall); the loss was lowest "
        f"at {curve.at_minimum:.2e}, {len(curve.lrs)} steps"
    )
    console.print(f"plot: {plot_curve(curve, plot)}", soft_wrap=True)


def best_checkpoint(result: Any) -> Any:
    """The kept checkpoint with the best selection metric (None without ``select``)."""
    metrics = result.metrics or {}
    if metrics.get("best_step") is None:
        return None
    for checkpoint, reported in result.best_checkpoints or []:
        if reported.get("step") == metrics["best_step"]:
            return checkpoint
    return None  # the best was not kept (keep_checkpoints) or the run never validated


def print_eval_summary(result: Any) -> None:
    """Recall per direction as a table, then zero-shot and the files written."""
    title = (
        f"{result.feature_set} v{result.version} {result.split}: {result.rows} rows, "
        f"step {result.step}"
    )
    by_class = any("class_r@1" in row for row in result.table())
    rows = [
        [
            row["direction"],
            row["n"],
            *(f"{row[k]:.3f}" if k in row else "-" for k in ("r@1", "r@5", "r@10")),
            # chance r@1 is 1/n: one right answer among n candidates
            f"{row['r@1'] * row['n']:.1f}x" if "r@1" in row else "-",
            *([f"{row['class_r@1']:.3f}" if "class_r@1" in row else "-"] if by_class else []),
        ]
        for row in result.table()
    ]
    columns = ["direction", "n", "r@1", "r@5", "r@10", "r@1 / chance"]
    columns += ["class r@1"] if by_class else []
    console.print(table(title, columns, rows, right=columns[1:], centered=True))
    if result.zero_shot:
        accs = ", ".join(f"{m} {a:.3f}" for m, a in result.zero_shot.items())
        console.print(f"zero-shot accuracy: {accs}")
    console.print(f"zero-shot: {result.zero_shot_note}")
    if result.probes:
        accs = ", ".join(
            f"{m} {p['knn@5']:.3f} / {p['linear']:.3f}" for m, p in result.probes.items()
        )
        console.print(f"kNN@5 / linear-probe accuracy (train split fitted): {accs}")
    for kind, path in result.files.items():
        console.print(f"{kind}: {path}", soft_wrap=True)


@user_errors
def tune(
    config: Annotated[Path, typer.Argument(help="Train config (YAML).")],
    num_samples: Annotated[int, typer.Option(min=1, help="Trials to run.")] = 8,
    search: Annotated[
        list[str] | None,
        typer.Option(
            help="KEY=KIND:ARGS, repeatable, e.g. optimizer.lr=loguniform:1e-4:1e-2, "
            "batch_size=choice:32,64 (default: lr and weight decay, log-uniform)."
        ),
    ] = None,
    concurrent: Annotated[int, typer.Option(min=1, help="Trials at a time.")] = 1,
    address: RayAddressOpt = None,
) -> None:
    """A Ray Tune sweep with the same trainer; prints the trials and writes the best config."""
    import yaml

    from jobs.pretrain.config import load_config
    from jobs.pretrain.tune import (
        DEFAULT_SPACE,
        best_trial,
        parse_space,
        run_tune,
        selection_metric,
        with_values,
    )
    from jobs.report import print_log_file
    from jobs.runtime import start_job

    cfg = load_config(config)
    dims = parse_space(search or DEFAULT_SPACE)
    _, log_file = start_job(address, prefix=f"tune-{cfg.name}-")
    results = run_tune(cfg, dims, num_samples=num_samples, concurrent=concurrent)
    metric, mode = selection_metric(cfg)
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        values = frame[metric].dropna() if frame is not None and metric in frame else None
        best = None if values is None or values.empty else (
            values.max() if mode == "max" else values.min()
        )  # fmt: skip
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(result.config.items()))
        status = "error" if result.error else "done"
        score = "-" if best is None else f"{best:.4f}"
        rows.append([Path(result.path).name, params, score, status])
    headers = ["trial", "values", metric, "status"]
    console.print(table(f"trials by {metric} ({mode})", headers, rows))
    best = best_trial(results, cfg)
    if best is None:
        raise MmfpError("no trial reported a validation; see the log for their errors")
    raw = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    out = Path(config).with_suffix(".best.yaml")
    best_raw = with_values(raw, best.config, cfg.model_dump(mode="json"))
    out.write_text(yaml.safe_dump(best_raw, sort_keys=False))
    chosen = ", ".join(f"{k}={_short(v)}" for k, v in sorted(best.config.items()))
    console.print(f"best trial: {Path(best.path).name} ({chosen})")
    console.print(f"its config: {out}  (mmfp train {out})", soft_wrap=True)
    print_log_file(log_file)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


app = typer.Typer(
    help="Contrastive pretraining.", no_args_is_help=True, pretty_exceptions_enable=False
)
app.command("train")(train)
app.command("evaluate")(evaluate)
app.command("tune")(tune)


def main() -> None:
    """Entry point of ``python -m jobs.pretrain CONFIG``."""
    typer.run(train)
