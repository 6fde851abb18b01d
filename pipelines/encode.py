"""Encode: samples and views -> feature sets (``features/<name>``), incrementally.

Two Ray stages per feature set: ``Preprocess`` in CPU tasks (decode, resize,
tokenize, featurize) and ``Encode`` (the model forward) in an actor pool with
``num_gpus`` per actor when the cluster has GPUs, so models load once per actor
and decoding never runs on the GPU's time. Model inputs travel between the two
as Arrow fixed-size lists (zero-copy to NumPy), not Python objects.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from features.errors import StoreError
from features.schema import FEATURE_KEY_FIELDS, FEATURE_SET_KEY, ORIGINAL_VIEW, feature_schema
from features.store import FeatureStore
from pipelines.encoders import EncoderConfig, encoder_class, get_encoder
from pipelines.encoders.base import Encoder, device_for_actor
from pipelines.errors import SpecError

KEY_COLUMNS = [f.name for f in FEATURE_KEY_FIELDS]
MEDIA_COLUMNS = ["text", "image", "audio"]
_INPUT = re.compile(r"^__in(\d+)__(.+)__shape_([0-9x]*)$")


class FeatureSetSpec(BaseModel):
    """One feature set: the encoders whose outputs share a table, and what they encode."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    encoders: list[EncoderConfig] = Field(min_length=1)
    views: bool = True  # also encode the augmented views (view >= 0) of train samples

    @field_validator("encoders")
    @classmethod
    def _known_and_storable(cls, encoders: list[EncoderConfig]) -> list[EncoderConfig]:
        for config in encoders:
            encoder_class(config.name).Params.model_validate(config.params)
            if config.dtype == "float16":
                raise ValueError(
                    f"encoder {config.name!r}: dtype float16 cannot be stored (Delta Lake has "
                    "no half-precision type); use float32"
                )
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


def feature_set_metadata(encoders: list[Encoder], **lineage: Any) -> dict[str, Any]:
    """The ``FEATURE_SET_KEY`` property: encoders, column shapes, where the rows came from."""
    described = [e.describe() for e in encoders]
    return {
        # the full config too, so a query can be embedded by the same encoder later
        "encoders": [
            {**d["encoder"], "config": e.config.model_dump(mode="json")}
            for d, e in zip(described, encoders, strict=True)
        ],
        "columns": {k: v for d in described for k, v in d["columns"].items()},
        **lineage,
    }


def table_schema(encoders: list[Encoder]) -> pa.Schema:
    columns = {n: t for e in encoders for n, (t, _) in e.output_columns().items()}
    return feature_schema(columns)


def check_compatible(name: str, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to mix features of another encoder config into an existing feature set."""
    have = {e["name"]: e["config_hash"] for e in stored.get("encoders", [])}
    want = {e["name"]: e["config_hash"] for e in wanted["encoders"]}
    if have != want:
        raise SpecError(
            f"feature set {name!r} was built with encoders {have}, the spec now says {want}: "
            "features of different encoders never share a table. Use a new feature set name, "
            "or `mmfp encode SPEC --feature-set NAME --reencode` to replace it as a new version"
        )


def missing_rows(batch: pa.Table, *, existing: frozenset[tuple[str, int]]) -> pa.Table:
    """The rows whose (sample_id, view) the feature set does not have yet."""
    if not existing:
        return batch
    keys = zip(batch.column("sample_id").to_pylist(), batch.column("view").to_pylist(), strict=True)
    return batch.filter(pa.array([k not in existing for k in keys], pa.bool_()))


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


def _fixed(array: np.ndarray) -> pa.Array:
    flat = np.ascontiguousarray(array).reshape(len(array), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])


class Preprocess:
    """CPU stage: each encoder's ``preprocess``; inputs leave as fixed-size list columns."""

    def __init__(self, configs: list[EncoderConfig]) -> None:
        self.configs = configs
        self._encoders: list[Encoder] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"configs": self.configs, "_encoders": None}

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self._encoders is None:
            self._encoders = [get_encoder(c) for c in self.configs]
        out = batch.select(KEY_COLUMNS)
        for i, encoder in enumerate(self._encoders):
            for key, array in encoder.preprocess(batch).items():
                shape = "x".join(str(d) for d in np.shape(array)[1:])
                out = out.append_column(f"__in{i}__{key}__shape_{shape}", _fixed(array))
        return out


