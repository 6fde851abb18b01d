"""The command-line options every ``mmfp`` command shares, defined once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from features.errors import MmfpError

StoreOpt = Annotated[
    str,
    typer.Option("--store", envvar="MMFP_STORE", help="Store path or URI (s3://bucket/prefix)."),
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray cluster address; default: $RAY_ADDRESS, else a local Ray on this machine.",
    ),
]
JobApiAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray Job API address, e.g. http://HEAD:8265; default: $RAY_ADDRESS. "
        "Token: $RAY_AUTH_TOKEN or the file at $RAY_AUTH_TOKEN_PATH.",
    ),
]
SpecArg = Annotated[Path, typer.Argument(help="Pipeline spec (YAML).")]
TableArg = Annotated[str, typer.Argument(help="Table name, e.g. samples or features/clip.")]
VersionOpt = Annotated[
    str | None, typer.Option(help="Version number or ISO 8601 time; default: latest.")
]
DEFAULT_STORE = "mmfp-store"


def env_flag(name: str) -> bool:
    """An on/off environment variable (``MMFP_DEBUG``, ``MMFP_VERBOSE``): unset, "", "0"
    and "false" are off."""
    return os.environ.get(name, "") not in ("", "0", "false")


def key_values(pairs: list[str] | None, option: str) -> dict[str, str]:
    """Repeated ``--option KEY=VALUE`` values as a dict; a malformed one names the option."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MmfpError(f"{option} expects KEY=VALUE, got {pair!r}")
        out[key] = value
    return out
