"""Collect: listed references -> one row per input, decoded, validated, with its content id.

Reading, decoding and hashing run in Ray tasks over batches of references
(``pipelines.listing.REFS``) or whole tar shards. Every input ends as exactly
one row of ``COLLECTED``: a sample, or an error row (``pipelines.quarantine``)
that becomes a quarantine row. Nothing is dropped here.
"""

from __future__ import annotations

import functools
import json
import os
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from features.schema import SAMPLES
from features.storage import filesystem_for, is_local
from pipelines import errors
from pipelines.decode import decode_audio, decode_image, decode_text, modality_of
from pipelines.identity import sample_id
from pipelines.listing import is_hidden
from pipelines.quarantine import ERROR_COLUMNS, ERROR_FIELDS, error_columns, row_or_error
from pipelines.spec import DecodeLimits, WebDatasetSource

MODALITIES = ("text", "image", "audio")

COLLECTED = pa.schema(
    [
        *SAMPLES,
        *ERROR_FIELDS,
        # what a refresh compares: the unit it lists (a sample's files, or a whole shard) ...
        pa.field("input_container", pa.string()),
        pa.field("input_fingerprint", pa.string()),
        # ... and what the ledger last said of this input (null: never seen)
        pa.field("input_prev_fingerprint", pa.string()),
        pa.field("input_prev_outcome", pa.string()),
    ]
)
INPUT_COLUMNS = [f.name for f in COLLECTED if f.name.startswith("input_")]


def make_sample(
    source: str,
    key: str,
    parts: dict[str, tuple[bytes | str, str]],
    limits: DecodeLimits,
    **extra: Any,
) -> dict[str, Any]:
    """Decode every part of one input and return its sample row; raise ``InputError``."""
    row: dict[str, Any] = {"source": source, "source_uri": key, **extra}
    text = pixels = audio = None
    if "text" in parts:
        text = decode_text(parts["text"][0], max_chars=limits.max_text_chars)
        row["text"] = text
    if "image" in parts:
        data, _ = parts["image"]
        image = decode_image(data, max_pixels=limits.max_image_pixels)
        pixels = image.pixels
        row.update(
            image=data,
            image_format=image.format,
            image_width=image.width,
            image_height=image.height,
            image_channels=image.channels,
        )
    if "audio" in parts:
        data, ext = parts["audio"]
        decoded = decode_audio(data, max_seconds=limits.max_audio_seconds, ext=ext)
        audio = decoded
        row.update(
            audio=data,
            audio_format=decoded.format,
            audio_sample_rate=decoded.sample_rate,
            audio_channels=decoded.channels,
            audio_duration=decoded.duration,
        )
    row["modalities"] = [m for m in MODALITIES if m in parts]
    row["sample_id"] = sample_id(
        text=text,
        pixels=pixels,
        audio=None if audio is None else audio.samples,
        sample_rate=None if audio is None else audio.sample_rate,
    )
    if row.get("label"):
        row["labels"] = [row["label"]]
    return row


@functools.lru_cache(maxsize=64)
def _realpath(root: str) -> str:
    return os.path.realpath(root)


class RefReader:
    """Reads the parts of each reference through its source's filesystem.

    Holds only config (storage options per source); filesystems are made lazily
    on the worker and reused across batches.
    """

    def __init__(
        self, sources: dict[str, tuple[str, dict[str, str]]], limits: DecodeLimits
    ) -> None:
        self.sources = sources  # source name -> (uri, storage options)
        self.limits = limits
        self._fs: dict[str, pafs.FileSystem] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [
            self.collect_one(ref)
            | {
                "input_fingerprint": ref["fingerprint"],
                "input_prev_fingerprint": ref.get("prev_fingerprint"),
                "input_prev_outcome": ref.get("prev_outcome"),
            }
            for ref in batch.to_pylist()
        ]
        return pa.Table.from_pylist(rows, schema=COLLECTED)

    def _filesystem(self, source: str, root: str) -> pafs.FileSystem:
        if source not in self._fs:
            uri, options = self.sources.get(source, (root, {}))
            self._fs[source] = filesystem_for(uri, options)[0]
        return self._fs[source]

    def collect_one(self, ref: dict[str, Any]) -> dict[str, Any]:
        """The sample row of one reference, or its error row."""
        base = {"source": ref["source"], "source_uri": ref["key"]}
        if ref["error_type"]:  # refused by the listing already
            return base | {c: ref[c] for c in ERROR_COLUMNS}
        return row_or_error(lambda: self._sample(ref), **base)

    def _sample(self, ref: dict[str, Any]) -> dict[str, Any]:
        parts: dict[str, tuple[bytes | str, str]] = {}
        if ref["text"] is not None:
            parts["text"] = (ref["text"], "")
        fs = self._filesystem(ref["source"], ref["root"])
        for modality in MODALITIES:
            path = ref[f"{modality}_uri"]
            if path:
                parts[modality] = (self._read(fs, ref["root"], path), path.rpartition(".")[2])
        return make_sample(
            ref["source"],
            ref["key"],
            parts,
            self.limits,
            group_id=ref["group_id"],
            label=ref["label"],
            label_source=ref["label_source"],
            metadata=ref["metadata"],
        )

    @staticmethod
    def _read(fs: pafs.FileSystem, root: str, path: str) -> bytes:
        if isinstance(fs, pafs.LocalFileSystem):
            real_root = _realpath(root)
            if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
                raise errors.UnsafePath(f"{path} resolves outside {root} (symlink?)")
        try:
            with fs.open_input_stream(path) as f:
                data = f.read()
        except FileNotFoundError as e:
            raise errors.MissingFile(f"{path} does not exist") from e
        except OSError as e:
            if "not found" in str(e).lower() or "no such file" in str(e).lower():
                raise errors.MissingFile(f"{path} does not exist") from e
            raise
        if not data:
            raise errors.EmptyFile(f"{path} is empty (0 bytes)")
        return data


