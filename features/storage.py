"""Local paths and object-storage URIs behind one pyarrow filesystem interface.

Storage options use deltalake's keys (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
...), so one dict configures both the Delta log (deltalake) and the data files
and media (pyarrow) for the same bucket.
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs

# Storage-option keys whose values may be shown (without credentials inside URLs); every
# other value is treated as a secret, whatever its name (Azure keys, GCS service accounts,
# SAS tokens, a provider's next option).
PUBLIC_KEYS = frozenset(
    {
        "AWS_REGION", "AWS_DEFAULT_REGION", "REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT",
        "ENDPOINT_URL", "ENDPOINT", "AWS_ALLOW_HTTP", "ALLOW_HTTP", "AWS_S3_ALLOW_UNSAFE_RENAME",
        "AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "AWS_CONDITIONAL_PUT", "AWS_S3_LOCKING_PROVIDER",
        "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_USE_EMULATOR", "GOOGLE_BUCKET",
    }
)  # fmt: skip


def scheme_of(uri: str) -> str:
    """The URI scheme, or ``"file"`` for a plain path (Windows drive letters too)."""
    parsed = urlparse(uri)
    return parsed.scheme if len(parsed.scheme) > 1 else "file"


def is_local(uri: str) -> bool:
    return scheme_of(uri) == "file"


def normalize_uri(uri: str, *, base_dir: str | None = None) -> str:
    """An absolute local path (relative ones resolve under ``base_dir``) or the URI as given."""
    if not is_local(uri):
        return uri.rstrip("/")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = os.path.join(base_dir or os.getcwd(), path)
    return os.path.normpath(path)


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a URI with forward slashes."""
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base.rstrip("/"), *parts)


def filesystem_for(
    uri: str, storage_options: dict[str, str] | None = None
) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    options = {k.upper(): v for k, v in (storage_options or {}).items()}
    scheme = scheme_of(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), normalize_uri(uri)
    if scheme in ("s3", "s3a"):
        parsed = urlparse(uri)
        endpoint = options.get("AWS_ENDPOINT_URL") or options.get("AWS_ENDPOINT")
        kwargs: dict[str, object] = {}
        if endpoint:
            ep = urlparse(endpoint)
            kwargs["endpoint_override"] = ep.netloc or endpoint
            kwargs["scheme"] = ep.scheme or "https"
        if options.get("AWS_ACCESS_KEY_ID"):
            kwargs["access_key"] = options["AWS_ACCESS_KEY_ID"]
            kwargs["secret_key"] = options.get("AWS_SECRET_ACCESS_KEY", "")
            if options.get("AWS_SESSION_TOKEN"):
                kwargs["session_token"] = options["AWS_SESSION_TOKEN"]
        if options.get("AWS_REGION"):
            kwargs["region"] = options["AWS_REGION"]
        path = parsed.netloc + parsed.path
        return pafs.S3FileSystem(**kwargs), path.rstrip("/")
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def redact(options: dict[str, str] | None) -> dict[str, str]:
    """Storage options safe to print or record: only known public keys keep their values
    (URLs without any ``user:password@``), every other value is ``***``."""
    return {
        k: (_without_userinfo(str(v)) if k.upper() in PUBLIC_KEYS else "***")
        for k, v in (options or {}).items()
    }


def _without_userinfo(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme and "@" in parsed.netloc:
        return parsed._replace(netloc="***@" + parsed.netloc.rsplit("@", 1)[1]).geturl()
    return value
