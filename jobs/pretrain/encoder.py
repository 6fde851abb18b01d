"""A pretraining run's towers as an encoder: ``{name: checkpoint, model: RUN_OR_CHECKPOINT}``.

``mmfp train`` exports each tower (``export/<modality>.safetensors`` + ``.json``)
with the feature set encoders it read. This encoder runs those same featurizers
(pixels, log-mel, token ids, as recorded) in ``preprocess`` and the towers in
``encode``, so a trained model encodes new samples, queries and stores exactly as
it saw its training data. ``model`` may name a run directory (the run's best
checkpoint by its ``select`` metric, else its latest exported one), a checkpoint
directory, or an ``export`` directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from features.schema import list_of
from jobs.pretrain.checkpoint import EXPORT_DIR, METRICS_FILE
from pipelines.encoders.base import Encoder, EncoderConfig, EncoderParams
from pipelines.errors import SpecError


class TrainedParams(EncoderParams):
    modalities: list[str] | None = Field(None, min_length=1)  # towers to use; None: all
    # import user encoder classes (``module:Class``) the run's export names for its inputs
    trust_code: bool = False


class Trained(Encoder):
    """The towers of an mmfp training run."""

    modality: ClassVar[tuple[str, ...]] = ("text", "image", "audio")
    Params = TrainedParams
    params: TrainedParams

    def __init__(self, config: EncoderConfig) -> None:
        if not config.model:
            raise SpecError(
                f"encoder {config.name!r} needs `model`: a training run or checkpoint directory"
            )
        export = export_dir(Path(config.model).expanduser())
        super().__init__(config.model_copy(update={"model": str(export)}))
        self.export = export
        towers = {p.stem: json.loads(p.read_text()) for p in sorted(export.glob("*.json"))}
        wanted = self.params.modalities or sorted(towers)
        missing = sorted(set(wanted) - set(towers))
        if missing:
            raise SpecError(
                f"encoder {config.name!r}: {export} has no {', '.join(missing)} tower; "
                f"it has: {', '.join(sorted(towers))}"
            )
        self.towers = {m: towers[m] for m in wanted}

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.towers)

    def output_columns(self) -> dict[str, tuple[pa.DataType, tuple[int, ...]]]:
        return {
            f"{m}_emb": (list_of(pa.float32()), (t["out_dim"],)) for m, t in self.towers.items()
        }

    def imports_recorded_code(self) -> bool:
        return self.params.trust_code

    def _featurizer(self, modality: str) -> Encoder:
        return self.cached(f"featurizer:{modality}", lambda: self._recorded_featurizer(modality))

    def _recorded_featurizer(self, modality: str) -> Encoder:
        """The feature set encoder the tower's input came from, as the run recorded it."""
        from pipelines.encoders.registry import get_encoder, is_builtin

        tower = self.towers[modality]
        for entry in tower["encoders"]:
            config = EncoderConfig.model_validate(entry["config"])
            if not (is_builtin(config.name) or self.params.trust_code):
                raise SpecError(
                    f"{self.export}: the {modality} tower's input came from encoder "
                    f"{config.name!r}, code named only by the export's files: importing it "
                    "runs that code. Set `params: {trust_code: true}` on the checkpoint "
                    "encoder if you trust whoever wrote this run"
                )
            featurizer = get_encoder(config)
            if tower["input"] in featurizer.output_columns():
                return featurizer
        raise SpecError(
            f"{self.export}: no recorded encoder of the training feature set writes "
            f"{tower['input']!r}; re-export the run with this mmfp"
        )

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for modality, tower in self.towers.items():
            inputs = self._featurizer(modality).preprocess(batch)
            out[tower["input"]] = inputs[tower["input"]]
            out[f"{modality}_mask"] = inputs[f"{modality}_mask"]
        return out

    def load(self, device: str) -> None:
        from jobs.pretrain.model import load_tower

        self.device = device
        for modality in self.towers:
            self.cached(f"tower:{modality}", lambda m=modality: load_tower(self.export, m)[0])

    def encode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        if self.device is None:
            self.load("cpu")
        out: dict[str, np.ndarray] = {}
        for modality, tower in self.towers.items():
            model = self.cached(f"tower:{modality}", lambda: None).to(self.device)
            mask = np.asarray(inputs[f"{modality}_mask"], dtype=bool)
            emb = np.zeros((len(mask), tower["out_dim"]), dtype=np.float32)
            if mask.any():
                x = torch.as_tensor(inputs[tower["input"]][mask]).to(self.device)
                with torch.no_grad():
                    y = model(x).float()
                    y = F.normalize(y, dim=-1) if self.config.normalize else y
                emb[mask] = y.cpu().numpy()
            out[f"{modality}_emb"], out[f"{modality}_mask"] = emb, mask
        return out


def export_dir(path: Path) -> Path:
    """The ``export`` directory ``path`` names: itself, a checkpoint's, or a run's best."""
    if any(path.glob("*.safetensors")):
        return path
    if (path / EXPORT_DIR).is_dir():
        return path / EXPORT_DIR
    every = sorted(path.glob("checkpoint_step*"))
    checkpoints = [p for p in every if (p / EXPORT_DIR).is_dir()]
    if not checkpoints:
        raise SpecError(
            f"{path} holds no exported towers: give a training run directory, one of its "
            "checkpoint_step... directories, or an export directory (a run exports its towers "
            "at its end and at each new best validation)"
        )
    best = _best_step(every[-1])
    chosen = next((c for c in checkpoints if best is not None and _step(c) == best), None)
    return (chosen or checkpoints[-1]) / EXPORT_DIR


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint_step"))


def _best_step(checkpoint: Path) -> int | None:
    """The run's best validation step as its latest checkpoint recorded it (``select``)."""
    path = checkpoint / METRICS_FILE
    rows: list[dict[str, Any]] = (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.is_file()
        else []
    )
    steps = [r["best_step"] for r in rows if r.get("best_step") is not None]
    return steps[-1] if steps else None
