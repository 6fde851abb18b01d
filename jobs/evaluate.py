"""Score a pretraining checkpoint: cross-modal recall@k and prototype zero-shot accuracy.

Reads the val or test rows of the feature set at the version the checkpoint
recorded (original rows only, ``view == -1``), embeds them with each tower, and
writes ``eval_<split>.json`` / ``eval_<split>.parquet`` plus ``curves.png`` (loss
and val recall per epoch, from the checkpoint's ``metrics.jsonl``) next to it.

Zero-shot without a prompt encoder: feature sets store text features of the
samples, not a text encoder for arbitrary prompts. So a class's "prompt" is its
prototype: the mean text-tower embedding of that class's *train* captions, and
an image / audio row is classified by its nearest prototype (cosine). Skipped,
with the reason in ``zero_shot_note``, when there is no text tower or no labels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.store import FeatureStore
from jobs.pretrain import checkpoint as ckpt
from jobs.pretrain.arrays import row_filter, to_tensors
from jobs.pretrain.config import TrainConfig
from jobs.pretrain.data import FeatureSetInfo, check_compatible, feature_set_info, tower_inputs
from jobs.pretrain.metrics import (
    KS,
    class_prototypes,
    embed,
    knn_accuracy,
    linear_probe_accuracy,
    pair_recalls,
    prototype_accuracy,
)
from pipelines.errors import SpecError

if TYPE_CHECKING:
    import torch

    from jobs.pretrain.model import ContrastiveModel

ZERO_SHOT_METHOD = (
    "nearest class prototype = mean text-tower embedding of that class's train captions"
)


@dataclass
class EvalResult:
    """What ``evaluate`` measured and where it wrote it."""

    checkpoint: str
    feature_set: str
    version: int
    split: str
    step: int
    rows: int
    recall: dict[str, float]  # "image->text/r@1", "image->text/class_r@1" -> value
    pair_rows: dict[str, int]  # "image-text" -> rows having both modalities
    means: dict[str, float] = field(default_factory=dict)  # "mean_r@1", "mean_class_r@1"
    zero_shot: dict[str, float] = field(default_factory=dict)  # modality -> accuracy
    zero_shot_note: str = ""
    # modality -> {"knn@5": acc, "linear": acc}: frozen features, fitted on the train split
    probes: dict[str, dict[str, float]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One row per direction: ``direction, n, r@1, r@5, r@10`` (and ``class_r@1``)."""
        rows: dict[str, dict[str, Any]] = {}
        for key, value in self.recall.items():
            direction, k = key.split("/")
            a, b = direction.split("->")
            n = self.pair_rows.get(f"{a}-{b}", self.pair_rows.get(f"{b}-{a}", 0))
            rows.setdefault(direction, {"direction": direction, "n": n})[k] = value
        return list(rows.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _load_model(state: dict[str, Any]) -> tuple[TrainConfig, ContrastiveModel]:
    from jobs.pretrain.model import ContrastiveModel

    config = TrainConfig.model_validate(state["meta"]["config"])
    model = ContrastiveModel(config, state["meta"]["shapes"])
    model.load_state_dict(state["model"])
    return config, model.eval()


def evaluate(
    checkpoint_dir: str | Path,
    *,
    split: Literal["val", "test"] = "test",
    storage_options: dict[str, str] | None = None,
    out_dir: str | Path | None = None,
    ks: tuple[int, ...] = KS,
    prototype_rows: int = 100_000,  # labelled train rows read for prototypes and probes
    export_embeddings: bool = False,
) -> EvalResult:
    """Evaluate the checkpoint in ``checkpoint_dir`` (a local directory) on ``split``;
    with ``export_embeddings`` also write every split's embeddings (``embeddings_<split>
    .parquet``: sample_id, split, label and one ``<modality>_emb`` column per tower)."""
    directory = Path(checkpoint_dir)
    state = ckpt.load_state(directory)
    meta = state["meta"]
    config, model = _load_model(state)
    store = FeatureStore(meta["store"], storage_options=storage_options)
    info = feature_set_info(store, meta["feature_set"], meta["version"])
    columns = sorted(meta["shapes"])
    check_compatible({**meta, "checkpoint": str(directory)}, info, columns)
    inputs = tower_inputs(info, config)

    wanted = sorted({"label", "split", "view", *columns})
    rows = store.to_arrow(
        info.table, info.version, columns=wanted, filter=row_filter(split, include_views=False)
    )
    if rows.num_rows < 2:
        raise SpecError(
            f"feature set {info.name!r} v{info.version} has {rows.num_rows} {split!r} rows "
            "(original samples): nothing to evaluate; try the other split"
        )
    arrays = to_tensors(rows, inputs=inputs, split=split, include_views=False, labels=True)
    feats = {m: embed(model, m, arrays[f"x_{m}"]) for m in model.towers}
    present = {m: arrays[f"has_{m}"] for m in model.towers}
    pairs = list(combinations(sorted(model.towers), 2))
    scores = pair_recalls(feats, present, pairs, ks, labels=arrays["label"])
    recall = {k: v for k, v in scores.items() if "->" in k}
    pair_rows = {k[: -len("/n")]: int(v) for k, v in scores.items() if k.endswith("/n")}
    means = {k: v for k, v in scores.items() if k.startswith("mean_")}

    labels = rows.column("label").to_pylist()
    train = _train_rows(store, info, model, inputs, prototype_rows)
    zero_shot, note = _zero_shot(info, model, train, feats, present, labels)
    probes = _probes(train, feats, present, labels)
    result = EvalResult(
        checkpoint=str(directory),
        feature_set=info.name,
        version=info.version,
        split=split,
        step=int(state["step"]),
        rows=rows.num_rows,
        recall=recall,
        pair_rows=pair_rows,
        means=means,
        zero_shot=zero_shot,
        zero_shot_note=note,
        probes=probes,
    )
    out = Path(out_dir) if out_dir else directory
    if export_embeddings:
        for name in ("train", "val", "test"):
            path = write_embeddings(store, info, model, inputs, name, out)
            if path is not None:
                result.files[f"embeddings {name}"] = str(path)
    _write(result, out, ckpt.read_metrics(directory))
    return result


EMBEDDING_BATCH = 4096  # rows per read, forward and Parquet row group: memory stays flat


def write_embeddings(
    store: FeatureStore,
    info: FeatureSetInfo,
    model: ContrastiveModel,
    inputs: dict[str, tuple[str, list[int], str]],
    split: str,
    out: Path,
) -> Path | None:
    """One split's original rows through every tower, as Parquet (None: no such rows),
    a batch at a time: a split larger than memory streams through."""
    import pyarrow.parquet as pq

    columns = sorted({"sample_id", "label", "split", "view", *(c for c, _, _ in inputs.values())})
    batches = store.dataset(info.table, info.version).to_batches(
        columns=columns,
        filter=row_filter(split, include_views=False),
        batch_size=EMBEDDING_BATCH,
    )
    path = out / f"embeddings_{split}.parquet"
    writer: pq.ParquetWriter | None = None
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            table = _embedded(model, inputs, pa.Table.from_batches([batch]), split)
            if writer is None:
                out.mkdir(parents=True, exist_ok=True)
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return path if writer is not None else None


def _embedded(
    model: ContrastiveModel,
    inputs: dict[str, tuple[str, list[int], str]],
    rows: pa.Table,
    split: str,
) -> pa.Table:
    arrays = to_tensors(rows, inputs=inputs, split=split, include_views=False)
    table = rows.select(["sample_id", "split", "label"])
    for m in sorted(model.towers):
        values = embed(model, m, arrays[f"x_{m}"]).numpy()
        present = np.asarray(arrays[f"has_{m}"], dtype=bool)
        rows_of = pa.FixedSizeListArray.from_arrays(
            pa.array(values.ravel(), pa.float32()), values.shape[1]
        )
        emb = pc.if_else(pa.array(present), rows_of, pa.scalar(None, rows_of.type))
        table = table.append_column(f"{m}_emb", emb.cast(pa.list_(pa.float32())))
    return table


@dataclass
class TrainRows:
    """Labelled train rows (original samples) through every tower: the memory for kNN, the
    data of the linear probe, the captions of the zero-shot prototypes."""

    feats: dict[str, torch.Tensor]
    present: dict[str, np.ndarray]
    labels: list[str | None]


def _train_rows(
    store: FeatureStore,
    info: FeatureSetInfo,
    model: ContrastiveModel,
    inputs: dict[str, tuple[str, list[int], str]],
    limit: int,
) -> TrainRows:
    columns = sorted({"label", "split", "view", *(c for c, _, _ in inputs.values())})
    train = store.to_arrow(
        info.table, info.version, columns=columns, filter=row_filter("train", include_views=False)
    )
    train = train.filter(pc.is_valid(train.column("label"))).slice(0, limit)
    arrays = to_tensors(train, inputs=inputs, split="train", include_views=False)
    return TrainRows(
        feats={m: embed(model, m, arrays[f"x_{m}"]) for m in model.towers},
        present={m: arrays[f"has_{m}"] for m in model.towers},
        labels=train.column("label").to_pylist(),
    )


def _zero_shot(
    info: FeatureSetInfo,
    model: ContrastiveModel,
    train: TrainRows,
    feats: dict[str, torch.Tensor],
    present: dict[str, np.ndarray],
    labels: list[str | None],
) -> tuple[dict[str, float], str]:
    """Prototype zero-shot accuracy per non-text modality, and a note saying how or why not."""
    if "text" not in model.towers:
        return {}, "skipped: no text tower to build class prototypes from"
    if not any(labels):
        return {}, f"skipped: the {info.name!r} rows have no labels"
    has = train.present["text"]
    if not has.any():
        return {}, "skipped: no labelled train rows with text"
    train_labels = [lab for lab, h in zip(train.labels, has, strict=True) if h]
    protos, classes = class_prototypes(train.feats["text"][has], train_labels)
    accuracy = {}
    for m in sorted(model.towers):
        if m == "text":
            continue
        rows = np.flatnonzero(present[m])
        acc, n = prototype_accuracy(feats[m][rows], [labels[i] for i in rows], protos, classes)
        if n:
            accuracy[m] = acc
    return accuracy, f"{ZERO_SHOT_METHOD} ({len(classes)} classes)"


def _probes(
    train: TrainRows,
    feats: dict[str, torch.Tensor],
    present: dict[str, np.ndarray],
    labels: list[str | None],
) -> dict[str, dict[str, float]]:
    """Per modality: kNN (k=5) and linear-probe accuracy of the frozen features, trained on
    the labelled train rows of that modality (none without labels)."""
    out: dict[str, dict[str, float]] = {}
    for m in sorted(feats):
        has = train.present[m]
        rows = np.flatnonzero(present[m])
        memory = train.feats[m][has]
        memory_labels = [lab for lab, h in zip(train.labels, has, strict=True) if h]
        queries, query_labels = feats[m][rows], [labels[i] for i in rows]
        scores = {
            name: measure(memory, memory_labels, queries, query_labels)
            for name, measure in (("knn@5", knn_accuracy), ("linear", linear_probe_accuracy))
        }
        if all(n for _, n in scores.values()):
            out[m] = {name: acc for name, (acc, _) in scores.items()}
    return out


def _write(result: EvalResult, out: Path, history: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"eval_{result.split}"
    result.files = {"json": f"{stem}.json", "parquet": f"{stem}.parquet", **result.files}
    import pyarrow.parquet as pq

    table = result.table()
    pq.write_table(pa.Table.from_pylist(table), result.files["parquet"])
    plot = plot_curves(history, out / "curves.png", title=f"{result.feature_set} v{result.version}")
    if plot is not None:
        result.files["plot"] = str(plot)
    Path(result.files["json"]).write_text(json.dumps(result.to_dict(), indent=2))


def plot_curves(history: list[dict[str, Any]], path: Path, *, title: str = "") -> Path | None:
    """Train loss and val recall@1 per epoch as one PNG; ``None`` without history."""
    epochs = [row for row in history if "epoch" in row and "train_loss" in row]
    if not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [row["epoch"] for row in epochs]
    fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(x, [row["train_loss"] for row in epochs], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="contrastive loss")
    keys = sorted({k for row in epochs for k in row if k.startswith("val/") and k.endswith("r@1")})
    for key in keys:
        ax_recall.plot(x, [row.get(key, np.nan) for row in epochs], marker=".", label=key[4:-4])
    ax_recall.set(xlabel="epoch", ylabel="recall@1", title="val recall@1", ylim=(0, 1.02))
    if keys:
        ax_recall.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