def _inputs(batch: pa.Table, index: int) -> dict[str, np.ndarray]:
    inputs = {}
    for name in batch.column_names:
        match = _INPUT.match(name)
        if match and int(match.group(1)) == index:
            shape = [int(d) for d in match.group(3).split("x") if d]
            column = batch.column(name).combine_chunks()
            values = column.values.to_numpy(zero_copy_only=False)
            inputs[match.group(2)] = values.reshape(len(column), *shape)
    return inputs


class Encode:
    """Model stage: loads every model of the set once (per actor, on first use), returns
    feature rows. Ray runs it as an actor class for models, as a task function otherwise."""

    def __init__(self, configs: list[EncoderConfig]) -> None:
        self.configs = configs
        self._encoders: list[Encoder] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"configs": self.configs, "_encoders": None}

    @property
    def encoders(self) -> list[Encoder]:
        if self._encoders is None:
            device = device_for_actor()
            self._encoders = [get_encoder(c) for c in self.configs]
            for encoder in self._encoders:
                encoder.load(device)
        return self._encoders

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = batch.select(KEY_COLUMNS)
        for i, encoder in enumerate(self.encoders):
            features = encoder.to_arrow(encoder.encode(_inputs(batch, i)))
            for name in features.column_names:
                out = out.append_column(name, features.column(name))
        return out


def wants_actors(encoders: list[Encoder]) -> bool:
    return any(e.needs_model for e in encoders)


def metadata_json(metadata: dict[str, Any]) -> dict[str, str]:
    return {FEATURE_SET_KEY: json.dumps(metadata, sort_keys=True)}


def embed_query(
    store: FeatureStore,
    feature_set: str,
    *,
    text: str | None = None,
    image_bytes: bytes | None = None,
    audio_bytes: bytes | None = None,
) -> np.ndarray:
    """Embed a search query with the feature set's own encoder (the one recorded in it).

    A text query against a joint feature set (CLIP, CLAP) lands in the same space as
    its image / audio embeddings, so text finds images. Refuses when the encoder's
    model or config changed since the feature set was built.
    """
    given = {"text": text, "image": image_bytes, "audio": audio_bytes}
    modality, value = next(((m, v) for m, v in given.items() if v is not None), (None, None))
    if modality is None:
        raise StoreError("embed_query needs text=, image_bytes= or audio_bytes=")
    name = f"features/{feature_set}"
    metadata = json.loads(store.properties(name).get(FEATURE_SET_KEY, "{}"))
    for entry in metadata.get("encoders", []):
        if "config" not in entry:
            continue
        encoder = get_encoder(EncoderConfig.model_validate(entry["config"]))
        if f"{modality}_emb" not in encoder.output_columns():
            continue
        if encoder.config_hash() != entry["config_hash"]:
            raise StoreError(
                f"{name}: encoder {entry['name']!r} changed since the feature set was built "
                "(its model or config hash differs); re-encode before searching with it"
            )
        encoder.load(device_for_actor())
        column = pa.array([value], pa.string() if modality == "text" else pa.binary())
        outputs = encoder.encode(encoder.preprocess(pa.table({modality: column})))
        return np.asarray(outputs[f"{modality}_emb"][0], np.float32)
    encoders = [e["name"] for e in metadata.get("encoders", [])]
    if any("config" not in e for e in metadata.get("encoders", [])):
        raise StoreError(
            f"{name} does not record its encoders' configs (made by an older mmfp): "
            f"re-encode it with --reencode to search it by {modality}"
        )
    raise StoreError(f"{name}: none of its encoders {encoders} embeds {modality} queries")