class ShardReader:
    """Reads WebDataset tar shards: members ``<key>.<ext>`` grouped by key, in order."""

    def __init__(self, source: WebDatasetSource, limits: DecodeLimits) -> None:
        self.source = source
        self.limits = limits

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Shard items (``shard``, ``fingerprint``, ``state``: its members' ledger state as
        JSON ``{key: [fingerprint, outcome]}``) -> one row per member group."""
        fs, _ = filesystem_for(self.source.uri, self.source.storage_options)
        rows: list[dict[str, Any]] = []
        for shard in batch.to_pylist():
            known = json.loads(shard.get("state") or "{}")
            for row in self.read_shard(fs, shard["shard"]):
                prev_fingerprint, prev_outcome = known.get(row["source_uri"], (None, None))
                # the ledger knows a shard by its listed path, as refresh lists it again
                rows.append(
                    row
                    | {
                        "input_container": shard["shard"],
                        "input_fingerprint": shard["fingerprint"],
                        "input_prev_fingerprint": prev_fingerprint,
                        "input_prev_outcome": prev_outcome,
                    }
                )
        return pa.Table.from_pylist(rows, schema=COLLECTED)

    def shard_uri(self, shard: str) -> str:
        scheme = self.source.uri.split("://")[0]
        return shard if is_local(self.source.uri) else f"{scheme}://{shard}"

    def read_shard(self, fs: pafs.FileSystem, shard: str) -> list[dict[str, Any]]:
        name = self.source.source_name
        shard_uri = self.shard_uri(shard)
        groups: dict[str, dict[str, bytes]] = {}
        doubled: dict[str, list[str]] = {}  # group key -> member names seen more than once
        rows: list[dict[str, Any]] = []
        try:
            with (
                fs.open_input_stream(shard) as stream,
                tarfile.open(fileobj=stream, mode="r|*") as tar,
            ):
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    if is_hidden(base) or "." not in base:
                        continue
                    prefix = member.name[: len(member.name) - len(base)]
                    stem, ext = base.split(".", 1)
                    group = groups.setdefault(prefix + stem, {})
                    if ext.lower() in group:
                        doubled.setdefault(prefix + stem, []).append(member.name)
                    handle = tar.extractfile(member)
                    group[ext.lower()] = handle.read() if handle else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            error = errors.CorruptShard(
                f"tar ends early or is damaged after {len(groups)} samples: {e}"
            )
            rows.append({"source": name, "source_uri": shard_uri} | error_columns(error))
        for key, members in groups.items():
            rows.append(self.collect_member_group(f"{shard_uri}#{key}", members, doubled.get(key)))
        return rows

    def collect_member_group(
        self, key: str, members: dict[str, bytes], doubled: list[str] | None = None
    ) -> dict[str, Any]:
        """The sample row of one member group (``key.jpg``, ``key.txt``, ...), or its error row.

        ``doubled``: members whose name the shard holds more than once (which one is meant
        is ambiguous, so the group is refused rather than one of them dropped).
        """
        name = self.source.source_name
        return row_or_error(
            lambda: self._sample(key, members, doubled), source=name, source_uri=key
        )

    def _sample(
        self, key: str, members: dict[str, bytes], doubled: list[str] | None
    ) -> dict[str, Any]:
        if doubled:
            raise errors.AmbiguousSample(f"the shard holds {sorted(set(doubled))} more than once")
        parts: dict[str, tuple[bytes | str, str]] = {}
        extra: dict[str, Any] = {}
        for ext, data in members.items():
            if ext in ("cls", "label"):
                extra["label"] = data.decode("utf-8", "replace").strip() or None
                extra["label_source"] = "webdataset"
                continue
            if ext == "json":
                extra["metadata"] = data.decode("utf-8", "replace")
                continue
            modality = modality_of(ext.rsplit(".", 1)[-1])
            if modality is None:
                raise errors.UnsupportedFile(f"member {key}.{ext}: no modality for {ext!r}")
            if modality in parts:
                raise errors.AmbiguousSample(f"several {modality} members for {key}")
            if not data:
                raise errors.EmptyFile(f"member {key}.{ext} is empty (0 bytes)")
            parts[modality] = (data, ext)
        if not parts:
            raise errors.BadManifestRow(f"no text, image or audio member for {key}")
        return make_sample(self.source.source_name, key, parts, self.limits, **extra)
