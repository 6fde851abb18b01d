"""Errors of the feature store: what the CLI turns into one line and exit code 2."""

from __future__ import annotations


class StoreError(Exception):
    """A store, table, version or column that does not exist or does not fit."""
