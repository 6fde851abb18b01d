"""The feature-set plan: the (sample, view) pairs a feature set lacks -> ``features/<name>``.

What is missing is decided on the driver from key columns only (an Arrow
anti-join of samples and views keys against the feature set's); Ray runs
``Preprocess`` in CPU tasks and ``Encode`` in an actor pool (``num_gpus`` per
actor where the cluster has GPUs), and the table gets one commit. ``mmfp
encode`` runs this plan alone. A few rows are encoded in the CLI process instead
(``pipelines.build.in_process``).
"""

from __future__ import annotations

import pyarrow as pa

from features.keys import anti_join
from features.metadata import FeatureSetMeta, feature_table
from features.schema import ORIGINAL_VIEW
from features.sink import StoreSink
from pipelines.build.run import Run
from pipelines.encode import (
    KEY_COLUMNS,
    MEDIA_COLUMNS,
    Encode,
    FeatureSetSpec,
    Preprocess,
    as_feature_input,
    build_encoders,
    check_compatible,
    feature_set_meta,
    missing_rows,
    table_schema,
    wants_actors,
)
from pipelines.encoders import EncoderConfig
from pipelines.encoders.base import Encoder
from pipelines.route import FeatureRouter

FEATURE_KEYS = ["sample_id", "view"]
# Rows per call of Preprocess and of a GPU actor: whole model batches, about this many.
# Each call costs the actor host time in Ray Data (fetching, slicing, output blocks) that
# the device waits through: at one 32-row batch per call that time matched the forward's
# (busy 0.51-0.63 in `benchmarks/encode.py`'s simulation), at 512 rows 0.90-0.92.
GPU_CALL_ROWS = 512


def encode_feature_set(run: Run, feature_set: FeatureSetSpec, *, reencode: bool = False) -> None:
    """Encode the (sample, view) pairs the feature set lacks, as one commit of its table."""
    store, result = run.store, run.result
    name = feature_table(feature_set.name)
    encoders = build_encoders(feature_set)
    has_views = feature_set.views and store.exists("views")
    meta = feature_set_meta(
        encoders,
        samples_version=store.version("samples"),
        views_version=store.version("views") if has_views else None,
    )
    existing = pa.table({"sample_id": pa.array([], pa.string()), "view": pa.array([], pa.int32())})
    if store.exists(name):
        if reencode:
            # every row is replaced, in the commit that adds the new ones and their description
            run.commits.replace_all(name)
        else:
            check_compatible(
                feature_set.name, FeatureSetMeta.of(store, store.delta(name), table=name), meta
            )
            existing = store.to_arrow(name, columns=FEATURE_KEYS)
    # keys other writers add from here on are dropped from this run's files at commit
    run.commits.pin(name)
    sources = [("samples", False)] + ([("views", True)] if has_views else [])
    wanted = pa.concat_tables(
        [_keys(store.to_arrow(t, columns=_key_columns(v))) for t, v in sources]
    )
    todo = anti_join(wanted, existing, FEATURE_KEYS)
    if todo.num_rows == 0:
        return
    schemas = {
        name: run.commits.declare(name, table_schema(encoders), meta.to_properties()),
        "quarantine": run.commits.declare("quarantine"),
    }
    router = FeatureRouter(name, result.run_id, run.known_quarantine)
    sink = StoreSink(store, router, run_id=result.run_id, schemas=schemas)
    configs = feature_set.encoders
    batch_size = min(c.batch_size for c in configs)
    if run.in_process(todo.num_rows, model=wants_actors(encoders)):
        tables = (
            missing_rows(as_feature_input(chunk, is_view=is_view), todo=todo)
            for table, is_view in sources
            for chunk in run.stored_rows(table, _media_columns(is_view), todo)
        )
        steps = [Preprocess(configs), Encode(configs)]  # models load before the fork
        run.run_here(tables, steps, sink, rows=todo.num_rows, batch_size=batch_size)
    else:
        _encode_on_ray(run, sources, todo, encoders, configs, batch_size, sink)
    run.commits.add(name, sink.files[name])
    run.commits.add("quarantine", sink.files["quarantine"])
    run.commit(name)
    result.feature_counts[feature_set.name] = run.commits.rows.get(name, 0)


def _encode_on_ray(
    run: Run,
    sources: list[tuple[str, bool]],
    todo: pa.Table,
    encoders: list[Encoder],
    configs: list[EncoderConfig],
    batch_size: int,
    sink: StoreSink,
) -> None:
    """Preprocess in CPU tasks, the model in an actor pool (GPUs where the cluster has them)."""
    import ray
    from ray.data import ActorPoolStrategy

    from features.ray_sink import RayStoreSink

    run.ensure_ray()
    parts = []
    for table, is_view in sources:
        ds = run.store.table(table, columns=_media_columns(is_view))
        ds = ds.map_batches(
            as_feature_input, batch_format="pyarrow", fn_kwargs={"is_view": is_view}
        )
        parts.append(ds.map_batches(missing_rows, batch_format="pyarrow", fn_kwargs={"todo": todo}))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    resources = ray.cluster_resources()
    gpus = wants_actors(encoders) and resources.get("GPU", 0) > 0
    step_rows = batch_size
    if gpus:
        # whole batches per block (a 73-row block would reach the model as 32+32+9), each
        # block one call of each step; the encoder's forward still takes batch_size rows
        step_rows = batch_size * max(1, GPU_CALL_ROWS // batch_size)
        ds = ds.repartition(target_num_rows_per_block=step_rows, strict=True)
    ds = ds.map_batches(Preprocess(configs), batch_format="pyarrow", batch_size=step_rows)
    actors, per_actor = 0, max(c.num_gpus for c in configs)
    if wants_actors(encoders):
        # the model loads once per actor; with GPUs in the cluster each actor gets its share
        actors = max(c.concurrency for c in configs)
        if not gpus:
            # without GPUs Ray fuses Preprocess into the actors: let the pool use every CPU
            actors = max(actors, int(resources.get("CPU", 1)))
        ds = ds.map_batches(
            Encode,
            fn_constructor_args=(configs,),
            batch_format="pyarrow",
            batch_size=step_rows,
            compute=ActorPoolStrategy(min_size=1, max_size=actors),
            num_gpus=per_actor if gpus else 0,
            # a GPU actor mostly waits on its device: it holds no CPU that preprocessing
            # (CPU tasks feeding it) could use
            **({"num_cpus": 0} if gpus else {}),
        )
    else:  # weight-free model inputs: plain CPU tasks, fused with preprocessing
        ds = ds.map_batches(Encode(configs), batch_format="pyarrow", batch_size=batch_size)
    ds.write_datasink(RayStoreSink(sink))
    run.measure(ds, accelerator="Encode" if gpus else None, gpus=actors * per_actor)


def _media_columns(is_view: bool) -> list[str]:
    return [c for c in KEY_COLUMNS if c != "view" or is_view] + MEDIA_COLUMNS


def _key_columns(is_view: bool) -> list[str]:
    return FEATURE_KEYS if is_view else ["sample_id"]


def _keys(rows: pa.Table) -> pa.Table:
    """(sample_id, view) keys; sample rows get ``ORIGINAL_VIEW``."""
    if "view" in rows.column_names:
        return rows.select(FEATURE_KEYS).cast(
            pa.schema([("sample_id", pa.string()), ("view", pa.int32())])
        )
    view = pa.repeat(pa.scalar(ORIGINAL_VIEW, pa.int32()), rows.num_rows)
    return pa.table({"sample_id": rows.column("sample_id"), "view": view})
