"""The spec's ``near_duplicates`` section and the job that marks near duplicates.

Methods find pairs of stored samples that are near each other: ``image``,
``audio`` and ``text`` compare perceptual fingerprints of the stored media
(``pipelines.fingerprints``), ``semantic`` compares a feature set's embeddings
(SemDeDup). With ``match: all`` (the default) the first method finds
candidates and every other method must agree wherever the pair has its
modality, and both samples must have the same modalities: two samples that
share a caption but not a recording are not duplicates. With ``match: any``
one method is enough. Within each set of near samples one is kept (the first
ingested, or the best by a quality stat) and the others are marked
``duplicate_of`` it; nothing is deleted (``features.duplicates``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from features.metadata import feature_table
from features.schema import ORIGINAL_VIEW
from features.tables import TableStore
from pipelines.fingerprints import NUM_PERM, fingerprint_batch
from pipelines.pairs import (
    PAIRS,
    SLACK,
    collect,
    cosine_pairs,
    matrix,
    minhash_pairs,
    vectors_column,
)

DEFAULT_THRESHOLDS = {"image": 0.99, "audio": 0.99, "text": 0.9}  # measured: BENCHMARKS.md


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NearDupMethod(_Model):
    """One way two samples can be near: a modality's fingerprint, or a feature set's column."""

    method: Literal["image", "audio", "text", "semantic"]
    # image/audio: cosine of fingerprints; text: estimated Jaccard of 5-grams
    threshold: float | None = Field(None, gt=0, le=1)
    feature_set: str | None = None  # semantic: whose embeddings
    column: str | None = None  # semantic: which embedding column (e.g. image_embedding)
    epsilon: float | None = Field(None, gt=0, lt=1)  # semantic: near when cosine >= 1 - epsilon

    @model_validator(mode="after")
    def _semantic_needs_its_column(self) -> NearDupMethod:
        semantic = self.method == "semantic"
        if semantic and not (self.feature_set and self.column):
            raise ValueError("method semantic needs `feature_set` and `column`")
        if not semantic and (self.feature_set or self.column or self.epsilon):
            raise ValueError(
                f"`feature_set`/`column`/`epsilon` are for semantic, not {self.method}"
            )
        if semantic and self.threshold is not None and self.epsilon is not None:
            raise ValueError("semantic: give `epsilon` or `threshold`, not both")
        return self

    @property
    def name(self) -> str:
        return (
            f"semantic:{self.feature_set}:{self.column}"
            if self.method == "semantic"
            else self.method
        )

    @property
    def cutoff(self) -> float:
        if self.threshold is not None:
            return self.threshold
        if self.method == "semantic":
            return 1.0 - (self.epsilon if self.epsilon is not None else 0.05)
        return DEFAULT_THRESHOLDS[self.method]


class NearDupSpec(_Model):
    """Which methods, how they combine, and which sample of a near set is kept."""

    methods: list[NearDupMethod] = Field(min_length=1)
    match: Literal["all", "any"] = "all"
    keep: Literal["keep_first", "keep_highest_quality"] = "keep_first"
    quality_stat: str | None = None  # keep_highest_quality: the stat ranked
    lower_is_better: bool = False
    cluster_rows: int = Field(2000, ge=2)  # cosine methods: the k-means cluster size aimed at
    probes: int = Field(1, ge=1, le=4)  # cosine methods: clusters each vector is compared in
    seed: int = 0
    # join near-duplicate sets (and their groups) into one split; false: only report leaks
    same_split: bool = True
    # the largest set joined, as a fraction of the stored samples (at least 10 samples)
    same_split_max: float = Field(0.01, ge=0, le=1)

    @model_validator(mode="after")
    def _keep_needs_a_stat(self) -> NearDupSpec:
        from pipelines.quality import NUMERIC_STATS

        if self.keep == "keep_highest_quality":
            if self.quality_stat not in NUMERIC_STATS:
                raise ValueError(
                    "keep: keep_highest_quality needs `quality_stat`, one of "
                    + ", ".join(NUMERIC_STATS)
                )
        elif self.quality_stat is not None:
            raise ValueError("`quality_stat` is for keep: keep_highest_quality")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods repeat: {names}")
        return self


@dataclass
class NearDupResult:
    """What one search found: the marks, the pairs behind them, and where they came from."""

    marks: pa.Table  # sample_id, duplicate_of, method, score
    pairs: pa.Table  # a, b, score, method: every near pair that counted
    samples_version: int
    pairs_by_method: dict[str, int]


def find_near_duplicates(
    store: TableStore, spec: NearDupSpec, limits: Any, samples_version: int | None = None
) -> NearDupResult:
    """Search the stored samples (at ``samples_version``, default latest) with ``spec``."""
    version = store.version("samples") if samples_version is None else samples_version
    if version is None:
        raise FileNotFoundError("the store has no samples table yet: build first")
    samples = store.to_arrow("samples", version, columns=["sample_id", "modalities", "ingested_at"])
    found: dict[str, pa.Table] = {}
    prints: dict[str, Any] = {}
    for method in spec.methods:  # computed once: the search reads them several times
        prints[method.name] = fingerprints(store, method, version, limits).materialize()
    stored = samples.column("sample_id").cast(pa.string()).combine_chunks()
    first, *others = spec.methods
    if spec.match == "any":
        for method in spec.methods:
            found[method.name] = search(method, prints[method.name], spec, stored)
        pairs = merge_any(found)
    else:
        candidates = search(first, prints[first.name], spec, stored)
        found[first.name] = candidates
        pairs = confirm_all(candidates, first, others, prints, samples)
        for method in others:
            found[method.name] = pairs.filter(pc.is_valid(pairs.column(method.name)))
        pairs = pairs.select(["a", "b", "score"]).append_column(
            "method", pa.array(["+".join(m.name for m in spec.methods)] * pairs.num_rows)
        )
    order = keep_order(store, spec, samples)
    return NearDupResult(
        marks=mark(pairs, order),
        pairs=pairs,
        samples_version=version,
        pairs_by_method={name: table.num_rows for name, table in found.items()},
    )


def fingerprints(store: TableStore, method: NearDupMethod, version: int, limits: Any) -> Any:
    """A Ray Dataset of (sample_id, fingerprint) for one method, computed by Ray tasks."""
    if method.method == "semantic":
        table = feature_table(method.feature_set)
        ds = store.table(table, columns=["sample_id", "view", method.column])
        return ds.map_batches(
            embedding_prints, fn_kwargs={"column": method.column}, batch_format="pyarrow"
        )
    media = [method.method, "audio_format"] if method.method == "audio" else [method.method]
    ds = store.table("samples", version, columns=["sample_id", *media])
    return ds.map_batches(
        fingerprint_batch,
        fn_kwargs={
            "modality": method.method,
            "max_image_pixels": limits.max_image_pixels,
            "max_audio_seconds": limits.max_audio_seconds,
        },
        batch_format="pyarrow",
        batch_size=256,
    )


def embedding_prints(batch: pa.Table, *, column: str) -> pa.Table:
    """Original rows' embeddings (not views'), made unit length (cosine = dot product)."""
    batch = batch.filter(pc.equal(batch.column("view"), ORIGINAL_VIEW))
    batch = batch.filter(pc.is_valid(batch.column(column)))
    unit = []  # a block of views only, or of samples without this modality: no rows
    if batch.num_rows:
        vectors = matrix(batch.column(column)).astype(np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = list(np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0))
    column_out = vectors_column(unit, pa.float32())
    return pa.table({"sample_id": batch.column("sample_id"), "fingerprint": column_out})


def search(method: NearDupMethod, prints: Any, spec: NearDupSpec, stored: pa.Array) -> pa.Table:
    """One method's pairs among the ``stored`` samples (a feature set may still hold rows of
    samples removed since it was encoded)."""
    if method.method == "text":
        pairs = minhash_pairs(prints, method.cutoff, NUM_PERM)
    else:
        pairs = cosine_pairs(
            prints,
            method.cutoff,
            cluster_rows=spec.cluster_rows,
            probes=spec.probes,
            seed=spec.seed,
        )
    present = pc.and_(
        pc.is_in(pairs.column("a"), value_set=stored), pc.is_in(pairs.column("b"), value_set=stored)
    )
    return pairs.filter(present)


def merge_any(found: dict[str, pa.Table]) -> pa.Table:
    """Every pair one method found; a pair several found keeps the first method's score."""
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for name, pairs in found.items():
        for a, b, score in zip(*(pairs.column(c).to_pylist() for c in PAIRS.names), strict=True):
            best.setdefault((a, b), (score, name))
    keys = sorted(best)
    return pa.table(
        {
            "a": pa.array([a for a, _ in keys], pa.string()),
            "b": pa.array([b for _, b in keys], pa.string()),
            "score": pa.array([best[k][0] for k in keys], pa.float32()),
            "method": pa.array([best[k][1] for k in keys], pa.string()),
        }
    )


