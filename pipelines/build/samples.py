"""The samples plan: listed inputs -> collect, label, split, dedup -> ``samples``.

Listing and planning happen on the driver (metadata only); the references are
cut into a few blocks per CPU so that each Ray task reads and decodes a good
batch of inputs, and tar shards are one task each. ``samples`` is committed
when the stage ends (views and feature sets read it); its quarantine and
ledger rows stay pending for the run's last commits. A small local run does the
same in the CLI process, through the same functions (``pipelines.build.in_process``),
and then never imports Ray (1-2 s of every cold CLI call).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from features.metadata import vocabulary_properties
from features.sink import StoreSink
from features.split_moves import recorded_moves
from pipelines.build.run import OUTCOMES, Run
from pipelines.collect import COLLECTED, RefReader, ShardReader
from pipelines.dedup import Ids, id_registry, mark_duplicates
from pipelines.filters import filter_samples
from pipelines.label import Labeller, label_vocabulary
from pipelines.ledger import InputPlan
from pipelines.route import SampleRouter
from pipelines.spec import PipelineSpec, WebDatasetSource
from pipelines.split import split_batch, split_properties

if TYPE_CHECKING:
    import ray.data


def collect_samples(run: Run, plan: InputPlan) -> pa.Array:
    """The plan's inputs -> files of ``samples``, ``quarantine`` and ``_inputs`` (pending).

    Returns the sample ids the plan would delete that an input read now still
    produces (a renamed or copied file): those must stay.
    """
    spec, store, result = run.spec, run.store, run.result
    if plan.todo.empty:
        return pa.array([], pa.string())
    labeller = Labeller(spec.label) if spec.label else None
    model = labeller is not None and labeller.needs_model
    properties = vocabulary_properties(label_vocabulary(spec.label))
    schemas = {
        "samples": run.commits.declare(
            "samples", properties=properties | split_properties(spec.split)
        ),
        "quarantine": run.commits.declare("quarantine"),
        "_inputs": run.commits.declare("_inputs"),
    }
    if spec.quality:
        schemas["quality"] = run.commits.declare("quality")
    sink = StoreSink(
        store,
        SampleRouter(result.run_id, run.known_quarantine, quality=spec.quality is not None),
        run_id=result.run_id,
        schemas=schemas,
    )
    split = spec.split
    splitting = {
        "seed": split.seed,
        "ratios": split.ratios,
        "by": split.by,
        "groups": split.groups,
        "moved": recorded_moves(store) if split.by == "group" else {},
    }
    shards = [(s, shard_items(plan, s)) for s in spec.sources if isinstance(s, WebDatasetSource)]
    shards = [(source, items) for source, items in shards if items]
    refs = plan.todo.refs
    # a shard's members are unknown until read: shards stay here only where any count may
    if run.in_process(refs.num_rows, model=model, inputs=True, unknown_count=bool(shards)):
        ids = Ids(store, run.commits.base["samples"])
        after = [
            *([labeller] if labeller else []),
            functools.partial(split_batch, **splitting),
            dedup := functools.partial(mark_duplicates, registry=ids),
            *([functools.partial(filter_samples, quality=spec.quality)] if spec.quality else []),
        ]
        # reading to splitting in forked workers; the run's ids are checked here
        serial_from = 1 + after.index(dedup)
        if refs.num_rows:
            steps = [RefReader.for_spec(spec), *after]
            run.run_here([refs], steps, sink, rows=refs.num_rows, serial_from=serial_from)
        for source, items in shards:  # a shard per batch, a file per shard
            reader = ShardReader.for_spec(spec, source)
            run.run_here([pa.Table.from_pylist(items)], [reader, *after], sink, rows=len(items),
                         batch_size=1, rows_per_file=1, serial_from=serial_from)  # fmt: skip
        kept = ids.produced(plan.delete_ids)
    else:
        kept = _collect_on_ray(run, plan, sink, splitting, labeller=labeller, model=model)
    for outcome in OUTCOMES:  # added: a `mmfp filter` run counted what it moved out
        result.counts[outcome] += sink.counts.get(outcome, 0)
    for name, files in sink.files.items():
        run.commits.add(name, files)
    return kept


def _collect_on_ray(
    run: Run,
    plan: InputPlan,
    sink: StoreSink,
    splitting: dict[str, Any],
    *,
    labeller: Labeller | None,
    model: bool,
) -> pa.Array:
    """The same steps as Ray Data operators; one actor owns the run's ids."""
    import ray
    from ray.data import ActorPoolStrategy

    from features.ray_sink import RayStoreSink

    spec = run.spec
    run.ensure_ray()
    registry = id_registry(run.store, run.commits.base["samples"])
    ds = collected_dataset(spec, plan)
    if model:  # zero-shot: the model loads once
        ds = ds.map_batches(
            Labeller,
            fn_constructor_args=(spec.label,),
            batch_format="pyarrow",
            compute=ActorPoolStrategy(min_size=1, max_size=1),
        )
    elif labeller:
        ds = ds.map_batches(labeller, batch_format="pyarrow")
    ds = ds.map_batches(split_batch, batch_format="pyarrow", fn_kwargs=splitting)
    ds = ds.map_batches(mark_duplicates, batch_format="pyarrow", fn_kwargs={"registry": registry})
    if spec.quality and spec.quality.filters:
        ds = ds.map_batches(
            filter_samples, batch_format="pyarrow", fn_kwargs={"quality": spec.quality}
        )
    ds.write_datasink(RayStoreSink(sink))
    run.measure(ds)
    kept = ray.get(registry.produced.remote(plan.delete_ids))
    ray.kill(registry)
    return kept


