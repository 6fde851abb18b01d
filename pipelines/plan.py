"""Ray Data plans for the collect stage: listing on the driver, reading in tasks.

Listing is metadata (paths, sizes, manifest rows); the references are cut into
a few blocks per CPU so that each Ray task reads and decodes a good batch of
inputs, and tar shards are one task each.
"""

from __future__ import annotations

import pyarrow as pa
import ray
import ray.data

from pipelines.collect import (
    COLLECTED,
    REFS,
    RefReader,
    ShardReader,
    list_directory,
    list_manifest,
    list_shards,
)
from pipelines.inputs import Listing
from pipelines.spec import DirectorySource, ManifestSource, PipelineSpec, WebDatasetSource


def _blocks(spec: PipelineSpec, rows: int) -> int:
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))  # stable, unlike available
    wanted = cpus * spec.resources.blocks_per_cpu
    return max(1, min(wanted, -(-rows // spec.resources.batch_size)))


def _split_rows(table: pa.Table, parts: int) -> list[pa.Table]:
    step = -(-table.num_rows // parts) if table.num_rows else 1
    return [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]


def list_inputs(spec: PipelineSpec) -> Listing:
    """List every source on the driver: file references and tar shards with fingerprints."""
    ref_sets: list[pa.Table] = [REFS.empty_table()]
    shards: dict[str, dict[str, str]] = {}
    for source in spec.sources:
        if isinstance(source, DirectorySource):
            ref_sets.append(list_directory(source))
        elif isinstance(source, ManifestSource):
            ref_sets.append(list_manifest(source))
        else:
            shards[source.source_name] = list_shards(source)
    return Listing(pa.concat_tables(ref_sets), shards)


def collected_dataset(spec: PipelineSpec, listing: Listing) -> ray.data.Dataset:
    """The listed inputs as one dataset of ``COLLECTED`` rows, read and decoded by Ray tasks."""
    datasets: list[ray.data.Dataset] = []
    refs = listing.refs
    if refs.num_rows:
        reader = RefReader(
            {s.source_name: (s.uri, s.storage_options) for s in spec.sources}, spec.decode
        )
        blocks = _split_rows(refs, _blocks(spec, refs.num_rows))
        datasets.append(
            # from_blocks builds block metadata locally: no remote round trip per build
            ray.data.from_blocks(blocks).map_batches(
                reader, batch_format="pyarrow", batch_size=spec.resources.batch_size
            )
        )
    for source in spec.sources:
        shards = listing.shards.get(source.source_name)
        if shards and isinstance(source, WebDatasetSource):
            items = [{"shard": path, "fingerprint": fp} for path, fp in shards.items()]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            datasets.append(
                ds.map_batches(ShardReader(source, spec.decode), batch_format="pyarrow")
            )
    if not datasets:
        return ray.data.from_arrow(COLLECTED.empty_table())
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
