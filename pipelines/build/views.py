"""The views plan: train samples without their views at the spec's seed -> ``views``.

What is missing is decided on the driver from key columns only (an Arrow
anti-join of train ids x view indices against the stored views); Ray tasks
then read the samples, make just those views and write them. Reads
``samples`` at its committed version, so views also catch up on samples
stored by earlier runs (e.g. after ``augment`` is added to a spec). A few views
are made in the CLI process instead (``pipelines.build.in_process``).
"""

from __future__ import annotations

import functools

import pyarrow.compute as pc

from features.schema import VIEWS
from features.sink import StoreSink
from pipelines.augment import VIEW_INPUT_COLUMNS, make_missing_views, missing_views
from pipelines.build.run import Run
from pipelines.route import ViewRouter


def augment_samples(run: Run) -> None:
    """Make the views the store lacks; their rows and quarantine rows stay pending."""
    spec, store, result = run.spec, run.store, run.result
    augment = spec.augment
    assert augment is not None
    existing = VIEWS.empty_table().select(["sample_id", "view"])
    if run.commits.base["views"] is not None:
        rows = store.to_arrow(
            "views", run.commits.base["views"], columns=["sample_id", "view", "seed"]
        )
        existing = rows.filter(pc.equal(rows.column("seed"), augment.seed))
    samples = store.to_arrow("samples", columns=["sample_id", "split"])
    train_ids = samples.filter(pc.equal(samples.column("split"), "train")).column("sample_id")
    todo = missing_views(train_ids, existing, augment)
    if todo.num_rows == 0:
        return  # every train sample has all its views: skip reading media at all
    schemas = {name: run.commits.declare(name) for name in ("views", "quarantine")}
    router = ViewRouter(result.run_id, run.known_quarantine)
    sink = StoreSink(store, router, run_id=result.run_id, schemas=schemas)
    making = {"spec": augment, "run_id": result.run_id, "todo": todo}
    if run.in_process(todo.num_rows):  # only the samples that lack views are read
        stored = run.stored_rows("samples", list(VIEW_INPUT_COLUMNS), todo)
        steps = [functools.partial(make_missing_views, **making)]
        run.run_here(stored, steps, sink, rows=todo.num_rows)
    else:
        from features.ray_sink import RayStoreSink

        run.ensure_ray()
        ds = store.table("samples", columns=list(VIEW_INPUT_COLUMNS))
        ds = ds.map_batches(
            make_missing_views,
            batch_format="pyarrow",
            batch_size=spec.resources.batch_size,
            fn_kwargs=making,
        )
        ds.write_datasink(RayStoreSink(sink))
        run.measure(ds)
    result.view_counts = {"views": 0, **sink.counts}
    for name, files in sink.files.items():
        run.commits.add(name, files)