def confirm_all(
    candidates: pa.Table,
    first: NearDupMethod,
    others: list[NearDupMethod],
    prints: dict[str, Any],
    samples: pa.Table,
) -> pa.Table:
    """The candidate pairs that every other method confirms: same modalities on both sides,
    and each other method's score at or above its threshold where both have its input.
    Adds one score column per other method (null where it did not apply)."""
    modalities = dict(
        zip(
            samples.column("sample_id").to_pylist(),
            (tuple(sorted(m or ())) for m in samples.column("modalities").to_pylist()),
            strict=True,
        )
    )
    a = candidates.column("a").to_pylist()
    b = candidates.column("b").to_pylist()
    keep = np.array([modalities.get(x) == modalities.get(y) for x, y in zip(a, b, strict=True)])
    scores: dict[str, np.ndarray] = {}
    involved = sorted(set(a) | set(b))
    for method in others:
        vectors = fetch(prints[method.name], involved)
        score = np.full(len(a), np.nan, np.float32)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            vx, vy = vectors.get(x), vectors.get(y)
            if vx is None and vy is None:
                continue
            if vx is None or vy is None:
                keep[i] = False
                continue
            score[i] = float(vx @ vy) if method.method != "text" else float(np.mean(vx == vy))
            keep[i] &= score[i] >= method.cutoff - SLACK
        scores[method.name] = score
    out = candidates
    for name, score in scores.items():
        out = out.append_column(name, pa.array(score, pa.float32(), mask=np.isnan(score)))
    return out.filter(pa.array(keep, pa.bool_())) if len(a) else out


