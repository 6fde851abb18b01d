"""How well a sample's modalities agree, in a joint encoder's space (CLIP: caption and
image; CLAP: caption and audio): the curation signal LAION filtered its pairs on.

A feature set's embedding columns made by one encoder with one width share a space
(``<modality>_emb`` columns, ``features.metadata``); each pair of them gives a
``<a>_<b>_similarity`` per sample, the cosine of its original row's two embeddings
(null where the sample lacks one). ``mmfp store stats features/<name>`` shows their
distributions per split and the samples that agree least.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.metadata import FeatureSetMeta, feature_table
from features.schema import ORIGINAL_VIEW
from features.tables import TableStore, Version

BATCH_ROWS = 8192


def joint_pairs(meta: FeatureSetMeta) -> list[tuple[str, str]]:
    """Pairs of embedding columns one encoder wrote at one width (sorted by name)."""
    columns = sorted(
        (name, col) for name, col in meta.columns.items() if col.kind == "embedding" and col.encoder
    )
    return [
        (a, b)
        for (a, ca), (b, cb) in itertools.combinations(columns, 2)
        if ca.encoder == cb.encoder and ca.dim == cb.dim
    ]


def similarity_name(a: str, b: str) -> str:
    """``image_emb`` + ``text_emb`` -> ``image_text_similarity``."""
    return f"{a.removesuffix('_emb')}_{b.removesuffix('_emb')}_similarity"


def similarities(store: TableStore, feature_set: str, version: Version = None) -> pa.Table:
    """Per original row of the feature set: ``sample_id``, ``split`` and the cosine of each
    joint pair (``joint_pairs``), read a batch at a time. No pair: just the keys."""
    table = feature_table(feature_set)
    dt = store.delta(table, version)
    pairs = joint_pairs(FeatureSetMeta.of(store, dt, table=table))
    columns = sorted({"sample_id", "split", *(c for pair in pairs for c in pair)})
    parts = []
    dataset = store.dataset_of(table, dt)
    for batch in dataset.to_batches(
        columns=columns, filter=pc.field("view") == ORIGINAL_VIEW, batch_size=BATCH_ROWS
    ):
        out = {"sample_id": batch.column("sample_id"), "split": batch.column("split")}
        for a, b in pairs:
            out[similarity_name(a, b)] = _cosines(batch.column(a), batch.column(b))
        parts.append(pa.table(out))
    if not parts:
        empty = {"sample_id": pa.array([], pa.string()), "split": pa.array([], pa.string())}
        return pa.table(
            empty | {similarity_name(a, b): pa.array([], pa.float32()) for a, b in pairs}
        )
    return pa.concat_tables(parts)


def _cosines(left: pa.Array, right: pa.Array) -> pa.Array:
    """Row-wise cosine of two list columns; null where either row is null or all zeros."""
    present = pc.and_(pc.is_valid(left), pc.is_valid(right)).to_numpy(zero_copy_only=False)
    out = np.full(len(left), np.nan, np.float32)
    if present.any():
        mask = pa.array(present)
        x = _dense(left.filter(mask))
        y = _dense(right.filter(mask))
        norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
        dots = np.einsum("ij,ij->i", x, y)
        out[present] = np.divide(dots, norms, out=np.full_like(dots, np.nan), where=norms > 0)
    return pa.array(out, pa.float32(), mask=np.isnan(out))


def _dense(column: pa.Array) -> np.ndarray:
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32)
    return values.reshape(len(column), -1)
