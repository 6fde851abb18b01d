"""From a feature set (Delta table + its ``mmfp.feature_set`` description) to tensor batches.

Reads the feature set's description (shapes, encoders), checks towers and
resumed checkpoints against it, and builds the Ray Datasets whose batches
``arrays.to_tensors`` makes dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from features.metadata import ColumnMeta, FeatureSetMeta, feature_table
from features.tables import TableStore
from jobs.pretrain.arrays import row_filter, to_tensors
from jobs.pretrain.config import TrainConfig
from pipelines.errors import SpecError

if TYPE_CHECKING:
    import ray.data

# Which stored column kinds each tower reads.
TOWER_INPUT_KIND = {
    "projection": "embedding",
    "cnn": "input",
    "tdnn": "input",
    "transformer": "input",
    "hf": "input",
}


@dataclass(frozen=True)
class FeatureSetInfo:
    """A feature set pinned at one version, with its description (``FeatureSetMeta``)."""

    name: str
    version: int
    meta: FeatureSetMeta

    @property
    def table(self) -> str:
        return feature_table(self.name)

    @property
    def columns(self) -> dict[str, ColumnMeta]:
        return self.meta.columns

    def shape(self, column: str) -> list[int]:
        return list(self.columns[column].shape)

    def encoders(self) -> list[dict[str, Any]]:
        """The encoders' entries, as a checkpoint records them."""
        return [e.model_dump(mode="json", exclude_none=True) for e in self.meta.encoders]

    def signature(self, columns: list[str]) -> dict[str, dict[str, Any]]:
        """What a checkpoint must agree on to resume: per column shape, dtype, encoder hash."""
        signature = {}
        for c in sorted(columns):
            encoder = self.meta.encoder_of(c)
            signature[c] = {
                "shape": self.shape(c),
                "dtype": self.columns[c].dtype,
                "encoder": self.columns[c].encoder,
                "config_hash": encoder.config_hash if encoder else None,
            }
        return signature


def feature_set_info(store: TableStore, name: str, version: int | None) -> FeatureSetInfo:
    """Read the feature set description at ``version`` (latest when None), pinning it."""
    table = feature_table(name)
    dt = store.delta(table, version)
    return FeatureSetInfo(name, dt.version(), FeatureSetMeta.of(store, dt, table=table))


def check_towers(info: FeatureSetInfo, config: TrainConfig) -> None:
    """Every tower's input column exists in the feature set and is of the kind it expects."""
    for modality, tower in config.modalities.items():
        col = tower.input
        if col not in info.columns:
            known = ", ".join(sorted(info.columns)) or "none"
            raise SpecError(
                f"modalities.{modality}.input: feature set {info.name!r} (version "
                f"{info.version}) has no column {col!r}; columns: {known}"
            )
        want, have = TOWER_INPUT_KIND[tower.kind], info.columns[col].kind
        if have != want:
            raise SpecError(
                f"modalities.{modality}: a {tower.kind} tower reads an {want} column, but "
                f"{col!r} is an {have} column"
            )
        shape = info.shape(col)
        if tower.kind == "cnn" and len(shape) not in (2, 3):
            raise SpecError(f"modalities.{modality}: {col!r} has shape {shape}, not (C,H,W)/(M,T)")
        if tower.kind == "tdnn" and len(shape) != 2:
            raise SpecError(f"modalities.{modality}: {col!r} has shape {shape}, not (mels, frames)")
        if tower.kind == "tdnn" and (tower.n_mfcc or 0) > shape[0]:
            raise SpecError(
                f"modalities.{modality}.n_mfcc: {tower.n_mfcc} coefficients from {shape[0]} "
                "mel bins; at most as many as the bins"
            )
        if tower.kind in ("projection", "transformer") and len(shape) != 1:
            raise SpecError(f"modalities.{modality}: {col!r} has shape {shape}, expected (dim,)")


def with_recorded_vocabulary(info: FeatureSetInfo, config: TrainConfig) -> TrainConfig:
    """``config`` with each text tower's ``vocab_size`` and ``pad_id`` taken from what the
    feature set records for its token ids where the config leaves them out; a vocabulary
    smaller than the recorded one is refused (an id past it would crash the embedding)."""
    towers = dict(config.modalities)
    for modality, tower in config.modalities.items():
        if tower.kind not in ("transformer", "hf") or tower.input != "text_ids":
            continue
        meta = info.columns[tower.input]
        update: dict[str, Any] = {}
        if tower.pad_id is None and meta.pad_id is not None:
            update["pad_id"] = meta.pad_id
        if tower.kind == "transformer":
            recorded, vocab = meta.vocab_size, tower.vocab_size
            if vocab is None and recorded is None:
                raise SpecError(
                    f"modalities.{modality}.vocab_size: feature set {info.name!r} v"
                    f"{info.version} does not record its vocabulary size (encoded by an older "
                    "mmfp): set it, or re-encode the feature set"
                )
            if vocab is not None and recorded is not None and vocab < recorded:
                raise SpecError(
                    f"modalities.{modality}.vocab_size: {vocab} is smaller than the "
                    f"{recorded} ids feature set {info.name!r} v{info.version} records for "
                    f"{tower.input!r}; leave it out to use the recorded size"
                )
            update["vocab_size"] = vocab or recorded
        towers[modality] = tower.model_copy(update=update)
    return config.model_copy(update={"modalities": towers})


