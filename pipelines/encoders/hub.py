"""Loading Hugging Face configs, tokenizers, processors and weights by path or hub id.

Configs are read when an encoder is constructed (small JSON, no weights), so a
wrong model path is a ``SpecError`` before any Ray work starts and output
dimensions are known up front. Weights load only from safetensors or with
``weights_only=True``; nothing here enables remote code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from pipelines.errors import SpecError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)


def read_config(model: str, revision: str | None = None) -> PretrainedConfig:
    """The model's config (config.json only); a ``SpecError`` naming the model if unreadable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError, KeyError) as e:
        raise SpecError(
            f"encoder model {model!r}: cannot read its Hugging Face config ({e}). HINT: give a "
            "local directory with config.json, or a hub id already in the local cache"
        ) from e


def _load(what: str, model: str, factory: Callable[[], Any]) -> Any:
    try:
        return factory()
    except (OSError, ValueError) as e:
        raise SpecError(f"encoder model {model!r}: cannot load its {what} ({e})") from e


def load_tokenizer(model: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    return _load(
        "tokenizer", model, lambda: AutoTokenizer.from_pretrained(model, revision=revision)
    )


def load_image_processor(model: str, revision: str | None = None) -> Any:
    from transformers import AutoImageProcessor

    return _load(
        "image processor",
        model,
        lambda: AutoImageProcessor.from_pretrained(model, revision=revision),
    )


def load_feature_extractor(model: str, revision: str | None = None) -> Any:
    from transformers import AutoFeatureExtractor

    return _load(
        "feature extractor",
        model,
        lambda: AutoFeatureExtractor.from_pretrained(model, revision=revision),
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    # from_pretrained prints a table of every unexpected key (e.g. the text tower when
    # only the vision tower is wanted); we check the loading info ourselves instead.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_model(
    model_class: Any, model: str, device: str, *, revision: str | None = None, **kwargs: Any
) -> tuple[torch.nn.Module, set[str]]:
    """Weights in float32 on ``device``, eval mode; returns (model, missing weight names).

    Missing weights are freshly initialised at random, so callers must not use
    them (e.g. a pooler that the checkpoint lacks) if outputs are to be stable.
    """
    import torch

    with _quiet_transformers():
        loaded, info = _load(
            "weights",
            model,
            lambda: model_class.from_pretrained(
                model,
                revision=revision,
                dtype=torch.float32,
                weights_only=True,
                output_loading_info=True,
                **kwargs,
            ),
        )
    missing = set(info.get("missing_keys", ()))
    if missing:
        log.warning("encoder model %r: %d weights not in the checkpoint", model, len(missing))
    return loaded.to(device).eval(), missing


def is_multi_tower(config: PretrainedConfig) -> bool:
    """Joint models (CLIP, CLAP, SigLIP, ...) carry one sub-config per tower."""
    return any(hasattr(config, f"{m}_config") for m in ("text", "vision", "audio"))


def hidden_dim(config: PretrainedConfig) -> int:
    """Width of a single tower's hidden states, from its config."""
    for attr in ("hidden_size", "d_model"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    raise SpecError(
        f"cannot tell the output width of a {type(config).__name__} "
        "(no hidden_size, d_model or hidden_sizes in its config)"
    )


def text_length(config: PretrainedConfig, requested: int) -> int:
    """``requested`` capped by the positions the text model has (RoBERTa offsets by pad+1)."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return requested
    if "roberta" in config.model_type or config.model_type == "clap_text_model":
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return max(1, min(requested, positions))
