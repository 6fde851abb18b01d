"""What every mmfp command shares: user mistakes become one line and exit code 2."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from features.errors import MmfpError, StoreError
from features.store import FeatureStore

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn mmfp's own errors (``MmfpError``: spec, store, input, cluster) into one
    readable line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MmfpError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from e

    return wrapper  # type: ignore[return-value]


def open_store(uri: str) -> FeatureStore:
    """The store at ``uri``; a path with no tables is a user error, not an empty store."""
    store = FeatureStore(uri)
    if not store.tables():
        raise StoreError(f"no feature store at {store.uri} (run `mmfp build SPEC` or `mmfp demo`)")
    return store
