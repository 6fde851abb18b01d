"""Seeded augmented views of train samples: the ``views`` table.

A view is a pure function of (sample_id, view index, spec seed): every random choice comes
from a generator seeded by a hash of those, never from global state, so any worker in any
process, in any order, writes the same bytes, and ``replay_view`` regenerates one view
bit for bit. Val and test samples are never augmented. A view that cannot be made (a
1-sample clip, an empty caption) becomes an error row (``pipelines.quarantine``) with null
media, never a crashed job.

The spec lives in ``pipelines.augment_spec``, the per-modality ops in ``augment_image``
(albumentations), ``augment_audio`` and ``augment_text``; this module holds the seeds and
the batch function.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from features.keys import anti_join, semi_join
from features.schema import VIEWS
from pipelines.augment_audio import augment_audio
from pipelines.augment_image import augment_image
from pipelines.augment_spec import AugmentSpec
from pipelines.augment_text import augment_text
from pipelines.errors import AugmentError
from pipelines.identity import short_hash
from pipelines.quarantine import ERROR_FIELDS, error_columns


def view_seed(sample_id: str, view: int, seed: int, modality: str) -> int:
    """The 64-bit seed of one modality of one view. Hashed, not added, so neighbouring views
    or seeds share no stream, and modalities of one view vary independently."""
    return int(short_hash("augment", sample_id, view, seed, modality, size=8), 16)


# What ``make_views`` returns: the views table plus the error columns. Good rows have null
# errors and go to ``views`` (``schema.conform(t.drop(...), VIEWS)``); error rows go to quarantine.
VIEW_ERRORS_SCHEMA = pa.schema([*VIEWS, *ERROR_FIELDS])

_MEDIA = ("text", "image", "image_width", "image_height", "audio", "audio_sample_rate")
_MEDIA += ("audio_duration", "transforms")
# the samples columns a view is made from (what the build reads back from the store)
VIEW_INPUT_COLUMNS = (
    "sample_id", "split", "modalities", "text", "image", "audio", "label", "labels",
    "audio_sample_rate", "audio_duration",
)  # fmt: skip


def replay_view(sample_row: dict[str, Any], view: int, spec: AugmentSpec) -> dict[str, Any]:
    """Make view ``view`` of one samples row: a views row without ``created_at``/``run_id``.

    Each modality the row has is augmented with its own seed; if any fails, the whole view is
    an error row (media null), because a view missing one modality would silently train a
    different pair. The error message names every failed modality.
    """
    sid = sample_row["sample_id"]
    row: dict[str, Any] = {
        "sample_id": sid,
        "view": view,
        "split": sample_row.get("split"),
        "seed": spec.seed,
        "modalities": sample_row.get("modalities"),
        "label": sample_row.get("label"),
        "labels": sample_row.get("labels"),
        **dict.fromkeys(_MEDIA),
        **{f.name: None for f in ERROR_FIELDS},
    }
    media: dict[str, Any] = {}
    records: dict[str, Any] = {}
    errors: list[AugmentError] = []

    def seed_of(modality: str) -> int:
        return view_seed(sid, view, spec.seed, modality)

    if sample_row.get("image") is not None:
        try:
            png, records["image"] = augment_image(
                sample_row["image"], ops=spec.image, seed=seed_of("image")
            )
            h, w = records["image"]["output_shape"][:2]
            media |= {"image": png, "image_width": w, "image_height": h}
        except AugmentError as e:
            errors.append(e)
    if sample_row.get("audio") is not None:
        if spec.audio is None:
            records["audio"] = {"passthrough": True}
            media["audio"] = sample_row["audio"]
            for key in ("audio_sample_rate", "audio_duration"):
                media[key] = sample_row.get(key)
        else:
            try:
                wav, sr, duration, records["audio"] = augment_audio(
                    sample_row["audio"], spec=spec.audio, seed=seed_of("audio")
                )
                media |= {"audio": wav, "audio_sample_rate": sr, "audio_duration": duration}
            except AugmentError as e:
                errors.append(e)
    if sample_row.get("text") is not None:
        if spec.text is None:
            records["text"] = {"passthrough": True}
            media["text"] = sample_row["text"]
        else:
            try:
                media["text"], records["text"] = augment_text(
                    sample_row["text"], spec=spec.text, seed=seed_of("text")
                )
            except AugmentError as e:
                errors.append(e)
    if errors:
        return row | error_columns(AugmentError("; ".join(str(e) for e in errors)))
    return row | media | {"transforms": json.dumps(records, sort_keys=True)}


def make_views(
    batch: pa.Table,
    *,
    spec: AugmentSpec,
    run_id: str,
    created_at: datetime | None = None,
) -> pa.Table:
    """Views of the train rows of a samples batch, ``spec.views_per_sample`` per sample, as a
    ``VIEW_ERRORS_SCHEMA`` table. Val/test rows yield nothing; bad inputs yield error rows.

    ``created_at`` defaults to now; pass it to make the whole table reproducible.
    """
    import pyarrow.compute as pc

    empty = pa.Table.from_pylist([], schema=VIEW_ERRORS_SCHEMA)
    if batch.num_rows == 0:
        return empty
    train = batch.filter(pc.equal(batch["split"], "train"))  # null split: not train
    train = train.select([c for c in VIEW_INPUT_COLUMNS if c in train.column_names])
    stamp = created_at or datetime.now(UTC)
    rows = [
        replay_view(sample, view, spec) | {"created_at": stamp, "run_id": run_id}
        for sample in train.to_pylist()
        for view in range(spec.views_per_sample)
    ]
    return pa.Table.from_pylist(rows, schema=VIEW_ERRORS_SCHEMA) if rows else empty


def make_missing_views(
    batch: pa.Table, *, spec: AugmentSpec, run_id: str, todo: pa.Table
) -> pa.Table:
    """``make_views`` for the (``sample_id``, ``view``) pairs in ``todo`` only.

    ``todo`` holds the pairs the store lacks at ``spec.seed`` (``missing_views``), so a
    rerun makes nothing and a larger ``views_per_sample`` adds only the new indices.
    """
    wanted = semi_join(batch, todo.select(["sample_id"]), ["sample_id"])
    return semi_join(make_views(wanted, spec=spec, run_id=run_id), todo, ["sample_id", "view"])


def missing_views(
    train_ids: pa.Array | pa.ChunkedArray, existing: pa.Table, spec: AugmentSpec
) -> pa.Table:
    """The (sample_id, view) pairs of ``train_ids`` that ``existing`` (views at ``spec.seed``)
    lacks: the views a run still has to make."""
    ids = pa.chunked_array(train_ids).combine_chunks().cast(pa.string())
    views = spec.views_per_sample
    wanted = pa.table(
        {
            "sample_id": pa.concat_arrays([ids] * views),
            "view": pa.array(np.repeat(np.arange(views, dtype=np.int32), len(ids))),
        }
    )
    return anti_join(wanted, existing.select(["sample_id", "view"]), ["sample_id", "view"])
