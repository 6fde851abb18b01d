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
from pipelines.quality import STATS, sample_stats
from pipelines.quarantine import ERROR_COLUMNS, ERROR_FIELDS, error_columns, row_or_error
from pipelines.spec import DecodeLimits, PipelineSpec, WebDatasetSource

MODALITIES = ("text", "image", "audio")

# the quality stats that are not sample columns already (width, height, duration are)
STAT_FIELDS = [pa.field(name, kind) for name, kind in STATS.items() if name not in SAMPLES.names]
STAT_COLUMNS = [f.name for f in STAT_FIELDS]

COLLECTED = pa.schema(
    [
        *SAMPLES,
        *STAT_FIELDS,  # null unless the spec has a `quality` section
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
    *,
    stats: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Decode every part of one input and return its sample row; raise ``InputError``.

    ``stats``: add the quality stats (``pipelines.quality``) of the decoded media.
    """
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
    if stats:
        row |= sample_stats(
            text,
            pixels,
            None if audio is None else audio.samples,
            None if audio is None else audio.sample_rate,
        )
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
        self,
        sources: dict[str, tuple[str, dict[str, str]]],
        limits: DecodeLimits,
        *,
        stats: bool = False,
    ) -> None:
        self.sources = sources  # source name -> (uri, storage options)
        self.limits = limits
        self.stats = stats  # compute quality stats
        self._fs: dict[str, pafs.FileSystem] = {}

    @classmethod
    def for_spec(cls, spec: PipelineSpec) -> RefReader:
        """A reader for every source of ``spec``, with its decode limits."""
        return cls(
            {s.source_name: (s.uri, s.storage_options) for s in spec.sources},
            spec.decode,
            stats=spec.quality is not None,
        )

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
            stats=self.stats,
            group_id=ref["group_id"],
            label=ref["label"],
            label_source=ref["label_source"],
            metadata=ref["metadata"],
        )

    def _read(self, fs: pafs.FileSystem, root: str, path: str) -> bytes:
        """The bytes of one regular file under ``root``, checked before a byte is read."""
        if isinstance(fs, pafs.LocalFileSystem):
            real_root = _realpath(root)
            if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
                raise errors.UnsafePath(f"{path} resolves outside {root} (symlink?)")
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise errors.MissingFile(f"{path} does not exist")
        if info.type != pafs.FileType.File:  # a directory, FIFO, socket: never opened
            raise errors.NotARegularFile(f"{path} is not a regular file ({info.type.name})")
        check_size(path, info.size, self.limits)
        try:
            with fs.open_input_stream(path) as f:
                data = f.read(self.limits.max_file_bytes + 1)
        except FileNotFoundError as e:
            raise errors.MissingFile(f"{path} does not exist") from e
        if not data:
            raise errors.EmptyFile(f"{path} is empty (0 bytes)")
        check_size(path, len(data), self.limits)  # it grew since it was listed
        return data


def check_size(name: str, size: int | None, limits: DecodeLimits) -> None:
    if size is not None and size > limits.max_file_bytes:
        raise errors.FileTooLarge(
            f"{name} has {size} bytes > decode.max_file_bytes={limits.max_file_bytes}"
        )


class ShardReader:
    """Reads WebDataset tar shards: members ``<key>.<ext>`` grouped by key, in order."""

    def __init__(
        self, source: WebDatasetSource, limits: DecodeLimits, *, stats: bool = False
    ) -> None:
        self.source = source
        self.limits = limits
        self.stats = stats  # compute quality stats

    @classmethod
    def for_spec(cls, spec: PipelineSpec, source: WebDatasetSource) -> ShardReader:
        """A reader for ``source``'s shards, with ``spec``'s decode limits."""
        return cls(source, spec.decode, stats=spec.quality is not None)

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
        """One row per member group, each decoded as soon as the stream moves past it.

        WebDataset keeps a sample's members next to each other: memory holds one
        group's bytes at a time, and a member over ``decode.max_file_bytes`` is
        never read.
        """
        name = self.source.source_name
        shard_uri = self.shard_uri(shard)
        rows: list[dict[str, Any]] = []
        done: dict[str, int] = {}  # group key -> how many groups had it
        key: str | None = None
        members: dict[str, bytes] = {}
        problems: list[errors.InputError] = []

        def finish() -> None:
            if key is not None:
                done[key] = done.get(key, 0) + 1
                uri = f"{shard_uri}#{key}" + (f"#{done[key]}" if done[key] > 1 else "")
                rows.append(self.collect_member_group(uri, members, problems))

        try:
            with (
                fs.open_input_stream(shard) as stream,
                tarfile.open(fileobj=stream, mode="r|*") as tar,
            ):
                for member in tar:
                    if member.isdir():
                        continue
                    if not member.isfile():  # a link or device: never followed, never dropped
                        refused = errors.NotARegularFile(f"member {member.name} is not a file")
                        rows.append({"source": name, "source_uri": f"{shard_uri}#{member.name}"}
                                    | error_columns(refused))  # fmt: skip
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    if is_hidden(base) or "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    group = member.name[: len(member.name) - len(base)] + stem
                    if group != key:
                        finish()
                        key, members, problems = group, {}, []
                        if key in done:
                            problems.append(errors.AmbiguousSample(
                                f"members of {key} are not next to each other in the shard"
                            ))  # fmt: skip
                    ext = ext.lower()
                    if ext in members:
                        problems.append(
                            errors.AmbiguousSample(f"the shard holds {member.name} more than once")
                        )
                    try:
                        check_size(member.name, member.size, self.limits)
                    except errors.FileTooLarge as e:
                        problems.append(e)
                        members[ext] = b""
                        continue
                    handle = tar.extractfile(member)
                    members[ext] = handle.read() if handle else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            finish()
            key = None
            error = errors.CorruptShard(
                f"tar ends early or is damaged after {len(done)} samples: {e}"
            )
            rows.append({"source": name, "source_uri": shard_uri} | error_columns(error))
        finish()
        return rows

    def collect_member_group(
        self, key: str, members: dict[str, bytes], problems: list[errors.InputError] | None = None
    ) -> dict[str, Any]:
        """The sample row of one member group (``key.jpg``, ``key.txt``, ...), or its error row.

        ``problems`` found while reading the group (a member twice, one too large) refuse
        it: which bytes were meant is unclear, so no member is silently dropped.
        """
        name = self.source.source_name
        return row_or_error(
            lambda: self._sample(key, members, problems), source=name, source_uri=key
        )

    def _sample(
        self, key: str, members: dict[str, bytes], problems: list[errors.InputError] | None
    ) -> dict[str, Any]:
        if problems:
            raise problems[0]
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
        return make_sample(
            self.source.source_name, key, parts, self.limits, stats=self.stats, **extra
        )
