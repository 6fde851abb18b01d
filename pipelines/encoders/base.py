"""The encoder plug-in contract: a typed config and a small base class.

An encoder turns a batch of samples (a pyarrow table with ``text`` / ``image`` /
``audio`` columns) into feature columns in two steps, because they run in
different places: ``preprocess`` (CPU, plain Ray tasks: decode, resize,
tokenize) and ``encode`` (the model forward, once-per-actor ``load`` first).
Instances hold only their config between calls, so Ray ships them cheaply;
tokenizers and models are created lazily where they are used.

Missing modalities: ``preprocess`` returns a boolean ``<modality>_mask``
(True = the row has that modality) and fills masked rows with placeholders;
``encode`` passes the masks through and returns zeros for masked rows, and
``to_arrow`` turns those rows into nulls.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from features.metadata import ColumnMeta, EncoderMeta
from features.schema import list_of
from pipelines.encoders.fingerprint import model_identity
from pipelines.errors import SpecError

MODALITIES = ("text", "image", "audio")
T = TypeVar("T")


class EncoderConfig(BaseModel):
    """One entry of a spec's ``encoders`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # a registry name (ENCODERS) or a dotted path "pkg.module:Class"
    model: str | None = None  # local model directory or hub id; None for weight-free featurizers
    params: dict[str, Any] = Field(default_factory=dict)  # encoder-specific, validated by it
    batch_size: int = Field(32, gt=0)  # rows per forward pass (and per Ray batch)
    # storage dtype of embedding columns; Delta Lake has no half-precision type, so float32 only
    dtype: Literal["float32"] = "float32"
    normalize: bool = True  # L2-normalise embeddings, so a dot product is a cosine
    num_gpus: float = Field(1.0, ge=0)  # per actor, used only when the cluster has GPUs
    concurrency: int = Field(1, gt=0)  # actor pool size for model encoders


