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
) -> None:
    """Contrastive pretraining on a feature set with Ray Train; a rerun of a name resumes it."""
    from ray.train import TrainingFailedError

    from jobs.pretrain.config import load_config
    from jobs.pretrain.train import run_training
    from jobs.report import print_log_file
    from jobs.runtime import start_job

    cfg = load_config(config)
    _, log_file = start_job(address, prefix=f"train-{cfg.name}-")
    try:
        result = run_training(cfg)
    except TrainingFailedError as e:
        typer.secho(f"training failed: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from e
    print_train_summary(cfg.name, result)
    print_log_file(log_file)


@user_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (checkpoint_step...).")],
    split: Annotated[str, typer.Option(help="val or test.")] = "test",
    storage_option: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE for the store (repeatable).")
    ] = None,
) -> None:
    """Recall@1/5/10 per modality pair and zero-shot accuracy of a checkpoint; writes a plot."""
    from jobs.evaluate import evaluate as run_evaluate

    if split not in ("val", "test"):
        raise MmfpError(f"--split must be val or test, got {split!r}")
    result = run_evaluate(
        checkpoint, split=split, storage_options=key_values(storage_option, "--storage-option")
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
    if result.checkpoint is not None:
        console.print(f"checkpoint: {result.checkpoint.path}", soft_wrap=True)
        console.print(f"evaluate:   mmfp evaluate {result.checkpoint.path}", soft_wrap=True)


def print_eval_summary(result: Any) -> None:
    """Recall per direction as a table, then zero-shot and the files written."""
    title = (
        f"{result.feature_set} v{result.version} {result.split}: {result.rows} rows, "
        f"step {result.step}"
    )
    rows = [
        [
            row["direction"],
            row["n"],
            *(f"{row[k]:.3f}" if k in row else "-" for k in ("r@1", "r@5", "r@10")),
            # chance r@1 is 1/n: one right answer among n candidates
            f"{row['r@1'] * row['n']:.1f}x" if "r@1" in row else "-",
        ]
        for row in result.table()
    ]
    columns = ["direction", "n", "r@1", "r@5", "r@10", "r@1 / chance"]
    console.print(table(title, columns, rows, right=columns[1:], centered=True))
    if result.zero_shot:
        accs = ", ".join(f"{m} {a:.3f}" for m, a in result.zero_shot.items())
        console.print(f"zero-shot accuracy: {accs}")
    console.print(f"zero-shot: {result.zero_shot_note}")
    for kind, path in result.files.items():
        console.print(f"{kind}: {path}", soft_wrap=True)


app = typer.Typer(
    help="Contrastive pretraining.", no_args_is_help=True, pretty_exceptions_enable=False
)
app.command("train")(train)
app.command("evaluate")(evaluate)


def main() -> None:
    """Entry point of ``python -m jobs.pretrain CONFIG``."""
    typer.run(train)
