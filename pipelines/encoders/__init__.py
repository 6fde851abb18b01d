"""Encoder registry: built-in featurizers and Hugging Face encoders behind one small API.

``get_encoder(EncoderConfig(...))`` -> an ``Encoder`` with ``output_columns()``,
``preprocess(batch)`` (CPU), ``load(device)`` + ``encode(inputs)`` (model) and
``to_arrow(outputs)``; see ``base.py`` for the contract.
"""

from __future__ import annotations

from pipelines.encoders.base import Encoder, EncoderConfig, EncoderParams, device_for_actor
from pipelines.encoders.registry import ENCODERS, encoder_class, get_encoder, is_builtin

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderConfig",
    "EncoderParams",
    "device_for_actor",
    "encoder_class",
    "get_encoder",
    "is_builtin",
]
