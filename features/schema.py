"""The one explicit Arrow schema of every store table.

Every batch is cast to its table's schema before it is written: Delta has no
fixed-size lists and refuses appends whose types differ from the table's
(``binary`` vs ``large_binary``, ``fixed_size_list`` vs ``list``), so the
schema lives here, once, and nothing is inferred from data.
"""

from __future__ import annotations

import pyarrow as pa


def list_of(value_type: pa.DataType) -> pa.DataType:
    """``list<value_type>`` with the item field named ``element``: Delta reads lists back
    with that name, so writing it keeps the Parquet files and the table schema identical."""
    return pa.list_(pa.field("element", value_type))


UTC_MICROS = pa.timestamp("us", tz="UTC")

SAMPLES = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("group_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("modalities", list_of(pa.string())),
        pa.field("text", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("image_format", pa.string()),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("image_channels", pa.int32()),
        pa.field("audio", pa.binary()),
        pa.field("audio_format", pa.string()),
        pa.field("audio_sample_rate", pa.int32()),
        pa.field("audio_channels", pa.int32()),
        pa.field("audio_duration", pa.float32()),
        pa.field("label", pa.string()),
        pa.field("labels", list_of(pa.string())),
        pa.field("label_source", pa.string()),
        pa.field("label_confidence", pa.float32()),
        pa.field("metadata", pa.string()),
        pa.field("ingested_at", UTC_MICROS),
        pa.field("run_id", pa.string()),
    ]
)

QUARANTINE = pa.schema(
    [
        pa.field("quarantine_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("quarantined_at", UTC_MICROS),
    ]
)

VIEWS = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("view", pa.int32(), nullable=False),  # 0..views_per_sample-1
        pa.field("split", pa.string()),
        pa.field("seed", pa.int64()),  # the spec's augment seed the view was made with
        pa.field("modalities", list_of(pa.string())),
        pa.field("text", pa.string()),
        pa.field("image", pa.binary()),  # PNG: lossless, so replayed bytes compare equal
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("audio", pa.binary()),  # WAV PCM16
        pa.field("audio_sample_rate", pa.int32()),
        pa.field("audio_duration", pa.float32()),
        pa.field("transforms", pa.string()),  # JSON: per modality, the ops and applied params
        pa.field("label", pa.string()),
        pa.field("labels", list_of(pa.string())),
        pa.field("created_at", UTC_MICROS),
        pa.field("run_id", pa.string()),
    ]
)

# Append-only ledger of inputs seen by builds and refreshes; an input's latest row is
# its state. A refresh skips inputs whose fingerprint did not change.
INPUTS = pa.schema(
    [
        pa.field("input_key", pa.string(), nullable=False),  # the sample's source_uri
        pa.field("source", pa.string()),
        pa.field("container", pa.string()),  # the tar shard it came from, if any
        pa.field("fingerprint", pa.string()),
        pa.field("outcome", pa.string()),  # sample | stored | duplicate | removed | <error type>
        pa.field("sample_id", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("seen_at", UTC_MICROS),
    ]
)

RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("kind", pa.string()),
        pa.field("spec_name", pa.string()),
        pa.field("spec_hash", pa.string()),
        pa.field("code_version", pa.string()),
        pa.field("started_at", UTC_MICROS),
        pa.field("finished_at", UTC_MICROS),
        pa.field("inputs", pa.int64()),
        pa.field("samples_written", pa.int64()),
        pa.field("quarantined", pa.int64()),
        pa.field("duplicates", pa.int64()),
        pa.field("already_stored", pa.int64()),
        pa.field("views_written", pa.int64()),
        pa.field("versions", pa.string()),
    ]
)

# one row per stage of a run: where its time went (``mmfp runs show``)
STAGES = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("started_at", UTC_MICROS),
        pa.field("seconds", pa.float64()),  # wall time, without the stages nested in it
        pa.field("rows", pa.int64()),
        pa.field("bytes", pa.int64()),
        pa.field("task_seconds", pa.float64()),  # Ray tasks' wall time, summed over tasks
        pa.field("cpu_seconds", pa.float64()),  # Ray tasks' CPU time, summed over tasks
        pa.field("cpus", pa.float64()),  # CPUs the cluster had
        # the longest any of its Ray Data operators could not launch a task (memory budget,
        # a full queue downstream, or every CPU taken)
        pa.field("backpressure_seconds", pa.float64()),
        pa.field("peak_task_bytes", pa.int64()),  # the largest memory (USS) one task reached
        pa.field("spilled_bytes", pa.int64()),  # object store bytes spilled to disk
        pa.field("driver_peak_bytes", pa.int64()),  # the driver's peak RSS, at the stage's end
        pa.field("gpus", pa.float64()),  # GPUs the cluster had, where the stage used them
        pa.field("accelerator_seconds", pa.float64()),  # its GPU actors' time in the model
    ]
)