class EncoderParams(BaseModel):
    """Base of each encoder's ``params`` model: unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def device_for_actor() -> str:
    """``"cuda"`` when this process has a CUDA device and Ray assigned it a GPU, else ``"cpu"``.

    Asking Ray (not only torch) keeps a CPU actor on a GPU node off the GPU that
    another actor was given.
    """
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    import ray

    if not ray.is_initialized():
        return "cpu"
    return "cuda" if ray.get_gpu_ids() else "cpu"


class Encoder:
    """Base class of every encoder; subclasses set the class attributes and 3-4 methods.

    Subclasses implement ``output_columns``, ``preprocess`` and ``encode``, and
    ``load`` when they hold a model. Output arrays have shape ``(rows, *shape)``
    per ``output_columns``; masks are passed through as ``<modality>_mask``.
    """

    modality: ClassVar[str | tuple[str, ...]]  # "text" | "image" | "audio", a tuple if joint
    needs_model: ClassVar[bool] = True  # False: preprocess is the whole job, no actor/GPU
    version: ClassVar[str] = "1"  # bump when the computation changes: old features go stale
    Params: ClassVar[type[EncoderParams]] = EncoderParams
    # params added after stores were written with this version: left out of the hash
    # while they hold their default, so adding an option does not make old features stale
    added_params: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        try:
            self.params = self.Params.model_validate(config.params)
        except ValidationError as e:
            valid = ", ".join(self.Params.model_fields) or "(none)"
            raise SpecError(
                f"encoder {config.name!r}: invalid params {config.params!r}: "
                f"{_first_error(e)}. Valid params: {valid}"
            ) from e
        self.device: str | None = None
        self._lazy: dict[str, Any] = {}  # tokenizers, processors, models: never pickled

    # -- capabilities -----------------------------------------------------------------------

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.modality,) if isinstance(self.modality, str) else tuple(self.modality)

    def output_columns(self) -> dict[str, tuple[pa.DataType, tuple[int, ...]]]:
        """Column name -> (Arrow type, per-row shape); names are ``<modality>_<what>``."""
        raise NotImplementedError

    def imports_recorded_code(self) -> bool:
        """True when this encoder imports classes that files it reads name (not the spec):
        a reader of a store it encoded must trust those files first."""
        return False

    def config_hash(self) -> str:
        """Identity of the computation: config + class version + model identity.

        Resources (batch_size, num_gpus, concurrency) are left out on purpose: they
        change how fast features are made, not what they are.
        """
        params = self.params.model_dump(mode="json")
        for name in self.added_params:
            if params[name] == self.Params.model_fields[name].default:
                del params[name]
        payload = {
            "name": self.config.name,
            "version": self.version,
            "params": params,
            "dtype": self.config.dtype,
            "normalize": self.config.normalize,
            "model": model_identity(self.config.model, getattr(self.params, "revision", None)),
        }
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()

    def describe(self) -> tuple[EncoderMeta, dict[str, ColumnMeta]]:
        """This encoder's entry and columns in a feature set's description
        (``features.metadata.FeatureSetMeta``), so readers can refuse a mismatch."""
        columns = {
            name: ColumnMeta(
                shape=list(shape),
                dtype=np.dtype(arrow_type.value_type.to_pandas_dtype()).name,
                encoder=self.config.name,
                kind="embedding" if name.endswith("_emb") else "input",
                normalized=name.endswith("_emb") and self.config.normalize,
            )
            for name, (arrow_type, shape) in self.output_columns().items()
        }
        encoder = EncoderMeta(
            name=self.config.name,
            version=self.version,
            config_hash=self.config_hash(),
            model=self.config.model,
            # the full config too, so a query can be embedded by the same encoder later
            config=self.config.model_dump(mode="json"),
        )
        return encoder, columns

    # -- the work ---------------------------------------------------------------------------

    def preprocess(self, batch: pa.Table) -> dict[str, np.ndarray]:
        """CPU side: decode and prepare model inputs, plus ``<modality>_mask`` arrays."""
        raise NotImplementedError

    def load(self, device: str) -> None:
        """Create the model on ``device``; called once per actor. Featurizers need nothing."""
        self.device = device

    def encode(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Model side: the output columns (float32 for embeddings) plus the masks."""
        raise NotImplementedError

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed free text in this encoder's text space (zero-shot labels, text search)."""
        if "text_emb" not in self.output_columns():
            raise TypeError(f"encoder {self.config.name!r} does not embed text")
        outputs = self.encode(self.preprocess(pa.table({"text": pa.array(texts, pa.string())})))
        return outputs["text_emb"]

    def to_arrow(self, outputs: dict[str, np.ndarray]) -> pa.Table:
        """The output columns as Arrow lists (flattened rows, storage dtype), masked rows null."""
        columns: dict[str, pa.Array] = {}
        for name, (arrow_type, shape) in self.output_columns().items():
            values = np.asarray(outputs[name])
            rows, width = len(values), int(np.prod(shape))
            flat = values.reshape(rows, width).astype(arrow_type.value_type.to_pandas_dtype())
            offsets = pa.array(np.arange(rows + 1, dtype=np.int64) * width, pa.int32())
            mask = outputs.get(f"{name.split('_', 1)[0]}_mask")
            nulls = None if mask is None else pa.array(~np.asarray(mask, dtype=bool))
            columns[name] = pa.ListArray.from_arrays(
                offsets, pa.array(flat.ravel()), type=arrow_type, mask=nulls
            )
        return pa.table(columns)

    # -- helpers for subclasses -------------------------------------------------------------

    def embedding_type(self) -> pa.DataType:
        return list_of(pa.float32())

    def cached(self, key: str, factory: Callable[[], T]) -> T:
        """Create a heavy object once per process; it is dropped when the encoder is pickled."""
        if key not in self._lazy:
            self._lazy[key] = factory()
        return self._lazy[key]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lazy"], state["device"] = {}, None  # a copy loads again where it lands
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.config.name!r}, model={self.config.model!r})"


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "params"
    return f"{where}: {first['msg']}"
