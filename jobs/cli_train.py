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
from pipelines.errors import MmfpError


def _options(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MmfpError(f"--storage-option expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


@user_errors
def train(
    config: Annotated[Path, typer.Argument(help="Train config (YAML).")],
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster address; default: $RAY_ADDRESS, else a local Ray."),
    ] = None,
) -> None:
    """Contrastive pretraining on a feature set with Ray Train; a rerun of a name resumes it."""
    from ray.train import TrainingFailedError

    from jobs.pretrain.config import load_config
    from jobs.pretrain.train import run_training
    from jobs.runtime import init_ray

    cfg = load_config(config)
    init_ray(address)
    try:
        result = run_training(cfg)
    except TrainingFailedError as e:
        typer.secho(f"training failed: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from e
    print_train_summary(cfg.name, result)


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
    result = run_evaluate(checkpoint, split=split, storage_options=_options(storage_option))
    print_eval_summary(result)


def print_train_summary(name: str, result: Any) -> None:
    """Final epoch metrics, the checkpoint and the exported towers."""
    from rich.console import Console
    from rich.table import Table

    metrics = result.metrics or {}
    table = Table(title=f"run {name}: epoch {metrics.get('epoch')} (step {metrics.get('step')})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        value = metrics[key]
        if key == "train_loss" or key.endswith("r@1") or key in ("logit_scale", "lr"):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    if result.checkpoint is not None:
        console.print(f"checkpoint: {result.checkpoint.path}", soft_wrap=True)
        console.print(f"evaluate:   mmfp evaluate {result.checkpoint.path}", soft_wrap=True)


def print_eval_summary(result: Any) -> None:
    """Recall per direction as a table, then zero-shot and the files written."""
    from rich.console import Console
    from rich.table import Table

    title = (
        f"{result.feature_set} v{result.version} {result.split}: {result.rows} rows, "
        f"step {result.step}"
    )
    table = Table(title=title)
    for col in ("direction", "n", "r@1", "r@5", "r@10", "r@1 / chance"):
        table.add_column(col, justify="left" if col == "direction" else "right")
    for row in result.table():
        table.add_row(
            row["direction"],
            str(row["n"]),
            *(f"{row[k]:.3f}" if k in row else "-" for k in ("r@1", "r@5", "r@10")),
            # chance r@1 is 1/n: one right answer among n candidates
            f"{row['r@1'] * row['n']:.1f}x" if "r@1" in row else "-",
        )
    console = Console()
    console.print(table)
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
