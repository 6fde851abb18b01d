"""The error family every mmfp library raises on purpose.

``MmfpError`` is the base the CLI catches (one line, exit code 2); the store's
own ``StoreError`` is one of them. ``pipelines.errors`` adds the spec and
per-input families on top.
"""

from __future__ import annotations


class MmfpError(Exception):
    """Base of every error mmfp raises on purpose."""


class StoreError(MmfpError):
    """A store, table, version or column that does not exist or does not fit."""
