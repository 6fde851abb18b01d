"""Listing: what each source holds now, as references to read, on the driver.

Listing is metadata (paths, sizes, manifest rows), never media: a directory
walk, a manifest read, a list of tar shards. Each input becomes one row of
``REFS`` with a fingerprint (size + mtime of its files) that a refresh
compares with the ledger; an input the listing can already refuse (an
unsafe manifest path, two images for one stem) carries its error columns and
becomes a quarantine row like any other.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import stat
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from features.storage import filesystem_for
from pipelines import errors
from pipelines.decode import modality_of
from pipelines.identity import short_hash
from pipelines.quarantine import ERROR_FIELDS, error_columns
from pipelines.spec import (
    DecodeLimits,
    DirectorySource,
    ManifestSource,
    PipelineSpec,
    WebDatasetSource,
)

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
        *ERROR_FIELDS,  # set when the listing already refused the input
        ("fingerprint", pa.string()),  # size + mtime of its files (and the manifest row)
    ]
)


@dataclass
class Listing:
    """What the sources hold now: file references and tar shards (path -> fingerprint)."""

    refs: pa.Table
    shards: dict[str, dict[str, str]] = field(default_factory=dict)  # source -> shard -> fp

    @property
    def empty(self) -> bool:
        return not self.refs.num_rows and not any(self.shards.values())


def list_inputs(spec: PipelineSpec) -> Listing:
    """List every source: file references and tar shards with fingerprints."""
    ref_sets: list[pa.Table] = [REFS.empty_table()]
    shards: dict[str, dict[str, str]] = {}
    for source in spec.sources:
        if isinstance(source, DirectorySource):
            ref_sets.append(list_directory(source))
        elif isinstance(source, ManifestSource):
            ref_sets.append(list_manifest(source, spec.decode))
        else:
            shards[source.source_name] = list_shards(source)
    return Listing(pa.concat_tables(ref_sets), shards)


def is_hidden(rel: str) -> bool:
    return rel.startswith(".") or "/." in rel


@dataclass(frozen=True)
class Listed:
    """One entry a directory walk found: a path with its size and mtime, or why it is refused."""

    path: str
    size: int = 0
    mtime_ns: int = 0
    problem: errors.InputError | None = None


def list_directory(source: DirectorySource) -> pa.Table:
    """Group the files under ``source.uri`` into one reference per stem."""
    fs, root = filesystem_for(source.uri, source.storage_options)
    name = source.source_name
    try:
        listed = list(_walk(fs, root))
    except (FileNotFoundError, OSError) as e:
        raise errors.SpecError(f"source {name!r}: cannot list {source.uri}: {e}") from e
    parts: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    stats: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    refs: list[dict[str, Any]] = []
    for entry in listed:
        rel = entry.path[len(root) :].lstrip("/")
        if is_hidden(rel):
            continue
        stem, _, ext = rel.rpartition(".")
        modality = modality_of(ext) if stem else None
        stat = (rel, entry.size, entry.mtime_ns)
        if entry.problem is not None or modality is None:
            err = entry.problem or errors.UnsupportedFile(f"no modality for extension {ext!r}")
            refs.append(_ref(name, root, f"{source.uri}/{rel}", err, short_hash(stat)))
            continue
        parts[stem][modality].append(entry.path)
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


def _walk(fs: pafs.FileSystem, root: str) -> Iterator[Listed]:
    """Every file under ``root``; entries that are not regular files carry their problem."""
    if isinstance(fs, pafs.LocalFileSystem):
        yield from _walk_local(root)
        return
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=False)
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File:
            yield Listed(info.path, info.size or 0, info.mtime_ns or 0)
        elif info.type != pafs.FileType.Directory:
            yield Listed(info.path, problem=errors.NotARegularFile(f"{info.type.name} entry"))


def _walk_local(root: str) -> Iterator[Listed]:
    """A local walk that follows directory links only inside ``root`` and never twice.

    A link out of the root, or back into a directory already walked (a loop),
    is reported, not followed; FIFOs, sockets and devices are reported, never
    opened; a dangling link is a missing file.
    """
    real_root = os.path.realpath(root)
    walked = {real_root}
    for here, dirs, files in os.walk(root, followlinks=True, onerror=_raise):
        kept = []
        for d in sorted(dirs):
            path = os.path.join(here, d)
            real = os.path.realpath(path)
            if os.path.commonpath([real, real_root]) != real_root:
                yield Listed(path, problem=errors.UnsafePath(f"links out of the source to {real}"))
            elif real in walked:
                loop = errors.UnsafePath(f"links to {real}, already listed (a loop?)")
                yield Listed(path, problem=loop)
            else:
                walked.add(real)
                kept.append(d)
        dirs[:] = kept
        for f in files:
            path = os.path.join(here, f)
            try:
                info = os.stat(path)
            except OSError:
                yield Listed(path, problem=errors.MissingFile("a link to nothing"))
                continue
            if stat.S_ISREG(info.st_mode):
                yield Listed(path, info.st_size, info.st_mtime_ns)
            else:
                yield Listed(path, problem=errors.NotARegularFile("not a regular file"))


def _raise(error: OSError) -> None:
    raise error


def _ref(
    source: str, root: str, key: str, error: errors.InputError, fingerprint: str
) -> dict[str, Any]:
    """A reference the listing already refused: it is read as that error."""
    return {"source": source, "root": root, "key": key, "fingerprint": fingerprint} | (
        error_columns(error)
    )


def safe_join(root: str, relative: str) -> str:
    """``root/relative`` when ``relative`` names a file under ``root``; else ``UnsafePath``."""
    if any(ord(c) < 32 for c in relative):  # NUL and friends end paths early in C
        raise errors.UnsafePath(f"{relative!r} holds control characters")
    if "://" in relative or relative.startswith(("/", "\\")) or os.path.isabs(relative):
        raise errors.UnsafePath(f"{relative!r} is absolute; manifest paths must be relative")
    normalized = posixpath.normpath(relative.replace("\\", "/"))
    if normalized == ".." or normalized.startswith("../"):
        raise errors.UnsafePath(f"{relative!r} escapes the manifest's directory")
    if normalized == ".":
        raise errors.UnsafePath(f"{relative!r} names the manifest's directory, not a file")
    return f"{root}/{normalized}"


def list_manifest(source: ManifestSource, limits: DecodeLimits | None = None) -> pa.Table:
    """Read a manifest (JSONL, CSV or Parquet) into references, on the driver.

    Manifests are metadata: millions of rows read in seconds. One listing of the
    manifest's directory gives every referenced file's size and mtime for the
    fingerprints, instead of one stat per row. JSONL is parsed line by line, so a
    line that is not a JSON object is that row's quarantine reason, not the
    manifest's failure; a manifest over ``decode.max_manifest_bytes`` is refused.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    limits = limits or DecodeLimits()
    fs, path = filesystem_for(source.uri, source.storage_options)
    name = source.source_name
    fmt = source.format or path.rsplit(".", 1)[-1].lower()
    if fmt not in ("jsonl", "json", "csv", "parquet"):
        raise errors.SpecError(
            f"source {name!r}: cannot tell the manifest format of {source.uri}; "
            "set `format:` to jsonl, csv or parquet"
        )
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise errors.SpecError(f"source {name!r}: manifest {source.uri} does not exist")
    if (info.size or 0) > limits.max_manifest_bytes:
        raise errors.SpecError(
            f"source {name!r}: manifest {source.uri} has {info.size} bytes > "
            f"decode.max_manifest_bytes={limits.max_manifest_bytes}"
        )
    try:
        with fs.open_input_file(path) as f:
            if fmt == "parquet":
                rows: pa.Table | list[dict[str, Any]] = pq.read_table(f)
            elif fmt == "csv":
                # every column as text: ids like 007 keep their zeros
                rows = pacsv.read_csv(
                    f, convert_options=pacsv.ConvertOptions(strings_can_be_null=True)
                )
            else:
                rows = list(_json_lines(f))
    except (pa.ArrowInvalid, OSError) as e:
        raise errors.SpecError(f"source {name!r}: cannot parse manifest {source.uri}: {e}") from e
    root = path.rsplit("/", 1)[0]
    listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    stats = {i.path: (i.size, i.mtime_ns) for i in listing if i.type == pafs.FileType.File}
    return manifest_refs(rows, source=source, root=root, stats=stats)


