"""Table properties mmfp writes and reads: a feature set's description, a label vocabulary.

``FeatureSetMeta`` is the one typed owner of the ``mmfp.feature_set`` property
of every ``features/<name>`` table: which encoders made it (name, version,
config hash, the full config so a query can be embedded the same way later),
the shape, dtype and kind of each column (Delta has no fixed-size list, so the
shape lives here and is checked on read), and the ``samples`` / ``views``
versions the rows came from. The encode stage writes it; search, training and
re-encoding read it, and refuse a mismatch instead of guessing.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import numpy as np
from deltalake import DeltaTable
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from features.errors import StoreError
from features.schema import FEATURES_PREFIX
from features.storage import filesystem_for
from features.tables import TableStore

LABEL_VOCABULARY_KEY = "mmfp.label_vocabulary"  # samples: the spec's closed label set (JSON)
SPLIT_SETTINGS_KEY = "mmfp.split"  # samples: the split settings its rows were split with (JSON)


class ColumnMeta(BaseModel):
    """One stored encoder output: its per-row shape, dtype, encoder and kind."""

    model_config = ConfigDict(frozen=True)

    shape: list[int]
    dtype: str = "float32"
    encoder: str | None = None
    kind: Literal["embedding", "input"] = "embedding"  # input: pixels, log-mel, token ids
    normalized: bool = False  # L2-normalised rows: a dot product is a cosine
    pad_id: int | None = None  # token ids: the id a model masks out
    vocab_size: int | None = None  # token ids: every id is below this

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))


class EncoderMeta(BaseModel):
    """One encoder of a feature set: what identifies its computation."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str = "1"
    config_hash: str | None = None
    model: str | None = None
    config: dict[str, Any] | None = None  # the spec's encoder entry (absent in old stores)


class FeatureSetMeta(BaseModel):
    """The description of one feature-set version, as stored in its table properties."""

    model_config = ConfigDict(frozen=True)

    KEY: ClassVar[str] = "mmfp.feature_set"

    encoders: list[EncoderMeta] = Field(default_factory=list)
    columns: dict[str, ColumnMeta] = Field(default_factory=dict)
    samples_version: int | None = None  # the samples version the rows were encoded from
    views_version: int | None = None

    def to_properties(self) -> dict[str, str]:
        return {
            self.KEY: json.dumps(self.model_dump(mode="json", exclude_none=True), sort_keys=True)
        }

    @classmethod
    def from_properties(cls, properties: dict[str, str], *, table: str) -> FeatureSetMeta:
        raw = properties.get(cls.KEY)
        if not raw:
            raise StoreError(
                f"table {table!r} has no {cls.KEY!r} property: it was not written by the "
                "encode stage, so its column shapes and encoders are unknown"
            )
        try:
            return cls.model_validate_json(raw)
        except ValidationError as e:
            raise StoreError(f"table {table!r}: unreadable {cls.KEY!r} property: {e}") from e

    @classmethod
    def of(cls, store: TableStore, dt: DeltaTable, *, table: str) -> FeatureSetMeta:
        """The description of the rows of the version ``dt`` is loaded at.

        A data commit carries the description its rows were made with (in its
        commit info, atomically with the rows); the table property is set right
        after, for other tools. So the log is read back from the version to the
        newest commit that carries a description or that set the table's
        metadata: a run killed between the two never leaves rows described by
        another encoder.
        """
        fs, root = filesystem_for(store.table_uri(table), store.storage_options)
        for version in range(dt.version(), -1, -1):
            try:
                with fs.open_input_stream(f"{root}/_delta_log/{version:020d}.json") as f:
                    actions = [json.loads(line) for line in f.read().splitlines() if line.strip()]
            except FileNotFoundError:
                break  # older commits were checkpointed and cleaned up: the property holds
            info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
            if cls.KEY in info:
                return cls.from_properties({cls.KEY: info[cls.KEY]}, table=table)
            if any("metaData" in a for a in actions):
                break
        return cls.from_properties(dt.metadata().configuration, table=table)

    def embeddings(self) -> dict[str, ColumnMeta]:
        """The embedding columns (what search and projection towers read)."""
        return {name: c for name, c in self.columns.items() if c.kind == "embedding"}

    def encoder_of(self, column: str) -> EncoderMeta | None:
        name = self.columns[column].encoder
        return next((e for e in self.encoders if e.name == name), None)

    def encoder_hashes(self) -> dict[str, str | None]:
        return {e.name: e.config_hash for e in self.encoders}


def feature_table(name: str) -> str:
    """``clip`` or ``features/clip`` -> ``features/clip``."""
    return FEATURES_PREFIX + name.removeprefix(FEATURES_PREFIX)


def vocabulary_properties(vocabulary: list[str] | None) -> dict[str, str]:
    """Table properties of ``samples`` for a closed label vocabulary (none when open)."""
    return {} if vocabulary is None else {LABEL_VOCABULARY_KEY: json.dumps(vocabulary)}


def label_vocabulary(properties: dict[str, str]) -> list[str] | None:
    raw = properties.get(LABEL_VOCABULARY_KEY)
    return None if not raw else list(json.loads(raw))
