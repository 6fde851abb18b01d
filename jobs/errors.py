"""What every mmfp command shares: how failures reach the terminal.

A user mistake (``MmfpError``: spec, store, input, cluster) prints one line and exits 2.
Anything else (an S3 ``OSError``, a ``DeltaError``, a Ray task error, a corrupt log)
prints one line naming what failed and exits 1; ``--debug`` or ``MMFP_DEBUG=1`` shows
the traceback instead. Printed text never carries terminal control codes from the data,
nor the value of a secret environment variable.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from features.errors import MmfpError, StoreError
from features.store import FeatureStore
from jobs.options import env_flag

F = TypeVar("F", bound=Callable[..., Any])
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SECRET_NAMES = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "ACCESS_KEY", "SAS", "PRIVATE")


def clean(text: object) -> str:
    """``text`` safe to print: control characters (ANSI escapes, NUL, bell) shown escaped."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def scrub(text: str) -> str:
    """``text`` with the value of every secret-looking environment variable replaced."""
    for name, value in os.environ.items():
        if len(value) >= 8 and any(s in name.upper() for s in _SECRET_NAMES) and value in text:
            text = text.replace(value, "***")
    return text


def one_line(error: BaseException) -> str:
    """What failed, in one line: the exception's type and the line of its message that
    says the most (a remote traceback's last line, else the first)."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    line = lines[-1] if "Traceback" in str(error) else lines[0]
    return f"{type(error).__name__}: {line[:400]}"


def debugging() -> bool:
    return env_flag("MMFP_DEBUG")


def user_errors(fn: F) -> F:
    """Run a command: user mistakes exit 2, other failures exit 1, each with one clean line."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MmfpError as e:
            typer.secho(f"error: {scrub(clean(e))}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from e
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:
            if debugging() or _is_cli_control(e):
                raise
            message = scrub(clean(one_line(e)))
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            runtime = sys.modules.get("jobs.runtime")  # never imported here: it imports Ray
            log = runtime.current_log() if runtime else None
            if log is not None:
                typer.echo(f"(Ray's log lines of this run: {log})", err=True)
            typer.echo("(run with --debug or MMFP_DEBUG=1 to see the traceback)", err=True)
            raise typer.Exit(1) from e

    return wrapper  # type: ignore[return-value]


def _is_cli_control(error: Exception) -> bool:
    """typer's own Exit / Abort / usage errors (its vendored click): they pass through."""
    return type(error).__module__.split(".")[0] in ("typer", "click")


def open_store(uri: str) -> FeatureStore:
    """The store at ``uri``; a path with no tables is a user error, not an empty store."""
    store = FeatureStore(uri)
    if not store.tables():
        raise StoreError(f"no feature store at {store.uri} (run `mmfp build SPEC` or `mmfp demo`)")
    return store
