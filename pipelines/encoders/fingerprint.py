"""Model identity for ``Encoder.config_hash``: what makes two runs' features comparable.

A local model directory is identified by the content of its files (config,
tokenizer, preprocessor and weights): a checkpoint fine-tuned and saved to the
same directory is a new model even when its config and tensor shapes are
unchanged. Hashing reads every byte once per process (about 1 s per GB); the
result is cached on (path, size, mtime) of each file. A hub id cannot be read
without the network, so it is identified by its id and revision: pin a commit
hash as ``params.revision`` to make that identity exact.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# Files that describe the model for people, not for the computation.
_IGNORED_PREFIXES = ("readme", "license", "notice")
_IGNORED_SUFFIXES = (".md",)
_CHUNK = 1 << 20
_cache: dict[tuple[tuple[str, int, int], ...], str] = {}


def model_identity(model: str | None, revision: str | None = None) -> str | None:
    """``dir:<digest>`` for a local directory, ``hub:<id>@<revision>`` otherwise."""
    if model is None:
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        return "dir:" + directory_digest(path)
    return f"hub:{model}@{revision or 'main'}"


def _counted(path: Path) -> bool:
    name = path.name.lower()
    return not (
        name.startswith(".")
        or name.startswith(_IGNORED_PREFIXES)
        or name.endswith(_IGNORED_SUFFIXES)
        or any(part.startswith(".") for part in path.parts)
    )


def directory_digest(root: Path) -> str:
    """BLAKE2b over the relative names and bytes of the model files under ``root``."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and _counted(p.relative_to(root)))
    stats = tuple(
        (p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files
    )
    key = (str(root.resolve()), 0, 0), *stats
    if key in _cache:
        return _cache[key]
    digest = hashlib.blake2b(digest_size=16)
    for path, (name, size, _) in zip(files, stats, strict=True):
        digest.update(f"{name}\0{size}\0".encode())
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    _cache[key] = digest.hexdigest()
    return _cache[key]