def collected_dataset(spec: PipelineSpec, plan: InputPlan) -> ray.data.Dataset:
    """The plan's inputs as one dataset of ``COLLECTED`` rows, read and decoded by Ray tasks."""
    import ray.data

    datasets: list[ray.data.Dataset] = []
    refs = plan.todo.refs
    if refs.num_rows:
        reader = RefReader.for_spec(spec)
        blocks = _split_rows(refs, _blocks(spec, refs.num_rows))
        datasets.append(
            # from_blocks builds block metadata locally: no remote round trip per build
            ray.data.from_blocks(blocks).map_batches(
                reader, batch_format="pyarrow", batch_size=spec.resources.batch_size
            )
        )
    for source in spec.sources:
        items = shard_items(plan, source) if isinstance(source, WebDatasetSource) else []
        if items:
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            datasets.append(
                ds.map_batches(
                    ShardReader.for_spec(spec, source),
                    batch_format="pyarrow",
                )
            )
    if not datasets:
        return ray.data.from_arrow(COLLECTED.empty_table())
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def shard_items(plan: InputPlan, source: WebDatasetSource) -> list[dict[str, Any]]:
    """The source's shards to read, as ``ShardReader`` takes them: path, fingerprint and
    the ledger's state of their members."""
    shards = plan.todo.shards.get(source.source_name) or {}
    return [
        {"shard": path, "fingerprint": fp, "state": plan.member_state.get(path)}
        for path, fp in shards.items()
    ]


def _blocks(spec: PipelineSpec, rows: int) -> int:
    """``blocks_per_cpu`` blocks per CPU, more when a block would exceed ``rows_per_block``
    inputs (a task holds its block's media in memory: 5,000 inputs of 256 px JPEG + 1 s WAV
    are ~225 MB, and such blocks left the CPUs waiting), never a block under one batch."""
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))  # stable, unlike available
    resources = spec.resources
    wanted = max(cpus * resources.blocks_per_cpu, -(-rows // resources.rows_per_block))
    return max(1, min(wanted, -(-rows // resources.batch_size)))


def _split_rows(table: pa.Table, parts: int) -> list[pa.Table]:
    step = -(-table.num_rows // parts) if table.num_rows else 1
    return [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]
