"""Encode: samples and views -> feature sets (``features/<name>``), incrementally.

Two Ray stages per feature set: ``Preprocess`` in CPU tasks (decode, resize,
tokenize, featurize) and ``Encode`` (the model forward) in an actor pool with
``num_gpus`` per actor when the cluster has GPUs, so models load once per actor
and decoding never runs on the GPU's time. Model inputs travel between the two
as Arrow fixed-size lists (zero-copy to NumPy), not Python objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.errors import StoreError
from features.keys import semi_join
from features.metadata import FeatureSetMeta, feature_table
from features.schema import FEATURE_KEY_FIELDS, ORIGINAL_VIEW, feature_schema
from features.tables import TableStore, Version
from pipelines.encoders import EncoderConfig, encoder_class, get_encoder, is_builtin
from pipelines.encoders.base import Encoder, device_for_actor
from pipelines.errors import EncodeFailed, SpecError
from pipelines.quarantine import ERROR_FIELDS, unreadable, with_errors

KEY_COLUMNS = [f.name for f in FEATURE_KEY_FIELDS]
MEDIA_COLUMNS = ["text", "image", "audio"]
# field metadata of a model-input column between Preprocess and Encode
ENCODER_KEY, INPUT_KEY, SHAPE_KEY = b"mmfp.encoder", b"mmfp.input", b"mmfp.shape"

T = TypeVar("T")


class FeatureSetSpec(BaseModel):
    """One feature set: the encoders whose outputs share a table, and what they encode."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    encoders: list[EncoderConfig] = Field(min_length=1)
    views: bool = True  # also encode the augmented views (view >= 0) of train samples

    @field_validator("encoders")
    @classmethod
    def _known(cls, encoders: list[EncoderConfig]) -> list[EncoderConfig]:
        for config in encoders:
            encoder_class(config.name).Params.model_validate(config.params)
        return encoders


class EncodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    feature_sets: list[FeatureSetSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> EncodeSpec:
        names = [f.name for f in self.feature_sets]
        if len(names) != len(set(names)):
            raise ValueError(f"feature set names must be unique: {names}")
        return self

    def get(self, name: str) -> FeatureSetSpec:
        for feature_set in self.feature_sets:
            if feature_set.name == name:
                return feature_set
        known = ", ".join(f.name for f in self.feature_sets)
        raise SpecError(f"no feature set {name!r} in the spec's encode section (have: {known})")


def build_encoders(feature_set: FeatureSetSpec) -> list[Encoder]:
    """The encoders of a set, checked for clashing output columns (reads configs, no weights)."""
    encoders = [get_encoder(c) for c in feature_set.encoders]
    seen: dict[str, str] = {}
    for encoder in encoders:
        for column in encoder.output_columns():
            if column in seen:
                raise SpecError(
                    f"feature set {feature_set.name!r}: encoders {seen[column]!r} and "
                    f"{encoder.config.name!r} both write column {column!r}; put them in "
                    "separate feature sets"
                )
            seen[column] = encoder.config.name
    return encoders


def feature_set_meta(encoders: list[Encoder], **lineage: int | None) -> FeatureSetMeta:
    """The feature set's description: encoders, column shapes, where the rows came from."""
    described = [e.describe() for e in encoders]
    return FeatureSetMeta(
        encoders=[encoder for encoder, _ in described],
        columns={name: c for _, columns in described for name, c in columns.items()},
        **lineage,
    )


def table_schema(encoders: list[Encoder]) -> pa.Schema:
    columns = {n: t for e in encoders for n, (t, _) in e.output_columns().items()}
    return feature_schema(columns)


def check_compatible(name: str, stored: FeatureSetMeta, wanted: FeatureSetMeta) -> None:
    """Refuse to mix features of another encoder config into an existing feature set."""
    have, want = stored.encoder_hashes(), wanted.encoder_hashes()
    if have != want:
        raise SpecError(
            f"feature set {name!r} was built with encoders {have}, the spec now says {want}: "
            "features of different encoders never share a table. Use a new feature set name, "
            "or `mmfp encode SPEC --feature-set NAME --reencode` to replace it as a new version"
        )


def missing_rows(batch: pa.Table, *, todo: pa.Table) -> pa.Table:
    """The rows whose (sample_id, view) is in ``todo``: those the feature set lacks."""
    return semi_join(batch, todo, ["sample_id", "view"])


def as_feature_input(batch: pa.Table, *, is_view: bool) -> pa.Table:
    """Samples or views rows -> key columns + media, the common input of every encoder."""
    n = batch.num_rows
    view = batch.column("view") if is_view else pa.repeat(pa.scalar(ORIGINAL_VIEW, pa.int32()), n)
    columns = {
        "sample_id": batch.column("sample_id"),
        "view": view.cast(pa.int32()),
        **{c: batch.column(c) for c in KEY_COLUMNS[2:] + MEDIA_COLUMNS},
    }
    return pa.table(columns)


def _input_field(index: int, key: str, array: np.ndarray) -> tuple[pa.Field, pa.Array]:
    """A model input as a fixed-size list column; its shape travels in the field metadata."""
    values = _input_field_values(array)
    shape = ",".join(str(d) for d in np.shape(array)[1:])
    metadata = {ENCODER_KEY: str(index), INPUT_KEY: key, SHAPE_KEY: shape}
    return pa.field(f"__in{index}__{key}", values.type, metadata=metadata), values


class Preprocess:
    """CPU stage: each encoder's ``preprocess``; inputs leave as fixed-size list columns.

    A row an encoder fails on does not fail its batch: it is found by preprocessing the
    rows one by one, goes on without media (placeholders, no features) and carries an
    ``EncodeFailed`` error, so the feature set's sink sends it to quarantine.
    """

    def __init__(self, configs: list[EncoderConfig]) -> None:
        self.configs = configs
        self._encoders: list[Encoder] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"configs": self.configs, "_encoders": None}

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self._encoders is None:
            self._encoders = [get_encoder(c) for c in self.configs]
        columns, failed = run_or_find_failures(batch, self._preprocess)
        if columns is None:
            keep = pa.array([i not in failed for i in range(batch.num_rows)])
            for column in MEDIA_COLUMNS:  # the failing rows go on as rows without media
                if column in batch.column_names:
                    index = batch.schema.get_field_index(column)
                    media = pc.if_else(
                        keep, batch.column(column), pa.scalar(None, batch.schema.field(index).type)
                    )
                    batch = batch.set_column(index, column, media)
            columns = self._preprocess(batch)
        out = batch.select(KEY_COLUMNS)
        for field, values in columns:
            out = out.append_column(field, values)
        return _with_errors(out, failed)

    def _preprocess(self, batch: pa.Table) -> list[tuple[pa.Field, pa.Array]]:
        assert self._encoders is not None
        return [
            _input_field(i, key, array)
            for i, encoder in enumerate(self._encoders)
            for key, array in encoder.preprocess(batch).items()
        ]