def fetch(prints: Any, ids: list[str]) -> dict[str, np.ndarray]:
    """The fingerprints of ``ids`` (the samples of candidate pairs), read on the driver."""
    import ray

    wanted = ray.put(pa.array(ids, pa.string()))

    def only(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch.column("sample_id"), value_set=ray.get(wanted)))

    table = collect(prints.map_batches(only, batch_format="pyarrow"))
    if not table.num_rows:
        return {}
    vectors = matrix(table.column("fingerprint"))
    return dict(zip(table.column("sample_id").to_pylist(), vectors, strict=True))


def keep_order(store: TableStore, spec: NearDupSpec, samples: pa.Table) -> dict[str, int]:
    """Each sample's rank for keeping (0 is kept first): earliest ingested, or best by the
    quality stat (samples without the stat last); ties by sample_id."""
    ids = samples.column("sample_id").to_pylist()
    if spec.keep == "keep_first":
        when = samples.column("ingested_at").to_pylist()
        keys = [(w is None, w, sid) for w, sid in zip(when, ids, strict=True)]
    else:
        stats = latest_stat(store, spec.quality_stat)
        sign = 1.0 if spec.lower_is_better else -1.0
        keys = [
            (stats.get(sid) is None, sign * stats[sid] if stats.get(sid) is not None else 0, sid)
            for sid in ids
        ]
    ranked = sorted(range(len(ids)), key=lambda i: keys[i])
    return {ids[i]: rank for rank, i in enumerate(ranked)}


def latest_stat(store: TableStore, stat: str) -> dict[str, float]:
    """sample_id -> the stat's latest value in the ``quality`` table (empty without one)."""
    if not store.exists("quality"):
        return {}
    from features.duck import connect
    from features.stats import LATEST_STATS

    con = connect({"raw": store.dataset("quality")})
    rows = con.sql(f'SELECT sample_id, "{stat}" FROM raw QUALIFY {LATEST_STATS}').fetchall()
    return {sid: value for sid, value in rows if value is not None}


def mark(pairs: pa.Table, order: dict[str, int]) -> pa.Table:
    """SemDeDup's keep rule over the pair graph: in keeping order, a sample near any sample
    already kept is a duplicate of the nearest such one; otherwise it is kept. Kept samples
    are never near each other."""
    neighbours: dict[str, list[tuple[float, str]]] = defaultdict(list)
    methods = pairs.column("method").to_pylist() if "method" in pairs.column_names else None
    method_of: dict[tuple[str, str], str] = {}
    for i, (a, b, score) in enumerate(
        zip(*(pairs.column(c).to_pylist() for c in PAIRS.names), strict=True)
    ):
        neighbours[a].append((score, b))
        neighbours[b].append((score, a))
        if methods is not None:
            method_of[(a, b)] = method_of[(b, a)] = methods[i]
    kept: set[str] = set()
    rows: dict[str, list[Any]] = {"sample_id": [], "duplicate_of": [], "method": [], "score": []}
    last = len(order)
    for sample in sorted(neighbours, key=lambda s: (order.get(s, last), s)):
        near = [(score, other) for score, other in neighbours[sample] if other in kept]
        if not near:
            kept.add(sample)
            continue
        score, other = max(near, key=lambda n: (n[0], -order.get(n[1], last)))
        rows["sample_id"].append(sample)
        rows["duplicate_of"].append(other)
        rows["method"].append(method_of.get((sample, other)))
        rows["score"].append(score)
    return pa.table(
        {
            "sample_id": pa.array(rows["sample_id"], pa.string()),
            "duplicate_of": pa.array(rows["duplicate_of"], pa.string()),
            "method": pa.array(rows["method"], pa.string()),
            "score": pa.array(rows["score"], pa.float32()),
        }
    )
