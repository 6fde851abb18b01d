"""HeadConfig: the YAML file behind ``mmfp train CONFIG --head classify``.

Inputs are branches: every embedding column of a feature set, or every tower of an
``mmfp train`` run (run over the feature set it trained on), named
``<input>:<modality>``. Several inputs with the same modality make an ensemble.
Relative local paths resolve against the config file's directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from features.storage import is_local, join_uri, normalize_uri, redact
from pipelines.spec import read_yaml_mapping, validated


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureSetInput(_Model):
    """Embedding columns of a feature set (CLIP, CLAP, a checkpoint-encoded one...)."""

    feature_set: str
    version: int | None = None  # None: the latest
    columns: list[str] | None = Field(None, min_length=1)  # None: every embedding column
    name: str | None = None  # branch prefix; default: the feature set's name

    @property
    def label(self) -> str:
        return self.name or self.feature_set


class TowersInput(_Model):
    """The towers of a training run, applied to the inputs of the feature set it read."""

    model: str  # a run directory, a checkpoint_step... directory or an export directory
    modalities: list[str] | None = Field(None, min_length=1)  # None: every tower
    version: int | None = None  # of the towers' feature set; None: the latest
    name: str | None = None  # branch prefix; default: the run directory's name

    @property
    def label(self) -> str:
        return self.name or Path(self.model).name


class HeadConfig(_Model):
    head: Literal["classify"] = "classify"
    name: str = Field("head", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    store: str = "mmfp-store"
    storage_options: dict[str, str] = Field(default_factory=dict)
    storage_path: str | None = None  # a local directory; default: <store>/_train
    inputs: list[FeatureSetInput | TowersInput] = Field(min_length=1)
    # early: concatenate the branches; late: average per-branch logits; attention: a
    # learned query attends over the branches present in the row
    fusion: Literal["early", "late", "attention"] = "late"
    hidden: int = Field(256, ge=0)  # 0: linear (a linear probe per branch with late fusion)
    width: int = Field(128, gt=0)  # attention: each branch is projected to this width
    heads: int = Field(4, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    # a row's branches are dropped at this rate in training (one always stays), so the
    # head also classifies rows that have one modality only
    modality_dropout: float = Field(0.3, ge=0, lt=1)
    epochs: int = Field(100, gt=0)
    batch_size: int = Field(128, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int | None = Field(15, gt=0)  # epochs without a val gain before stopping
    # the val accuracy that picks the best epoch: fused, or one modality's (e.g. audio)
    select: str = "fused"
    seed: int = 0
    use_gpu: bool = False

    @model_validator(mode="after")
    def _checks(self) -> HeadConfig:
        labels = [i.label for i in self.inputs]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"inputs share the name {repeated[0]!r}: give each a `name`")
        if self.fusion == "attention" and self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")
        if not is_local(self.storage_path or self.store):
            raise ValueError("the head's run directory is local: set `storage_path` to one")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path or join_uri(self.store, "_train")) / self.name

    def resolved(self, base_dir: Path) -> HeadConfig:
        data = self.model_dump()
        data["store"] = normalize_uri(data["store"], base_dir=str(base_dir))
        if data["storage_path"]:
            data["storage_path"] = normalize_uri(data["storage_path"], base_dir=str(base_dir))
        for source in data["inputs"]:
            if source.get("model"):
                source["model"] = normalize_uri(source["model"], base_dir=str(base_dir))
        return HeadConfig.model_validate(data)

    def public_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["storage_options"] = redact(data["storage_options"])
        return data


def parse_head_config(raw: dict[str, Any], origin: str = "<dict>") -> HeadConfig:
    return validated(HeadConfig, raw, origin, "head config")


def load_head_config(path: str | Path) -> HeadConfig:
    path = Path(path)
    raw = read_yaml_mapping(path, what="head config", expected="`inputs:`")
    return parse_head_config(raw, origin=str(path)).resolved(path.resolve().parent)
