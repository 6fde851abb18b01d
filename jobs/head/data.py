"""A head's inputs as branches: one float32 matrix and presence mask per ``input:modality``.

Original rows only (``view == -1``), read a batch at a time, so only the embeddings
(rows x width) are ever held: a feature set's embedding columns as stored, or a
run's towers applied to the inputs of the feature set it trained on. Inputs are
joined on ``sample_id``; a row an input lacks is absent from its branches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.tables import TableStore
from jobs.head.config import FeatureSetInput, HeadConfig, TowersInput
from jobs.pretrain.arrays import dense
from jobs.pretrain.data import FeatureSetInfo, feature_set_info
from pipelines.errors import SpecError

ORIGINAL = pc.field("view") == -1
READ_BATCH = 4096
KEYS = ["sample_id", "split", "label"]


@dataclass
class Part:
    """One input's rows: ids, splits and labels, and its branches."""

    ids: list[str]
    splits: list[str | None]
    labels: list[str | None]
    x: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    version: int  # the feature set version it read


@dataclass
class Branches:
    """Every input joined on ``sample_id``."""

    ids: np.ndarray
    splits: np.ndarray
    labels: np.ndarray
    x: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    versions: dict[str, int] = field(default_factory=dict)  # input -> version read

    @property
    def dims(self) -> dict[str, int]:
        return {b: int(x.shape[1]) for b, x in self.x.items()}


def modality_of(branch: str) -> str:
    return branch.rpartition(":")[2]


def load_branches(
    store: TableStore, config: HeadConfig, versions: dict[str, int] | None = None
) -> Branches:
    """Read every input (at ``versions`` when given: what a trained head recorded)."""
    parts = {}
    for source in config.inputs:
        pinned = (versions or {}).get(source.label, source.version)
        if isinstance(source, FeatureSetInput):
            parts[source.label] = _embedding_columns(store, source, pinned)
        else:
            parts[source.label] = _towers(store, source, pinned)
    return _join(parts)


def _embedding_columns(store: TableStore, source: FeatureSetInput, version: int | None) -> Part:
    info = feature_set_info(store, source.feature_set, version)
    embeddings = sorted(c for c, m in info.columns.items() if m.kind == "embedding")
    columns = source.columns or embeddings
    unknown = sorted(set(columns) - set(embeddings))
    if unknown:
        raise SpecError(
            f"inputs: feature set {info.name!r} v{info.version} has no embedding column "
            f"{unknown[0]!r}; it has: {', '.join(embeddings) or 'none'}"
        )
    part = _PartBuilder(info.version)
    for batch in _batches(store, info, columns):
        part.add_keys(batch)
        for column in columns:
            x, present = dense(batch.column(column), info.shape(column), np.float32)
            part.add(f"{source.label}:{column.removesuffix('_emb')}", x, present)
    return part.finish()


def _towers(store: TableStore, source: TowersInput, version: int | None) -> Part:
    import torch
    import torch.nn.functional as F

    from jobs.pretrain.encoder import export_dir
    from jobs.pretrain.model import load_tower

    export = export_dir(Path(source.model).expanduser())
    available = sorted(p.stem for p in export.glob("*.json"))
    modalities = source.modalities or available
    missing = sorted(set(modalities) - set(available))
    if missing:
        raise SpecError(f"inputs: {export} has no {missing[0]} tower; it has: {available}")
    towers = {m: load_tower(export, m) for m in modalities}
    trained_on = {meta["feature_set"] for _, meta in towers.values()}
    if len(trained_on) != 1:
        raise SpecError(f"inputs: the towers in {export} read several feature sets")
    info = feature_set_info(store, trained_on.pop(), version)
    for modality, (_, meta) in towers.items():
        column = meta["input"]
        if column not in info.columns or info.shape(column) != list(meta["input_shape"]):
            raise SpecError(
                f"inputs: the {modality} tower reads {column!r} of shape "
                f"{meta['input_shape']}; feature set {info.name!r} v{info.version} does not "
                "have it (re-encode, or pin the version it trained on)"
            )
    part = _PartBuilder(info.version)
    columns = sorted({meta["input"] for _, meta in towers.values()})
    for batch in _batches(store, info, columns):
        part.add_keys(batch)
        for modality, (tower, meta) in towers.items():
            column = meta["input"]
            ids = info.columns[column].dtype.startswith("int")
            x, present = dense(batch.column(column), info.shape(column), np.float32)
            out = np.zeros((len(present), meta["out_dim"]), np.float32)
            if present.any():
                inputs = torch.as_tensor(x[present].astype(np.int64) if ids else x[present])
                with torch.no_grad():
                    out[present] = F.normalize(tower(inputs).float(), dim=-1).numpy()
            part.add(f"{source.label}:{modality}", out, present)
    return part.finish()


def _batches(store: TableStore, info: FeatureSetInfo, columns: list[str]) -> Iterator[pa.Table]:
    dataset = store.dataset(info.table, info.version)
    wanted = [*KEYS, *columns]
    for batch in dataset.to_batches(columns=wanted, filter=ORIGINAL, batch_size=READ_BATCH):
        if batch.num_rows:
            yield pa.Table.from_batches([batch])


@dataclass
class _PartBuilder:
    """One input's rows as they are read, a batch at a time."""

    version: int
    ids: list[str] = field(default_factory=list)
    splits: list[str | None] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    x: dict[str, list[np.ndarray]] = field(default_factory=dict)
    present: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add_keys(self, batch: pa.Table) -> None:
        self.ids += batch.column("sample_id").to_pylist()
        self.splits += batch.column("split").to_pylist()
        self.labels += batch.column("label").to_pylist()

    def add(self, branch: str, x: np.ndarray, present: np.ndarray) -> None:
        self.x.setdefault(branch, []).append(x)
        self.present.setdefault(branch, []).append(present)

    def finish(self) -> Part:
        return Part(
            ids=self.ids,
            splits=self.splits,
            labels=self.labels,
            x={b: np.concatenate(v) for b, v in self.x.items()},
            present={b: np.concatenate(v) for b, v in self.present.items()},
            version=self.version,
        )


def _join(parts: dict[str, Part]) -> Branches:
    """Rows of every part, by sample_id in first-seen order; a part's missing rows absent."""
    index: dict[str, int] = {}
    splits: list[str | None] = []
    labels: list[str | None] = []
    for part in parts.values():
        for sid, split, label in zip(part.ids, part.splits, part.labels, strict=True):
            if sid not in index:
                index[sid] = len(index)
                splits.append(split)
                labels.append(label)
    n = len(index)
    x, present = {}, {}
    for part in parts.values():
        rows = np.fromiter((index[s] for s in part.ids), np.int64, len(part.ids))
        for branch, values in part.x.items():
            x[branch] = np.zeros((n, values.shape[1]), np.float32)
            x[branch][rows] = values
            present[branch] = np.zeros(n, bool)
            present[branch][rows] = part.present[branch]
    return Branches(
        ids=np.array(list(index), dtype=object),
        splits=np.array(splits, dtype=object),
        labels=np.array(labels, dtype=object),
        x=x,
        present=present,
        versions={name: part.version for name, part in parts.items()},
    )
