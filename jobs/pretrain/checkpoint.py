"""Checkpoint layout: one ``state.pt`` (torch.save, loaded with ``weights_only=True``) plus
``meta.json`` and ``metrics.jsonl`` for people and for checks that need no torch.

``state.pt`` holds the model / optimizer / scheduler / scaler state dicts, the
global step, the epoch history and ``meta``: the TrainConfig (secrets redacted),
store URI, feature set, pinned version, column shapes and the encoder signature
the run was trained on. Everything in it is tensors and plain containers, so
loading never unpickles code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STATE_FILE = "state.pt"
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
EXPORT_DIR = "export"
FORMAT = 1


def save_checkpoint(directory: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (must contain ``meta`` and ``history``) into ``directory``."""
    import torch  # here, not above: readers of meta.json and metrics.jsonl need no torch

    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    meta = {**state["meta"], "step": state["step"], "format": FORMAT}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    write_metrics(directory / METRICS_FILE, state["history"])


def load_state(directory: str | Path, *, map_location: str = "cpu") -> dict[str, Any]:
    """The ``state.pt`` of a checkpoint directory, loaded without unpickling code."""
    import torch

    path = Path(directory) / STATE_FILE
    if not path.is_file():
        from pipelines.errors import SpecError

        raise SpecError(f"{directory} is not an mmfp training checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location=map_location, weights_only=True)


def read_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text())


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in history))


def read_metrics(directory: str | Path) -> list[dict[str, Any]]:
    path = Path(directory) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_run_checkpoint(run_path: str, filesystem: Any = None) -> dict[str, Any] | None:
    """``meta.json`` of the latest checkpoint a run with this path reported, if any.

    Ray Train V2 resumes a run whose name and storage path already hold a
    checkpoint-manager snapshot; this reads the same snapshot so the driver can
    check the checkpoint before any worker starts.
    """
    from ray.train import Result

    try:
        result = Result.from_path(run_path, storage_filesystem=filesystem)
    except RuntimeError:  # no such run folder, or no snapshot in it yet
        return None
    if result.checkpoint is None:
        return None
    with result.checkpoint.as_directory() as d:
        if not (Path(d) / META_FILE).is_file():
            return None
        meta = read_meta(d)
    meta["checkpoint"] = result.checkpoint.path
    return meta