# per-sample quality stats (``pipelines.quality``); null where the sample lacks the modality
QUALITY_STATS = pa.schema(
    [
        pa.field("text_chars", pa.int32()),
        pa.field("text_words", pa.int32()),
        pa.field("text_alpha_ratio", pa.float32()),  # letters / characters
        pa.field("text_digit_ratio", pa.float32()),
        pa.field("text_upper_ratio", pa.float32()),  # upper-case letters / letters
        pa.field("text_space_ratio", pa.float32()),
        pa.field("text_special_ratio", pa.float32()),  # punctuation, symbols, control characters
        # share of word 3-grams that occur more than once
        pa.field("text_repeat_ratio", pa.float32()),
        pa.field("text_lang", pa.string()),  # ISO 639-1 code from py3langid's bundled model
        pa.field("text_lang_score", pa.float32()),  # its probability (0..1)
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("image_aspect", pa.float32()),  # width / height
        # variance of the Laplacian of the grey image: low = blurred
        pa.field("image_blur", pa.float32()),
        pa.field("image_brightness", pa.float32()),  # mean luma, 0..1
        # Hasler & Suesstrunk (2003), 0 for grey images
        pa.field("image_colourfulness", pa.float32()),
        pa.field("image_phash", pa.string()),  # 64-bit DCT perceptual hash, 16 hex digits
        pa.field("audio_duration", pa.float32()),  # seconds
        pa.field("audio_rms_db", pa.float32()),  # level in dB relative to full scale
        pa.field("audio_clip_ratio", pa.float32()),  # share of samples with |x| >= 0.999
        # share of 25 ms frames 40 dB under the loudest
        pa.field("audio_silence_ratio", pa.float32()),
        # 95th over 10th percentile of frame power: speech's pauses measure the noise floor
        # (a sound with no pause measures ~0 dB)
        pa.field("audio_snr_db", pa.float32()),
        # cosine of a sample's two embeddings in a joint encoder's space (CLIP, CLAP), from
        # the feature set named by the spec's `quality.cross_modal`; set by `mmfp filter`
        pa.field("image_text_similarity", pa.float32()),
        pa.field("audio_text_similarity", pa.float32()),
        pa.field("audio_image_similarity", pa.float32()),
    ]
)

# Written once per sample when a spec has a `quality` section, for kept and filtered
# samples alike, so changed thresholds can be evaluated again (``mmfp filter``). A
# sample's stats depend only on its content: where a sample has two rows they agree.
QUALITY = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("source_uri", pa.string()),
        *QUALITY_STATS,
        pa.field("computed_at", UTC_MICROS),
        pa.field("run_id", pa.string()),
    ]
)

# Written whole by each `mmfp dedup` (one Delta version per search, older ones kept):
# a sample marked here is near ``duplicate_of``, which was kept. Nothing is deleted;
# readers leave marked samples out when asked (``features.duplicates``).
DUPLICATES = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("duplicate_of", pa.string(), nullable=False),
        pa.field("method", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("split", pa.string()),
        pa.field("duplicate_of_split", pa.string()),
        pa.field("samples_version", pa.int64()),
        pa.field("run_id", pa.string()),
        pa.field("found_at", UTC_MICROS),
    ]
)

# Groups ``mmfp dedup`` moved to another split so that near duplicates share one:
# written whole by each dedup that moves a group, read by every build, so samples of
# those groups that arrive later land where the group now is (``pipelines.same_split``).
SPLIT_MOVES = pa.schema(
    [
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("run_id", pa.string()),
        pa.field("moved_at", UTC_MICROS),
    ]
)

TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "samples": SAMPLES,
    "quarantine": QUARANTINE,
    "views": VIEWS,
    "quality": QUALITY,
    "duplicates": DUPLICATES,
    "_inputs": INPUTS,
    "_runs": RUNS,
    "_stages": STAGES,
    "_split_moves": SPLIT_MOVES,
}

TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "samples": ("sample_id",),
    "quarantine": ("quarantine_id",),
    "views": ("sample_id", "view"),
    "duplicates": ("sample_id",),
    "_runs": ("run_id",),
    "_stages": ("run_id", "stage"),
}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return ``table`` with exactly ``schema``'s columns, order and types.

    Missing nullable columns are filled with nulls; extra columns are an error,
    because silently dropping a column is silent data loss.
    """
    extra = set(table.column_names) - set(schema.names)
    if extra:
        raise ValueError(f"columns {sorted(extra)} are not in the table schema {schema.names}")
    columns = []
    for field in schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


# ---- feature sets -------------------------------------------------------------

FEATURES_PREFIX = "features/"
ORIGINAL_VIEW = -1  # the `view` of a feature row computed from the sample itself (not a view)

FEATURE_KEY_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("view", pa.int32(), nullable=False),
    pa.field("split", pa.string()),
    pa.field("label", pa.string()),
    pa.field("labels", list_of(pa.string())),
    pa.field("modalities", list_of(pa.string())),
]


def feature_schema(columns: dict[str, pa.DataType]) -> pa.Schema:
    """Key columns plus one column per encoder output, in the given order.

    Embeddings and model inputs are flattened into ``list<float32>`` (token ids
    ``list<int32>``): Delta has no fixed-size list, so each column's shape lives
    in the feature set's description (``features.metadata.FeatureSetMeta``) and is
    checked on read.
    """
    return pa.schema([*FEATURE_KEY_FIELDS, *(pa.field(n, t) for n, t in columns.items())])


def table_keys(name: str) -> tuple[str, ...] | None:
    """The columns that identify a row of ``name`` (feature sets: sample and view)."""
    if name.startswith(FEATURES_PREFIX):
        return ("sample_id", "view")
    return TABLE_KEYS.get(name)