def run_or_find_failures(
    batch: pa.Table, step: Callable[[pa.Table], T]
) -> tuple[T | None, dict[int, EncodeFailed]]:
    """``(step(batch), {})``; when the batch fails, ``(None, rows)``: the rows ``step``
    fails on, each with the reason, found row by row. The batch runs once when it passes
    (a model's forward is the costly part of encoding: never run it twice)."""
    try:
        return step(batch), {}
    except Exception:  # one bad row: find it, and any others, row by row
        pass
    failed = {}
    for i in range(batch.num_rows):
        try:
            step(batch.slice(i, 1))
        except Exception as e:
            failed[i] = EncodeFailed(str(unreadable(e)))
    return None, failed


def _with_errors(out: pa.Table, failed: dict[int, EncodeFailed]) -> pa.Table:
    """``out`` with the error columns, set on the rows in ``failed``."""
    for field in ERROR_FIELDS:
        if field.name not in out.column_names:
            out = out.append_column(field, pa.nulls(out.num_rows, field.type))
    return with_errors(out, failed)


def _inputs(batch: pa.Table, index: int) -> dict[str, np.ndarray]:
    """Encoder ``index``'s model inputs, reshaped from their field metadata."""
    inputs = {}
    for field in batch.schema:
        meta = field.metadata or {}
        if meta.get(ENCODER_KEY) == str(index).encode():
            shape = [int(d) for d in meta[SHAPE_KEY].decode().split(",") if d]
            column = batch.column(field.name).combine_chunks()
            values = column.values.to_numpy(zero_copy_only=False)
            inputs[meta[INPUT_KEY].decode()] = values.reshape(len(column), *shape)
    return inputs


class Encode:
    """Model stage: loads every model of the set once (per actor, on first use), returns
    feature rows. Ray runs it as an actor class for models, as a task function otherwise.

    A row the model fails on gets an ``EncodeFailed`` error and no features; the rest of
    the batch is encoded.
    """

    def __init__(self, configs: list[EncoderConfig]) -> None:
        self.configs = configs
        self._encoders: list[Encoder] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"configs": self.configs, "_encoders": None}

    @property
    def encoders(self) -> list[Encoder]:
        return self.load()

    def load(self) -> list[Encoder]:
        """The set's encoders with their models loaded, here and now (the property loads
        them on first use; a process that forks workers loads them first, to share them)."""
        if self._encoders is None:
            device = device_for_actor()
            self._encoders = [get_encoder(c) for c in self.configs]
            for encoder in self._encoders:
                encoder.load(device)
        return self._encoders

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns, failed = run_or_find_failures(batch, self._encode)
        if columns is None:
            batch = _masked(batch, failed, len(self.encoders))
            columns = self._encode(batch)
        out = batch.select(
            [*KEY_COLUMNS, *(f.name for f in ERROR_FIELDS if f.name in batch.column_names)]
        )
        for column in columns:
            out = out.append_column(*column)
        return _with_errors(out, failed)

    def _encode(self, batch: pa.Table) -> list[tuple[str, pa.Array]]:
        columns = []
        for i, encoder in enumerate(self.encoders):
            features = encoder.to_arrow(encoder.encode(_inputs(batch, i)))
            columns += [(name, features.column(name)) for name in features.column_names]
        return columns