BAD_LINE = "__mmfp_bad_line__"  # a JSONL line that is not an object: (line number, reason)


def _lines(stream: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary stream, read a chunk at a time."""
    rest = b""
    while data := stream.read(chunk):
        lines = (rest + data).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _json_lines(stream: Any) -> Iterator[dict[str, Any]]:
    for number, raw in enumerate(_lines(stream), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            yield {BAD_LINE: (number, f"line {number} is not JSON: {str(e)[:120]}")}
            continue
        if not isinstance(row, dict):
            yield {
                BAD_LINE: (number, f"line {number} is a JSON {type(row).__name__}, not an object")
            }
            continue
        yield row


def manifest_refs(
    batch: pa.Table | list[dict[str, Any]],
    *,
    source: ManifestSource,
    root: str,
    stats: dict[str, tuple[int, int]] | None = None,
) -> pa.Table:
    """Turn manifest rows into references; ``stats`` (path -> size, mtime) feed fingerprints."""
    cols = source.columns.model_dump()
    mapped = {c for c in cols.values() if c}
    rows = batch.to_pylist() if isinstance(batch, pa.Table) else batch
    refs = []
    seen: dict[str, int] = {}  # key -> rows that had it so far
    for row in rows:
        if BAD_LINE in row:
            number, reason = row[BAD_LINE]
            error = errors.BadManifestRow(reason)
            refs.append(_ref(source.source_name, root, f"{source.uri}#line={number}", error, ""))
            continue
        value = {field: _cell(row, column) for field, column in cols.items()}
        extra = {k: v for k, v in row.items() if k not in mapped and v is not None}
        ident = value["id"] or value["image"] or value["audio"] or value["text"]
        key = f"{source.uri}#{str(ident)[:200]}"
        seen[key] = repeat = seen.get(key, 0) + 1
        if repeat > 1:  # every input keeps a key of its own: the ledger and quarantine use it
            key = f"{key}#{repeat}"
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
            if value["id"] and repeat > 1:
                raise errors.AmbiguousSample(
                    f"id {value['id']!r} names {repeat} rows of the manifest; ids must be unique"
                )
            if not (value["text"] or value["image"] or value["audio"]):
                raise errors.BadManifestRow("row has no text, image or audio value")
            for modality in ("image", "audio"):
                if value[modality]:
                    ref[f"{modality}_uri"] = safe_join(root, value[modality])
        except errors.InputError as e:
            ref.update(error_columns(e))
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
