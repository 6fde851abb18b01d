"""A learnable synthetic feature set, for tests, benchmarks and trying the trainer offline.

Each sample has a latent vector (its class centre plus its own offset). Every
modality sees that latent through its own random linear map plus noise, so a
tower has to learn the map back: pairs match at the instance level (recall@1
well above chance is reachable) and share the class (labels and zero-shot make
sense). Model inputs (pixels, log-mel, token ids) carry the same latent, so
trainable towers can learn from them too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
from deltalake import write_deltalake

from features.metadata import ColumnMeta, EncoderMeta, FeatureSetMeta
from features.schema import ORIGINAL_VIEW, conform, feature_schema, list_of
from features.store import FeatureStore

MODALITIES = ("text", "image", "audio")


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=8).hexdigest()


def _list_column(values: np.ndarray, present: np.ndarray, value_type: pa.DataType) -> pa.Array:
    rows = len(values)
    flat = values.reshape(rows, -1)
    width = flat.shape[1]
    offsets = pa.array(np.arange(rows + 1, dtype=np.int64) * width, pa.int32())
    return pa.ListArray.from_arrays(
        offsets,
        pa.array(flat.ravel(), value_type),
        type=list_of(value_type),
        mask=pa.array(~present),
    )


def write_synthetic_feature_set(
    store: FeatureStore,
    name: str = "synthetic",
    *,
    classes: int = 10,
    per_class: int = 24,
    dims: dict[str, int] | None = None,
    latent: int = 16,
    noise: float = 0.3,
    inputs: bool = False,
    image_size: int = 8,
    mel_shape: tuple[int, int] = (8, 16),
    text_len: int = 12,
    vocab: int = 64,
    views: int = 0,
    missing: float = 0.0,
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
    files: int = 4,
    seed: int = 0,
) -> int:
    """Write ``features/<name>`` (one append per file) and return its latest version.

    ``missing`` is the fraction of samples that lack one modality (never all of them).
    """
    dims = dims or {"text": 32, "image": 48, "audio": 24}
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, latent)) * 2.0
    maps = {m: rng.normal(size=(latent, d)) / np.sqrt(latent) for m, d in dims.items()}
    pix_map = rng.normal(size=(latent, 3 * image_size * image_size))
    mel_map = rng.normal(size=(latent, mel_shape[0] * mel_shape[1]))

    n = classes * per_class
    label = np.repeat(np.arange(classes), per_class)
    z = centres[label] + rng.normal(size=(n, latent))
    order = rng.permutation(n)
    cut = np.cumsum([int(round(s * n)) for s in splits])[:2]
    split = np.empty(n, dtype=object)
    split[order[: cut[0]]], split[order[cut[0] : cut[1]]], split[order[cut[1] :]] = (
        "train",
        "val",
        "test",
    )
    has = {m: np.ones(n, bool) for m in dims}
    drop = rng.random(n) < missing
    which = rng.integers(0, len(dims), size=n)
    for i, m in enumerate(dims):
        has[m] &= ~(drop & (which == i))

    rows_z, rows_idx, rows_view = [z], [np.arange(n)], [np.full(n, ORIGINAL_VIEW)]
    train = np.flatnonzero(split == "train")
    for v in range(views):
        rows_z.append(z[train] + rng.normal(size=(len(train), latent)) * 0.3)
        rows_idx.append(train)
        rows_view.append(np.full(len(train), v))
    zz, idx, view = np.concatenate(rows_z), np.concatenate(rows_idx), np.concatenate(rows_view)
    m_rows = len(zz)

    columns: dict[str, pa.Array] = {}
    meta_cols: dict[str, ColumnMeta] = {}
    encoders = []
    for m, d in dims.items():
        emb = zz @ maps[m] + rng.normal(size=(m_rows, d)) * noise
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        columns[f"{m}_emb"] = _list_column(emb.astype(np.float32), has[m][idx], pa.float32())
        enc = f"synthetic-{m}"
        meta_cols[f"{m}_emb"] = ColumnMeta(shape=[d], encoder=enc, normalized=True)
        encoders.append(EncoderMeta(name=enc, config_hash=_hash({"m": m, "d": d, "s": seed})))
    if inputs:
        s, (mels, frames) = image_size, mel_shape
        pixels = (
            np.tanh(zz @ pix_map / np.sqrt(latent)) + rng.normal(size=(m_rows, 3 * s * s)) * 0.3
        )
        logmel = -40 + 20 * np.tanh(zz @ mel_map / np.sqrt(latent))
        logmel += rng.normal(size=logmel.shape) * 3
        ids = 1 + (label[idx, None] * 5 + rng.integers(0, 5, size=(m_rows, text_len))) % (vocab - 1)
        ids[:, text_len - 2 :] = 0  # padding
        for col, arr, shape, vt, enc in [
            ("image_pixels", pixels, [3, s, s], pa.float32(), "synthetic-pixels"),
            ("audio_logmel", logmel, [mels, frames], pa.float32(), "synthetic-logmel"),
            ("text_ids", ids, [text_len], pa.int32(), "synthetic-ids"),
        ]:
            modality = col.split("_")[0]
            columns[col] = _list_column(arr.astype(vt.to_pandas_dtype()), has[modality][idx], vt)
            tokens = {"pad_id": 0, "vocab_size": vocab} if col == "text_ids" else {}
            meta_cols[col] = ColumnMeta(
                shape=shape, dtype=str(vt), encoder=enc, kind="input", **tokens
            )
            encoders.append(EncoderMeta(name=enc, config_hash=_hash({"c": col})))

    sample_ids = np.array([f"s{i:05d}" for i in range(n)], dtype=object)
    mods = [[m for m in dims if has[m][i]] for i in idx]
    labels = [f"class_{c}" for c in label[idx]]
    table = pa.table(
        {
            "sample_id": pa.array(sample_ids[idx], pa.string()),
            "view": pa.array(view, pa.int32()),
            "split": pa.array(split[idx], pa.string()),
            "label": pa.array(labels, pa.string()),
            "labels": pa.array([[lab] for lab in labels], list_of(pa.string())),
            "modalities": pa.array(mods, list_of(pa.string())),
            **columns,
        }
    )
    schema = feature_schema({c: columns[c].type for c in columns})
    meta = FeatureSetMeta(encoders=encoders, columns=meta_cols, samples_version=0)
    table_name = f"features/{name}"
    store.ensure_table(table_name, schema=schema, properties=meta.to_properties())
    # Shuffled like content-hash ids would be, so no file holds a single class.
    table = conform(table, schema).take(pa.array(rng.permutation(table.num_rows)))
    for chunk in np.array_split(np.arange(table.num_rows), files):
        write_deltalake(
            store.table_uri(table_name),
            table.take(pa.array(chunk)),
            mode="append",
            storage_options=store.storage_options or None,
        )
    return store.delta(table_name).version()
