"""Compose the stages for a spec into one Ray Data plan and commit it to the store.

This is the only module that knows about Ray wiring (datasets, block counts,
actors, the sink); every stage it calls is a plain function over a batch.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data
from deltalake.transaction import AddAction

from features.sink import StoreSink
from features.storage import filesystem_for
from features.store import FeatureStore
from pipelines.augment import VIEW_INPUT_COLUMNS, make_missing_views
from pipelines.collect import (
    COLLECTED,
    REFS,
    RefReader,
    ShardReader,
    list_directory,
    list_shards,
    manifest_refs,
)
from pipelines.dedup import IdRegistry, mark_duplicates
from pipelines.errors import SpecError
from pipelines.label import Labeller, label_vocabulary
from pipelines.route import SampleRouter, ViewRouter
from pipelines.spec import DirectorySource, ManifestSource, PipelineSpec
from pipelines.split import split_batch

LABEL_VOCABULARY_KEY = "mmfp.label_vocabulary"
OUTCOMES = ("samples", "quarantined", "duplicates", "already_stored", "already_quarantined")


@dataclass
class BuildResult:
    """What one build did: counts per outcome and the table versions it committed."""

    run_id: str
    store_uri: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    view_counts: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None

    @property
    def inputs(self) -> int:
        return sum(self.counts.get(k, 0) for k in OUTCOMES)

    @property
    def changed(self) -> bool:
        return bool(self.versions)


def new_run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    version = package_version("mmfp")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{sha}"


def _blocks(spec: PipelineSpec, rows: int) -> int:
    cpus = max(1, int(ray.available_resources().get("CPU", 1)))
    wanted = cpus * spec.resources.blocks_per_cpu
    return max(1, min(wanted, -(-rows // spec.resources.batch_size)))


def _split_rows(table: pa.Table, parts: int) -> list[pa.Table]:
    step = -(-table.num_rows // parts) if table.num_rows else 1
    return [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]


def collected_dataset(spec: PipelineSpec) -> ray.data.Dataset:
    """All sources of ``spec`` as one dataset of ``COLLECTED`` rows."""
    reader = RefReader(
        {s.source_name: (s.uri, s.storage_options) for s in spec.sources}, spec.decode
    )
    ref_sets: list[pa.Table] = []
    datasets: list[ray.data.Dataset] = []
    for source in spec.sources:
        if isinstance(source, DirectorySource):
            ref_sets.append(list_directory(source))
        elif isinstance(source, ManifestSource):
            datasets.append(_manifest_dataset(source).map_batches(reader, batch_format="pyarrow"))
        else:
            shards = list_shards(source)
            if shards:
                ds = ray.data.from_items(
                    [{"shard": s} for s in shards], override_num_blocks=len(shards)
                )
                datasets.append(
                    ds.map_batches(ShardReader(source, spec.decode), batch_format="pyarrow")
                )
    refs = pa.concat_tables([REFS.empty_table(), *ref_sets])
    if refs.num_rows:
        blocks = _split_rows(refs, _blocks(spec, refs.num_rows))
        ds = ray.data.from_arrow(blocks).map_batches(
            reader, batch_format="pyarrow", batch_size=spec.resources.batch_size
        )
        datasets.insert(0, ds)
    if not datasets:
        return ray.data.from_arrow(COLLECTED.empty_table())
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def _manifest_dataset(source: ManifestSource) -> ray.data.Dataset:
    fs, path = filesystem_for(source.uri, source.storage_options)
    fmt = source.format or path.rsplit(".", 1)[-1].lower()
    readers = {
        "jsonl": ray.data.read_json,
        "json": ray.data.read_json,
        "csv": ray.data.read_csv,
        "parquet": ray.data.read_parquet,
    }
    if fmt not in readers:
        raise SpecError(
            f"source {source.source_name!r}: cannot tell the manifest format of {source.uri}; "
            "set `format:` to jsonl, csv or parquet"
        )
    if fs.get_file_info(path).type.name != "File":
        raise SpecError(f"source {source.source_name!r}: manifest {source.uri} does not exist")
    root = path.rsplit("/", 1)[0]
    return readers[fmt](path, filesystem=fs).map_batches(
        manifest_refs, batch_format="pyarrow", fn_kwargs={"source": source, "root": root}
    )


def sample_properties(spec: PipelineSpec) -> dict[str, str]:
    """Table metadata of ``samples``: the label vocabulary when the spec fixes one."""
    vocabulary = label_vocabulary(spec.label)
    return {} if vocabulary is None else {LABEL_VOCABULARY_KEY: json.dumps(vocabulary)}


def build(spec: PipelineSpec, *, run_id: str | None = None, kind: str = "build") -> BuildResult:
    """Collect, label, split, deduplicate and augment every source of ``spec`` into its store.

    One Delta commit per table that received rows; nothing at all when every
    input is already in the store. Ray must be initialised (jobs do it).
    """
    store = FeatureStore(spec.store.uri, storage_options=spec.store.storage_options)
    result = BuildResult(run_id=run_id or new_run_id(), store_uri=store.uri)
    # what this run reads is the store at these versions; commits check against them
    base = {name: store.version(name) for name in ("samples", "quarantine", "views")}
    if spec.label:
        Labeller(spec.label).check()  # a bad function path fails here, before Ray work
    known_quarantine = frozenset(store.column_values("quarantine", "quarantine_id").to_pylist())
    quarantine = collect_samples(spec, store, result, known_quarantine, base)
    if spec.augment:
        quarantine += augment_samples(spec, store, result, known_quarantine, base)
    version = store.commit(
        "quarantine", quarantine, run_id=result.run_id, base_version=base["quarantine"]
    )
    if version is not None:
        result.versions["quarantine"] = version
    result.finished_at = datetime.now(UTC)
    if result.changed:
        record_run(store, spec, result, kind=kind)
    return result


def collect_samples(
    spec: PipelineSpec,
    store: FeatureStore,
    result: BuildResult,
    known: frozenset[str],
    base: dict[str, int | None],
) -> list[AddAction]:
    """Sources -> ``samples`` (committed); returns the quarantine files for the caller to commit."""
    registry = IdRegistry.remote(store, base["samples"])
    ds = collected_dataset(spec)
    if spec.label:
        ds = ds.map_batches(Labeller(spec.label), batch_format="pyarrow")
    ds = ds.map_batches(
        split_batch,
        batch_format="pyarrow",
        fn_kwargs={"seed": spec.split.seed, "ratios": spec.split.ratios, "by": spec.split.by},
    )
    ds = ds.map_batches(mark_duplicates, batch_format="pyarrow", fn_kwargs={"registry": registry})
    sink = StoreSink(
        store,
        SampleRouter(result.run_id, known),
        run_id=result.run_id,
        tables=["samples", "quarantine"],
        properties={"samples": sample_properties(spec)},
        deferred=("quarantine",),
        base_versions=base,
    )
    ds.write_datasink(sink)
    ray.kill(registry)
    result.counts.update({k: sink.counts.get(k, 0) for k in OUTCOMES})
    result.versions.update(sink.versions)
    return sink.pending.get("quarantine", [])


def augment_samples(
    spec: PipelineSpec,
    store: FeatureStore,
    result: BuildResult,
    known: frozenset[str],
    base: dict[str, int | None],
) -> list[AddAction]:
    """Train samples without views at this seed -> ``views`` (committed); returns quarantine files.

    Reads ``samples`` at its committed version, so views also catch up on samples
    stored by earlier runs (e.g. after ``augment`` is added to a spec).
    """
    augment = spec.augment
    assert augment is not None
    existing = (
        frozenset(
            (r["sample_id"], r["view"])
            for r in store.to_arrow("views", columns=["sample_id", "view", "seed"]).to_pylist()
            if r["seed"] == augment.seed
        )
        if store.exists("views")
        else frozenset()
    )
    ds = store.table("samples", columns=list(VIEW_INPUT_COLUMNS))
    ds = ds.map_batches(
        make_missing_views,
        batch_format="pyarrow",
        batch_size=spec.resources.batch_size,
        fn_kwargs={"spec": augment, "run_id": result.run_id, "existing": existing},
    )
    sink = StoreSink(
        store,
        ViewRouter(result.run_id, known),
        run_id=result.run_id,
        tables=["views", "quarantine"],
        deferred=("quarantine",),
        base_versions=base,
    )
    ds.write_datasink(sink)
    result.view_counts = {
        "views": sink.counts.get("views", 0),
        **{k: v for k, v in sink.counts.items() if k != "views"},
    }
    result.versions.update(sink.versions)
    return sink.pending.get("quarantine", [])


def record_run(store: FeatureStore, spec: PipelineSpec, result: BuildResult, *, kind: str) -> None:
    """Append the run's lineage row to ``_runs`` (its own commit, after the data commits)."""
    row: dict[str, Any] = {
        "run_id": result.run_id,
        "kind": kind,
        "spec_name": spec.name,
        "spec_hash": spec.spec_hash(),
        "code_version": code_version(),
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "inputs": result.inputs,
        "samples_written": result.counts["samples"],
        "quarantined": result.counts["quarantined"],
        "duplicates": result.counts["duplicates"],
        "already_stored": result.counts["already_stored"],
        "views_written": result.view_counts.get("views", 0),
        "versions": json.dumps(result.versions, sort_keys=True),
    }
    version = store.append("_runs", pa.Table.from_pylist([row]), run_id=result.run_id)
    if version is not None:
        result.versions["_runs"] = version
