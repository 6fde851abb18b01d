"""Export one version of a store to the formats other trainers read: plain Parquet,
WebDataset tar shards, a Hugging Face ``datasets`` folder (``load_from_disk``) and a
Lance dataset.

Rows go out ordered by sample id, a batch at a time (DuckDB streams the ordered join),
so an export of a large store never holds it in memory. The same version exports to the
same bytes: no clock, user or random name reaches a file (except Lance's own manifests,
which carry UUIDs and times: there the same version gives the same rows in the same
order, and the manifest records their SHA-256). Each export records where it
came from (store, table versions, splits, feature set) in ``_mmfp-export.json`` beside
its files and, for Parquet, in each file's metadata. It is written under a temporary
name in the destination's folder and renamed into place at the end, so a killed export
leaves no half-written ``DIR``.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from features.duck import connect
from features.duplicates import TABLE as DUPLICATES_TABLE
from features.duplicates import excluded_ids
from features.errors import StoreError
from features.metadata import FeatureSetMeta, feature_table
from features.tables import TableStore, Version

Format = Literal["parquet", "webdataset", "hf", "lance"]
MANIFEST = "_mmfp-export.json"  # "_": Parquet readers of the folder skip it
BATCH_ROWS = 1024
EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp",
              "wav": "wav", "flac": "flac", "mp3": "mp3", "ogg": "ogg"}  # fmt: skip
# what a WebDataset sample's .json holds (media, text and embeddings have their own files)
JSON_FIELDS = ["sample_id", "split", "label", "labels", "label_source", "label_confidence",
               "source", "source_uri", "group_id", "modalities", "metadata", "image_width",
               "image_height", "audio_sample_rate", "audio_duration"]  # fmt: skip


def export(
    store: TableStore,
    dest: Path,
    *,
    to: Format,
    version: Version = None,
    splits: list[str] | None = None,
    feature_set: str | None = None,
    feature_version: Version = None,
    shard_rows: int = 1000,
    exclude_duplicates: bool = False,
) -> dict[str, Any]:
    """Write ``samples`` at ``version`` (of ``splits``; with ``feature_set``, each sample's
    embedding columns beside it; with ``exclude_duplicates``, without the near duplicates
    the latest ``duplicates`` version marks) to ``dest`` as ``to``; returns the manifest."""
    if dest.exists():
        raise StoreError(f"{dest} exists; export writes a new folder (remove it, or pick another)")
    if shard_rows < 1:
        raise StoreError(f"shard_rows must be at least 1, got {shard_rows}")
    if not store.exists("samples"):
        raise StoreError(f"{store.uri} has no samples table to export")
    samples = store.delta("samples", version)
    tables: dict[str, Any] = {"s": store.dataset_of("samples", samples)}
    manifest: dict[str, Any] = {
        "format": to,
        "store": store.uri,
        "versions": {"samples": samples.version()},
        "splits": sorted(splits) if splits else None,
        "feature_set": feature_set,
    }
    embeddings: list[str] = []
    if feature_set is not None:
        table = feature_table(feature_set)
        if not store.exists(table):
            raise StoreError(f"{store.uri} has no feature set {feature_set!r}")
        features = store.delta(table, feature_version)
        embeddings = sorted(FeatureSetMeta.of(store, features, table=table).embeddings())
        if not embeddings:
            raise StoreError(f"{table} has no embedding columns to export")
        tables["f"] = store.dataset_of(table, features)
        manifest["versions"][table] = features.version()
    manifest["embeddings"] = embeddings
    where = "WHERE s.split IN (SELECT unnest($splits))" if splits else "WHERE true"
    if exclude_duplicates:
        pinned = store.version(DUPLICATES_TABLE) if store.exists(DUPLICATES_TABLE) else None
        excluded = excluded_ids(store, samples.version(), pinned)
        tables["x"] = pa.table({"sample_id": excluded})
        where += " AND s.sample_id NOT IN (SELECT sample_id FROM x)"
        manifest["versions"]["duplicates"] = pinned
        manifest["excluded_duplicates"] = len(excluded)
    partial = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        batches = _ordered(tables, where, splits, embeddings)
        writers = {"parquet": _write_parquet, "webdataset": _write_webdataset, "hf": _write_hf,
                   "lance": _write_lance}  # fmt: skip
        writer = writers[to]
        manifest["files"], manifest["rows"] = writer(batches, partial, manifest, shard_rows)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _ordered(
    tables: dict[str, Any], where: str, splits: list[str] | None, embeddings: list[str]
) -> Iterator[pa.RecordBatch]:
    """The samples (with their original rows' embeddings) by sample id, a batch at a time."""
    con = connect(tables)
    picked = ", ".join(f'f."{c}"' for c in embeddings)
    join = "LEFT JOIN f ON f.sample_id = s.sample_id AND f.view = -1" if embeddings else ""
    sql = f"SELECT s.*{', ' + picked if picked else ''} FROM s {join} {where} ORDER BY s.sample_id"
    reader = con.sql(sql, params={"splits": splits} if splits else None).to_arrow_reader(BATCH_ROWS)
    yield from reader


def _write_parquet(
    batches: Iterator[pa.RecordBatch], root: Path, manifest: dict[str, Any], shard_rows: int
) -> tuple[list[str], int]:
    """``part-NNNNN.parquet`` files of ``shard_rows`` rows, the manifest in their metadata."""
    files: list[str] = []
    rows = 0
    writer: pq.ParquetWriter | None = None
    note = {"mmfp.export": json.dumps(manifest, sort_keys=True)}
    for batch in batches:
        while batch.num_rows:
            if writer is None:
                files.append(f"part-{len(files):05d}.parquet")
                writer = pq.ParquetWriter(root / files[-1], batch.schema.with_metadata(note),
                                          compression="zstd")  # fmt: skip
            take = min(batch.num_rows, shard_rows - rows % shard_rows)
            writer.write_batch(batch.slice(0, take))
            rows += take
            batch = batch.slice(take)
            if rows % shard_rows == 0:
                writer.close()
                writer = None
    if writer is not None:
        writer.close()
    return files, rows


def _write_webdataset(
    batches: Iterator[pa.RecordBatch], root: Path, manifest: dict[str, Any], shard_rows: int
) -> tuple[list[str], int]:
    """``shard-NNNNNN.tar`` files of ``shard_rows`` samples: per sample id, its image
    (.jpg/.png/...), audio (.wav/...), text (.txt), everything else (.json) and each
    embedding (.<column>.npy). Entries carry no time, owner or mode of this machine."""
    files: list[str] = []
    rows = 0
    pending = (row for batch in batches for row in batch.to_pylist())
    while (first := next(pending, None)) is not None:
        files.append(f"shard-{len(files):06d}.tar")
        with tarfile.open(root / files[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in itertools.chain([first], itertools.islice(pending, shard_rows - 1)):
                key = row["sample_id"]
                if not key or any(c in key for c in "./\\"):  # a key ends at its first dot
                    raise StoreError(f"sample id {key!r} cannot be a WebDataset key")
                for suffix, data in _entries(row, manifest["embeddings"]):
                    _add(tar, f"{key}.{suffix}", data)
                rows += 1
    return files, rows


def _write_hf(
    batches: Iterator[pa.RecordBatch], root: Path, manifest: dict[str, Any], shard_rows: int
) -> tuple[list[str], int]:
    """What ``Dataset.save_to_disk`` writes (``data-NNNNN-of-NNNNN.arrow``, ``state.json``,
    ``dataset_info.json``), a shard at a time through ``datasets``' own ``ArrowWriter``,
    with ``image`` and ``audio`` as ``Image()`` and ``Audio()`` features (their stored bytes
    and a ``<sample_id>.<ext>`` name, so they decode as they are). Writing never decodes
    media, so it needs neither torch nor torchcodec; the fingerprint comes from the
    manifest, so the same version gives the same bytes."""
    try:
        from datasets import Audio, DatasetInfo, Features, Image
        from datasets.arrow_writer import ArrowWriter
    except ImportError as e:
        raise StoreError(
            f"--to hf needs Hugging Face datasets: pip install 'mmfp[hf]' ({e})"
        ) from e

    files: list[str] = []
    rows = 0
    features: Features | None = None
    pending: list[pa.Table] = []

    def flush() -> None:
        assert features is not None
        files.append(f"data-{len(files):05d}.arrow")
        writer = ArrowWriter(features=features, path=str(root / files[-1]))
        try:
            for part in pending:
                writer.write_table(part)
            writer.finalize()
        finally:
            writer.close()
        pending.clear()

    for batch in batches:
        table = _hf_table(pa.Table.from_batches([batch]))
        if features is None:
            features = Features.from_arrow_schema(table.schema)
            for modality, feature in (("image", Image()), ("audio", Audio())):
                if modality in features:
                    features[modality] = feature
        while table.num_rows:
            take = min(table.num_rows, shard_rows - rows % shard_rows)
            pending.append(table.slice(0, take))
            rows += take
            table = table.slice(take)
            if rows % shard_rows == 0:
                flush()
    if pending or not files:
        if features is None:
            raise StoreError("nothing to export: no sample matches")
        flush()
    named = [f"data-{i:05d}-of-{len(files):05d}.arrow" for i in range(len(files))]
    for old, new in zip(files, named, strict=True):
        (root / old).rename(root / new)
    state = {
        "_data_files": [{"filename": name} for name in named],
        "_fingerprint": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[
            :16
        ],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (root / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(DatasetInfo(description=json.dumps(manifest, sort_keys=True), features=features))
    (root / "dataset_info.json").write_text(
        json.dumps({k: info[k] for k in sorted(info)}, indent=2)
    )
    return [*named, "state.json", "dataset_info.json"], rows


def _write_lance(
    batches: Iterator[pa.RecordBatch], root: Path, manifest: dict[str, Any], shard_rows: int
) -> tuple[list[str], int]:
    """A Lance dataset (``lance.dataset(DIR)``), ``shard_rows`` rows per data file, the
    manifest in its schema metadata; ``manifest["rows_sha256"]`` hashes the rows in order
    (Arrow IPC of each batch), the determinism Lance's own UUID-named files allow."""
    try:
        import lance
    except ImportError as e:
        raise StoreError(f"--to lance needs pylance: pip install 'mmfp[lance]' ({e})") from e
    first = next(batches, None)
    if first is None:
        raise StoreError("nothing to export: no sample matches")
    digest = hashlib.sha256()
    rows = 0

    def counted() -> Iterator[pa.RecordBatch]:
        nonlocal rows
        for batch in itertools.chain([first], batches):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, batch.schema) as stream:
                stream.write_batch(batch)
            digest.update(sink.getvalue().to_pybytes())
            rows += batch.num_rows
            yield batch

    note = {"mmfp.export": json.dumps(manifest, sort_keys=True)}
    reader = pa.RecordBatchReader.from_batches(first.schema.with_metadata(note), counted())
    lance.write_dataset(reader, str(root), mode="create", max_rows_per_file=shard_rows)
    manifest["rows_sha256"] = digest.hexdigest()
    data = sorted(p.relative_to(root).as_posix() for p in (root / "data").glob("*.lance"))
    return data, rows


def _hf_table(table: pa.Table) -> pa.Table:
    """Media columns as ``datasets``' storage for ``Image``/``Audio``: {bytes, path}."""
    ids = table.column("sample_id").to_pylist()
    for modality in ("image", "audio"):
        if modality not in table.column_names:
            continue
        data = table.column(modality).combine_chunks()
        kinds = table.column(f"{modality}_format").to_pylist()
        paths = pa.array(
            [f"{i}.{_extension(k, modality)}" if b else None
             for i, k, b in zip(ids, kinds, data.is_valid().to_pylist(), strict=True)],
            pa.string(),
        )  # fmt: skip
        column = pa.StructArray.from_arrays(
            [data.cast(pa.binary()), paths], names=["bytes", "path"], mask=data.is_null()
        )
        table = table.set_column(table.schema.get_field_index(modality), modality, column)
    return table


def _entries(row: dict[str, Any], embeddings: list[str]) -> Iterator[tuple[str, bytes]]:
    if row.get("image") is not None:
        yield _extension(row.get("image_format"), "image"), row["image"]
    if row.get("audio") is not None:
        yield _extension(row.get("audio_format"), "audio"), row["audio"]
    if row.get("text") is not None:
        yield "txt", row["text"].encode("utf-8")
    info = {k: row.get(k) for k in JSON_FIELDS}
    yield "json", json.dumps(info, sort_keys=True, ensure_ascii=False).encode("utf-8")
    for column in embeddings:
        if row.get(column) is not None:
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(row[column], np.float32), allow_pickle=False)
            yield f"{column}.npy", buffer.getvalue()


def _extension(kind: str | None, modality: str) -> str:
    ext = EXTENSIONS.get(str(kind or "").lower())
    if ext is None:  # a format WebDataset's decoders do not know by name: keep the bytes
        return f"{modality}.bin"
    return ext


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
