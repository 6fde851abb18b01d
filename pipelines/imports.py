"""User functions named in a spec as ``package.module:function``.

Imported on the worker that calls them (the spec is read on the driver, the
function runs in Ray tasks), once per worker; a bad path is the user's mistake
and a ``SpecError`` naming it, never a traceback.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from pipelines.errors import SpecError

FUNCTION_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def check_function_path(path: str) -> str:
    """``path`` when it looks like ``package.module:function`` (a pydantic validator's body)."""
    if not FUNCTION_PATH.match(path):
        raise ValueError(f"function path {path!r} must look like 'package.module:function'")
    return path


def import_function(path: str, what: str) -> Callable[..., Any]:
    """The callable ``path`` names; ``what`` says which spec entry named it."""
    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise SpecError(
            f"{what} {path!r} cannot be imported: {e} "
            "(HINT: the module must be importable on every Ray worker)"
        ) from e
    if not callable(obj):
        raise SpecError(f"{what} {path!r} is not callable")
    return obj
