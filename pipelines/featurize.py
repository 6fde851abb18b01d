"""The encode phase of a run: one feature set's plan, incremental, committed once.

Kept apart from ``build.py`` so that ``mmfp encode`` can run it alone.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pyarrow as pa
import ray
import ray.data
from ray.data import ActorPoolStrategy

from features.commit import remove_all
from features.schema import FEATURE_SET_KEY, FEATURES_PREFIX
from features.sink import StoreSink
from pipelines.encode import (
    KEY_COLUMNS,
    MEDIA_COLUMNS,
    Encode,
    FeatureSetSpec,
    Preprocess,
    as_feature_input,
    build_encoders,
    check_compatible,
    feature_set_metadata,
    metadata_json,
    missing_rows,
    table_schema,
    wants_actors,
)

if TYPE_CHECKING:
    from pipelines.build import Run


class ToTable:
    """Router for a feature set: every row goes to the one table."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, batch: pa.Table) -> tuple[dict[str, pa.Table], dict[str, int]]:
        return {self.name: batch}, {"rows": batch.num_rows}


def _keys(table: pa.Table) -> set[tuple[str, int]]:
    return set(
        zip(table.column("sample_id").to_pylist(), table.column("view").to_pylist(), strict=True)
    )


def encode_feature_set(run: Run, feature_set: FeatureSetSpec, *, reencode: bool = False) -> None:
    """Encode the (sample, view) pairs the feature set lacks, as one commit of its table."""
    store, result = run.store, run.result
    name = f"{FEATURES_PREFIX}{feature_set.name}"
    encoders = build_encoders(feature_set)
    has_views = feature_set.views and store.exists("views")
    metadata = feature_set_metadata(
        encoders,
        samples_version=store.version("samples"),
        views_version=store.version("views") if has_views else None,
    )
    existing: set[tuple[str, int]] = set()
    if store.exists(name):
        stored = json.loads(store.properties(name).get(FEATURE_SET_KEY, "{}"))
        if reencode:
            # every row is replaced, in the same commit that adds the new ones
            run.removals[name] = (remove_all(store.delta(name)), [])
            store.set_properties(name, metadata_json(metadata))
        else:
            check_compatible(feature_set.name, stored, metadata)
            existing = _keys(store.to_arrow(name, columns=["sample_id", "view"]))
    # keys other writers add from here on are dropped from this run's files at commit
    run.base[name] = store.version(name)
    sources = [("samples", False)] + ([("views", True)] if has_views else [])
    wanted: set[tuple[str, int]] = set()
    for table, is_view in sources:
        cols = ["sample_id", "view"] if is_view else ["sample_id"]
        keys = store.to_arrow(table, columns=cols)
        if not is_view:
            keys = keys.append_column("view", pa.repeat(pa.scalar(-1, pa.int32()), keys.num_rows))
        wanted |= _keys(keys)
    if not (wanted - existing):
        return
    frozen = frozenset(existing)
    parts = []
    for table, is_view in sources:
        columns = [c for c in KEY_COLUMNS if c != "view" or is_view] + MEDIA_COLUMNS
        ds = store.table(table, columns=columns)
        ds = ds.map_batches(
            as_feature_input, batch_format="pyarrow", fn_kwargs={"is_view": is_view}
        )
        parts.append(
            ds.map_batches(missing_rows, batch_format="pyarrow", fn_kwargs={"existing": frozen})
        )
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    configs = feature_set.encoders
    batch_size = min(c.batch_size for c in configs)
    ds = ds.map_batches(Preprocess(configs), batch_format="pyarrow", batch_size=batch_size)
    if wants_actors(encoders):
        # the model loads once per actor; with GPUs in the cluster each actor gets its share
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0) > 0
        actors = max(c.concurrency for c in configs)
        if not gpus:
            # without GPUs Ray fuses Preprocess into the actors: let the pool use every CPU
            actors = max(actors, int(resources.get("CPU", 1)))
        ds = ds.map_batches(
            Encode,
            fn_constructor_args=(configs,),
            batch_format="pyarrow",
            batch_size=batch_size,
            compute=ActorPoolStrategy(min_size=1, max_size=actors),
            num_gpus=max(c.num_gpus for c in configs) if gpus else 0,
        )
    else:  # weight-free featurizers: plain CPU tasks, fused with preprocessing
        ds = ds.map_batches(Encode(configs), batch_format="pyarrow", batch_size=batch_size)
    sink = StoreSink(
        store,
        ToTable(name),
        run_id=result.run_id,
        tables=[name],
        properties={name: metadata_json(metadata)},
        deferred=(name,),
        schemas={name: table_schema(encoders)},
    )
    ds.write_datasink(sink)
    result.feature_counts[feature_set.name] = sink.counts.get("rows", 0)
    run.commit(name, sink.pending.get(name, []))