def check_compatible(previous: dict[str, Any], info: FeatureSetInfo, columns: list[str]) -> None:
    """Refuse to resume a checkpoint trained on other dimensions or other encoders."""
    where = previous.get("checkpoint", "the checkpoint")
    if previous.get("feature_set") != info.name:
        raise SpecError(
            f"{where} was trained on feature set {previous.get('feature_set')!r}, not "
            f"{info.name!r}; use a new run `name:` to train on another feature set"
        )
    old, new = previous.get("signature", {}), info.signature(columns)
    problems = []
    for col in sorted(set(old) | set(new)):
        a, b = old.get(col), new.get(col)
        if a is None or b is None:
            problems.append(f"{col}: {'not in the checkpoint' if a is None else 'not used now'}")
            continue
        for key in ("shape", "dtype", "config_hash"):
            if a.get(key) != b.get(key):
                problems.append(
                    f"{col} {key}: checkpoint {a.get(key)!r} (encoder {a.get('encoder')!r}), "
                    f"feature set v{info.version} {b.get(key)!r} (encoder {b.get('encoder')!r})"
                )
    if problems:
        raise SpecError(
            f"refusing to resume {where}: feature set {info.name!r} version {info.version} does "
            f"not match what it was trained on (version {previous.get('version')}):\n  "
            + "\n  ".join(problems)
            + "\nhint: pin `version:` to the checkpoint's version, or start a new run `name:`"
        )


def tower_inputs(
    info: FeatureSetInfo, config: TrainConfig
) -> dict[str, tuple[str, list[int], str]]:
    """modality -> (column, shape, dtype) for ``to_tensors``; ids stay int32, the rest float32."""
    result = {}
    for modality, tower in config.modalities.items():
        stored = info.columns[tower.input].dtype
        dtype = "int32" if stored.startswith("int") else "float32"
        result[modality] = (tower.input, info.shape(tower.input), dtype)
    return result


def count_rows(
    store: TableStore,
    info: FeatureSetInfo,
    split: str,
    *,
    include_views: bool,
    labelled: bool = False,
    exclude: pa.Array | None = None,
) -> int:
    """Rows of ``split`` (only those with a label, with ``labelled``), ``exclude`` left out."""
    table = store.to_arrow(
        info.table,
        info.version,
        columns=["split", "view", "label"],
        filter=row_filter(split, include_views=include_views, exclude=exclude),
    )
    return table.num_rows - (table.column("label").null_count if labelled else 0)


def split_dataset(
    store: TableStore,
    info: FeatureSetInfo,
    config: TrainConfig,
    split: str,
    *,
    views: bool,
    labels: bool = False,
    exclude: pa.Array | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of dense tensor batches for one split, read at the pinned version
    (with ``labels``, each row's ``label`` code too).

    One read block per Parquet file (more only for files over ``BLOCK_BYTES``): Ray
    Data's default would cut small tables into hundreds of tiny blocks, each its own
    map task, and run 5-10x slower than the read itself (measured on 2 cores).
    """
    import ray.data

    inputs = tower_inputs(info, config)
    columns = sorted({"split", "view", *(c for c, _, _ in inputs.values())})
    columns += ["label"] if labels else []
    columns += ["sample_id"] if exclude is not None and len(exclude) else []
    dt = store.delta(info.table, info.version)
    ds = ray.data.read_delta(
        store.table_uri(info.table),
        version=info.version,
        storage_options=store.storage_options or None,
        columns=columns,
        override_num_blocks=read_blocks(dt),
    )
    kwargs = {"inputs": inputs, "split": split, "include_views": views, "labels": labels}
    kwargs["exclude"] = exclude
    return ds.map_batches(to_tensors, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None)


BLOCK_BYTES = 128 * 1024 * 1024  # Ray Data's own target; smaller blocks measured slower


def read_blocks(dt: Any) -> int:
    """Read blocks for a Delta version: one per file, more for files over ``BLOCK_BYTES``."""
    actions = dt.get_add_actions(flatten=True)
    sizes = [int(v) for v in actions.column("size_bytes").to_pylist()] if len(actions) else []
    return max(1, sum(max(1, -(-size // BLOCK_BYTES)) for size in sizes))
