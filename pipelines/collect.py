"""Collect: sources -> one row per input, decoded, validated and given its content id.

Listing happens once per source (a directory walk, a manifest read by Ray, a
list of tar shards); reading, decoding and hashing run in Ray tasks over
batches of *references* (``REFS``). Every input ends as exactly one row of
``COLLECTED``: a sample, or an error (``error_type`` set) that becomes a
quarantine row. Nothing is dropped here.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import posixpath
import tarfile
from collections import defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from features.schema import SAMPLES
from features.storage import filesystem_for, is_local
from pipelines import errors
from pipelines.decode import decode_audio, decode_image, decode_text, modality_of
from pipelines.identity import sample_id, short_hash
from pipelines.spec import DecodeLimits, DirectorySource, ManifestSource, WebDatasetSource

MODALITIES = ("text", "image", "audio")
MEDIA = ("image", "audio")  # modalities a manifest names by path

# A reference to one input: where its parts are, plus what the listing already knows.
REFS = pa.schema(
    [
        ("source", pa.string()),
        ("root", pa.string()),  # the path every part must stay under
        ("key", pa.string()),  # the input's uri as shown to users (source_uri / quarantine uri)
        ("text", pa.string()),  # inline text (manifests)
        ("text_uri", pa.string()),
        ("image_uri", pa.string()),
        ("audio_uri", pa.string()),
        ("label", pa.string()),
        ("label_source", pa.string()),
        ("group_id", pa.string()),
        ("metadata", pa.string()),
        ("error_type", pa.string()),  # set when the listing already refused the input
        ("error_message", pa.string()),
        ("fingerprint", pa.string()),  # size + mtime of its files (and the manifest row)
    ]
)

COLLECTED = pa.schema(
    [
        *SAMPLES,
        pa.field("error_stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        # what a refresh compares: the unit it lists (a sample's files, or a whole shard)
        pa.field("input_container", pa.string()),
        pa.field("input_fingerprint", pa.string()),
    ]
)


def error_row(source: str, key: str, error: errors.InputError) -> dict[str, Any]:
    return {
        "source": source,
        "source_uri": key,
        "error_stage": error.stage,
        "error_type": type(error).__name__,
        "error_message": str(error),
    }


def _is_hidden(rel: str) -> bool:
    return rel.startswith(".") or "/." in rel


# ---- listing ----------------------------------------------------------------


def list_directory(source: DirectorySource) -> pa.Table:
    """Group the files under ``source.uri`` into one reference per stem."""
    fs, root = filesystem_for(source.uri, source.storage_options)
    name = source.source_name
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=False)
    try:
        infos = fs.get_file_info(selector)
    except (FileNotFoundError, OSError) as e:
        raise errors.SpecError(f"source {name!r}: cannot list {source.uri}: {e}") from e
    parts: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    stats: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    refs: list[dict[str, Any]] = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(root) :].lstrip("/")
        if _is_hidden(rel):
            continue
        stem, _, ext = rel.rpartition(".")
        modality = modality_of(ext) if stem else None
        stat = (rel, info.size, info.mtime_ns)
        if modality is None:
            err = errors.UnsupportedFile(f"no modality for extension {ext!r}")
            refs.append(_ref(name, root, f"{source.uri}/{rel}", err, short_hash(stat)))
            continue
        parts[stem][modality].append(info.path)
        stats[stem].append(stat)
    for stem in sorted(parts):
        found = parts[stem]
        key = f"{source.uri}/{stem}"
        fingerprint = short_hash(*sorted(stats[stem]))
        doubled = {m: paths for m, paths in found.items() if len(paths) > 1}
        if doubled:
            names = sorted(os.path.basename(p) for paths in doubled.values() for p in paths)
            error = errors.AmbiguousSample(f"several files: {names}")
            refs.append(_ref(name, root, key, error, fingerprint))
            continue
        label = stem.split("/", 1)[0] if source.class_folders and "/" in stem else None
        refs.append(
            {
                "source": name,
                "root": root,
                "key": key,
                **{f"{m}_uri": found[m][0] for m in found},
                "label": label,
                "label_source": "folder" if label else None,
                "fingerprint": fingerprint,
            }
        )
    return pa.Table.from_pylist(refs, schema=REFS)


def _ref(
    source: str, root: str, key: str, error: errors.InputError, fingerprint: str
) -> dict[str, Any]:
    return {
        "source": source,
        "root": root,
        "key": key,
        "error_type": type(error).__name__,
        "error_message": str(error),
        "fingerprint": fingerprint,
    }


def safe_join(root: str, relative: str) -> str:
    """``root/relative`` when ``relative`` stays under ``root``; else ``UnsafePath``."""
    if "://" in relative or relative.startswith(("/", "\\")) or os.path.isabs(relative):
        raise errors.UnsafePath(f"{relative!r} is absolute; manifest paths must be relative")
    normalized = posixpath.normpath(relative.replace("\\", "/"))
    if normalized == ".." or normalized.startswith("../"):
        raise errors.UnsafePath(f"{relative!r} escapes the manifest's directory")
    return f"{root}/{normalized}"


def list_manifest(source: ManifestSource) -> pa.Table:
    """Read a manifest (JSONL, CSV or Parquet) into references, on the driver.

    Manifests are metadata: millions of rows read in seconds. One listing of the
    manifest's directory gives every referenced file's size and mtime for the
    fingerprints, instead of one stat per row.
    """
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, path = filesystem_for(source.uri, source.storage_options)
    name = source.source_name
    fmt = source.format or path.rsplit(".", 1)[-1].lower()
    if fmt not in ("jsonl", "json", "csv", "parquet"):
        raise errors.SpecError(
            f"source {name!r}: cannot tell the manifest format of {source.uri}; "
            "set `format:` to jsonl, csv or parquet"
        )
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise errors.SpecError(f"source {name!r}: manifest {source.uri} does not exist")
    try:
        with fs.open_input_file(path) as f:
            if fmt == "parquet":
                table = pq.read_table(f)
            elif fmt == "csv":
                # every column as text: ids like 007 keep their zeros
                table = pacsv.read_csv(
                    f, convert_options=pacsv.ConvertOptions(strings_can_be_null=True)
                )
            else:
                table = pajson.read_json(f)
    except (pa.ArrowInvalid, OSError) as e:
        raise errors.SpecError(f"source {name!r}: cannot parse manifest {source.uri}: {e}") from e
    root = path.rsplit("/", 1)[0]
    listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    stats = {i.path: (i.size, i.mtime_ns) for i in listing if i.type == pafs.FileType.File}
    return manifest_refs(table, source=source, root=root, stats=stats)


def manifest_refs(
    batch: pa.Table,
    *,
    source: ManifestSource,
    root: str,
    stats: dict[str, tuple[int, int]] | None = None,
) -> pa.Table:
    """Turn manifest rows into references; ``stats`` (path -> size, mtime) feed fingerprints."""
    cols = source.columns.model_dump()
    mapped = {c for c in cols.values() if c}
    rows = batch.to_pylist()
    refs = []
    for row in rows:
        value = {field: _cell(row, column) for field, column in cols.items()}
        extra = {k: v for k, v in row.items() if k not in mapped and v is not None}
        ident = value["id"] or value["image"] or value["audio"] or value["text"]
        key = f"{source.uri}#{str(ident)[:200]}"
        ref: dict[str, Any] = {
            "source": source.source_name,
            "root": root,
            "key": key,
            "text": value["text"],
            "label": value["label"],
            "label_source": "manifest" if value["label"] else None,
            "group_id": value["group"],
            "metadata": json.dumps(extra, default=str, sort_keys=True) if extra else None,
        }
        try:
            if not (value["text"] or value["image"] or value["audio"]):
                raise errors.BadManifestRow("row has no text, image or audio value")
            for modality in ("image", "audio"):
                if value[modality]:
                    ref[f"{modality}_uri"] = safe_join(root, value[modality])
        except errors.InputError as e:
            ref.update(error_type=type(e).__name__, error_message=str(e))
        files = [(ref.get(f"{m}_uri"), (stats or {}).get(ref.get(f"{m}_uri") or "")) for m in MEDIA]
        ref["fingerprint"] = short_hash(json.dumps(row, default=str, sort_keys=True), *files)
        refs.append(ref)
    return pa.Table.from_pylist(refs, schema=REFS)


def _cell(row: dict[str, Any], column: str | None) -> str | None:
    value = row.get(column) if column else None
    if value is None or (isinstance(value, float) and value != value):  # NaN from CSV
        return None
    return str(value) if str(value).strip() else None


def list_shards(source: WebDatasetSource) -> dict[str, str]:
    """Shard path -> fingerprint (size + mtime) for every shard of the source."""
    fs, root = filesystem_for(source.uri, source.storage_options)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return {root: short_hash(info.size, info.mtime_ns)}
    if info.type == pafs.FileType.NotFound:
        raise errors.SpecError(f"source {source.source_name!r}: {source.uri} does not exist")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return {
        i.path: short_hash(i.size, i.mtime_ns)
        for i in sorted(infos, key=lambda i: i.path)
        if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, source.pattern)
    }


# ---- reading and decoding ---------------------------------------------------


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
            self.collect_one(ref) | {"input_fingerprint": ref["fingerprint"]}
            for ref in batch.to_pylist()
        ]
        return pa.Table.from_pylist(rows, schema=COLLECTED)

    def _filesystem(self, source: str, root: str) -> pafs.FileSystem:
        if source not in self._fs:
            uri, options = self.sources.get(source, (root, {}))
            self._fs[source] = filesystem_for(uri, options)[0]
        return self._fs[source]

    def collect_one(self, ref: dict[str, Any]) -> dict[str, Any]:
        source, key = ref["source"], ref["key"]
        try:
            if ref["error_type"]:
                error_class = getattr(errors, ref["error_type"])
                raise error_class(ref["error_message"])
            parts: dict[str, tuple[bytes | str, str]] = {}
            if ref["text"] is not None:
                parts["text"] = (ref["text"], "")
            fs = self._filesystem(source, ref["root"])
            for modality in MODALITIES:
                path = ref[f"{modality}_uri"]
                if path:
                    parts[modality] = (self._read(fs, ref["root"], path), path.rpartition(".")[2])
            return make_sample(
                source,
                key,
                parts,
                self.limits,
                group_id=ref["group_id"],
                label=ref["label"],
                label_source=ref["label_source"],
                metadata=ref["metadata"],
            )
        except errors.InputError as e:
            return error_row(source, key, e)

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
        fs, _ = filesystem_for(self.source.uri, self.source.storage_options)
        rows: list[dict[str, Any]] = []
        for shard in batch.to_pylist():
            # the ledger knows a shard by its listed path, as refresh lists it again
            rows.extend(
                row | {"input_container": shard["shard"], "input_fingerprint": shard["fingerprint"]}
                for row in self.read_shard(fs, shard["shard"])
            )
        return pa.Table.from_pylist(rows, schema=COLLECTED)

    def shard_uri(self, shard: str) -> str:
        scheme = self.source.uri.split("://")[0]
        return shard if is_local(self.source.uri) else f"{scheme}://{shard}"

    def read_shard(self, fs: pafs.FileSystem, shard: str) -> list[dict[str, Any]]:
        name = self.source.source_name
        shard_uri = self.shard_uri(shard)
        groups: dict[str, dict[str, bytes]] = {}
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
                    if _is_hidden(base) or "." not in base:
                        continue
                    prefix = member.name[: len(member.name) - len(base)]
                    stem, ext = base.split(".", 1)
                    handle = tar.extractfile(member)
                    groups.setdefault(prefix + stem, {})[ext.lower()] = (
                        handle.read() if handle else b""
                    )
        except (tarfile.TarError, OSError, EOFError) as e:
            error = errors.CorruptShard(
                f"tar ends early or is damaged after {len(groups)} samples: {e}"
            )
            rows.append(error_row(name, shard_uri, error))
        for key, members in groups.items():
            rows.append(self.collect_member_group(f"{shard_uri}#{key}", members))
        return rows

    def collect_member_group(self, key: str, members: dict[str, bytes]) -> dict[str, Any]:
        name = self.source.source_name
        try:
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
            return make_sample(name, key, parts, self.limits, **extra)
        except errors.InputError as e:
            return error_row(name, key, e)