def _masked(batch: pa.Table, failed: dict[int, EncodeFailed], encoders: int) -> pa.Table:
    """``batch`` with every modality mask off on the ``failed`` rows: the model skips them."""
    if not failed:
        return batch
    keep = np.array([i not in failed for i in range(batch.num_rows)])
    for field in batch.schema:
        meta = field.metadata or {}
        if meta.get(INPUT_KEY, b"").endswith(b"_mask"):
            index = batch.schema.get_field_index(field.name)
            mask = batch.column(index).combine_chunks().values.to_numpy(zero_copy_only=False)
            masked = mask.reshape(batch.num_rows, -1) & keep[:, None]
            batch = batch.set_column(index, field, _input_field_values(masked))
    return batch


def _input_field_values(array: np.ndarray) -> pa.Array:
    flat = np.ascontiguousarray(array).reshape(len(array), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])


def wants_actors(encoders: list[Encoder]) -> bool:
    return any(e.needs_model for e in encoders)


def embed_query(
    store: TableStore,
    feature_set: str,
    *,
    text: str | None = None,
    image_bytes: bytes | None = None,
    audio_bytes: bytes | None = None,
    trust_store_code: bool = False,
) -> np.ndarray:
    """Embed a search query with the feature set's own encoder (the one recorded in it).

    A text query against a joint feature set (CLIP, CLAP) lands in the same space as
    its image / audio embeddings, so text finds images. See ``query_encoder`` for what
    is refused.
    """
    given = {"text": text, "image": image_bytes, "audio": audio_bytes}
    modality, value = next(((m, v) for m, v in given.items() if v is not None), (None, None))
    if modality is None:
        raise StoreError("embed_query needs text=, image_bytes= or audio_bytes=")
    encoder = query_encoder(store, feature_set, modality, trust_store_code=trust_store_code)
    return embed_value(encoder, modality, value)


def embed_value(encoder: Encoder, modality: str, value: str | bytes) -> np.ndarray:
    """One text or one media file through a loaded ``query_encoder``: its embedding."""
    (vector,) = embed_values(encoder, modality, [value])
    if vector is None:
        raise StoreError(f"the {modality} query could not be decoded")
    return vector


def embed_values(
    encoder: Encoder, modality: str, values: list[str] | list[bytes]
) -> list[np.ndarray | None]:
    """Texts or media files through a loaded ``query_encoder`` in one batch: an
    embedding each, or None for one that could not be decoded."""
    column = pa.array(values, pa.string() if modality == "text" else pa.binary())
    outputs = encoder.encode(encoder.preprocess(pa.table({modality: column})))
    vectors = np.asarray(outputs[f"{modality}_emb"], np.float32)
    return [v if ok else None for v, ok in zip(vectors, outputs[f"{modality}_mask"], strict=True)]


def query_encoder(
    store: TableStore,
    feature_set: str,
    modality: str,
    *,
    version: Version = None,
    trust_store_code: bool = False,
) -> Encoder:
    """The feature set's recorded encoder that embeds ``modality``, loaded (a service
    keeps it for every query). Refuses when the encoder's model or config changed since
    the feature set was built. A store's metadata is data: an encoder it names by import
    path (``package.module:Class``) is imported only with ``trust_store_code``; built-in
    encoders need no trust."""
    name = feature_table(feature_set)
    meta = FeatureSetMeta.of(store, store.delta(name, version), table=name)
    for entry in meta.encoders:
        if entry.config is None:
            continue
        if not is_builtin(entry.name) and not trust_store_code:
            raise StoreError(
                f"{name} was encoded by {entry.name!r}, code named only by the store's "
                "metadata: importing it runs that code. Pass --trust-store-code (Python: "
                "trust_store_code=True) if you trust whoever wrote this store"
            )
        encoder = get_encoder(EncoderConfig.model_validate(entry.config))
        if encoder.imports_recorded_code() and not trust_store_code:
            raise StoreError(
                f"{name} was encoded by {entry.name!r} with `trust_code`: it imports code "
                f"that files under {entry.config.get('model')!r} name. Pass "
                "--trust-store-code (Python: trust_store_code=True) if you trust them"
            )
        if f"{modality}_emb" not in encoder.output_columns():
            continue
        if encoder.config_hash() != entry.config_hash:
            raise StoreError(
                f"{name}: encoder {entry.name!r} changed since the feature set was built "
                "(its model or config hash differs); re-encode before searching with it"
            )
        encoder.load(device_for_actor())
        return encoder
    encoders = [e.name for e in meta.encoders]
    if any(e.config is None for e in meta.encoders):
        raise StoreError(
            f"{name} does not record its encoders' configs (made by an older mmfp): "
            f"re-encode it with --reencode to search it by {modality}"
        )
    raise StoreError(f"{name}: none of its encoders {encoders} embeds {modality} queries")
