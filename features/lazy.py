"""Package facades that import their public names on first use (PEP 562).

``from features import FeatureStore`` keeps working, while a Ray worker that
imports one stage module (``pipelines.collect``) no longer imports every module
a facade names (Ray Data plans, DuckDB SQL, search).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, public: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__``: ``public`` maps each name to the module that defines it."""

    def __getattr__(name: str) -> Any:
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(public[name]), name)

    return __getattr__
