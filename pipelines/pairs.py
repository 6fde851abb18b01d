"""Near pairs among millions of fingerprints, found by Ray tasks: no worker holds them all.

``cosine_pairs`` is SemDeDup's search (Abbas et al., 2023): k-means on a sample
of the unit vectors (faiss), every vector sent to its nearest centroid, then
all pairs within each cluster compared in blocks. A pair split across two
clusters is missed, as in SemDeDup; ``probes=2`` also sends each vector to its
second-nearest centroid, at twice the work. ``minhash_pairs`` is MinHash-LSH:
signatures cut into bands, rows that share a band's values land in one bucket,
and each bucket's pairs are scored by their signatures' agreement (the Jaccard
estimate). Both return ``(a, b, score)`` with ``a < b``, each pair once, at or
above the threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.schema import list_of

PAIRS = pa.schema([("a", pa.string()), ("b", pa.string()), ("score", pa.float32())])
BLOCK_CELLS = 2**24  # score cells compared at once: 64 MiB of float32
FIT_ROWS = 100_000  # k-means fits on at most this many sampled vectors
SLACK = 1e-6  # float32 rounding allowed under a threshold
# more identical fingerprints than this in one group are linked to one of them (a star)
# instead of every pair: 20k copies of one caption would otherwise be 2e8 pairs
IDENTICAL_RUN = 1000


def matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A ``list<number>`` column of equal-length rows as a 2-D array (one copy at most)."""
    flat = pc.list_flatten(column)
    values = flat.to_numpy() if isinstance(flat, pa.Array) else flat.combine_chunks().to_numpy()
    return values.reshape(len(column), -1) if len(column) else values.reshape(0, 0)


def collect(ds: Any) -> pa.Table:
    """A Ray Dataset's rows as one Arrow table on the driver."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def vectors_column(rows: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """Equal-length 1-D arrays as a ``list<value_type>`` column (``matrix``'s inverse)."""
    width = len(rows[0]) if rows else 0
    flat = np.concatenate(rows) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(
        pa.array(np.arange(len(rows) + 1, dtype=np.int32) * width),
        pa.array(flat.astype(value_type.to_pandas_dtype()), value_type),
        type=list_of(value_type),
    )


def cosine_pairs(
    ds: Any, threshold: float, *, cluster_rows: int = 2000, probes: int = 1, seed: int = 0
) -> pa.Table:
    """Pairs of rows of ``ds`` (``sample_id``, unit-vector ``fingerprint``) whose cosine is at
    least ``threshold``; clusters of about ``cluster_rows`` rows bound each task's work."""
    rows = ds.count()
    clusters = max(1, rows // cluster_rows)
    if rows < 2:
        return PAIRS.empty_table()
    if clusters == 1:
        return pairs_in_group(collect(ds), threshold=threshold, kind="cosine")
    centroids = fit_centroids(ds, rows, clusters, seed)
    assigned = ds.map_batches(
        assign_clusters,
        fn_kwargs={"centroids": centroids, "probes": probes},
        batch_format="pyarrow",
    )
    found = assigned.groupby("cluster").map_groups(
        pairs_in_group, fn_kwargs={"threshold": threshold, "kind": "cosine"}, batch_format="pyarrow"
    )
    return unique_pairs(found)


def fit_centroids(ds: Any, rows: int, clusters: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids fitted on a random sample of at most ``FIT_ROWS`` rows."""
    import faiss

    sample = ds.select_columns(["fingerprint"])
    if rows > FIT_ROWS:
        sample = sample.random_sample(FIT_ROWS / rows, seed=seed)
    vectors = np.ascontiguousarray(matrix(collect(sample).column("fingerprint")), np.float32)
    clusters = min(clusters, len(vectors))
    kmeans = faiss.Kmeans(
        vectors.shape[1], clusters, niter=20, seed=seed, spherical=True, min_points_per_centroid=1
    )
    kmeans.train(vectors)
    return kmeans.centroids


def assign_clusters(batch: pa.Table, *, centroids: np.ndarray, probes: int) -> pa.Table:
    """Each row once per nearest centroid (``probes`` of them), with a ``cluster`` column."""
    vectors = matrix(batch.column("fingerprint")).astype(np.float32, copy=False)
    probes = min(probes, len(centroids))
    nearest = np.argsort(-(vectors @ centroids.T), axis=1)[:, :probes]
    rows = np.repeat(np.arange(batch.num_rows), probes)
    out = batch.take(pa.array(rows))
    return out.append_column("cluster", pa.array(nearest.reshape(-1).astype(np.int32)))


def pairs_in_group(group: pa.Table, *, threshold: float, kind: str) -> pa.Table:
    """Every pair of one cluster or bucket at or above ``threshold``, compared in blocks:
    cosine of unit vectors, or the share of equal MinHash values."""
    group = group.sort_by("sample_id")
    ids = group.column("sample_id").to_numpy(zero_copy_only=False)
    values = matrix(group.column("fingerprint"))
    ids, values, stars = _collapse_identical(ids, values)
    count = len(ids)
    if count < 2:
        return stars
    step = max(1, BLOCK_CELLS // (count * (values.shape[1] if kind == "minhash" else 1)))
    found_a, found_b, found_s = [], [], []
    for start in range(0, count, step):
        block = values[start : start + step]
        if kind == "cosine":
            scores = block @ values[start:].T
        else:
            scores = (block[:, None, :] == values[None, start:, :]).mean(axis=2)
        # column j is row start + j, so j > i; the slack keeps a float32 self-product of a
        # unit vector (0.99999994) at a threshold of 1
        upper = np.triu(scores >= threshold - SLACK, k=1)
        i, j = np.nonzero(upper)
        found_a.append(ids[start + i])
        found_b.append(ids[start + j])
        found_s.append(scores[i, j].astype(np.float32))
    found = pa.table(
        {
            "a": pa.array(np.concatenate(found_a), pa.string()),
            "b": pa.array(np.concatenate(found_b), pa.string()),
            "score": pa.array(np.concatenate(found_s), pa.float32()),
        },
        schema=PAIRS,
    )
    return pa.concat_tables([found, stars]) if stars.num_rows else found


def _collapse_identical(
    ids: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """Runs of more than ``IDENTICAL_RUN`` identical fingerprints (ids sorted) keep their
    first member for the comparisons; the others become pairs with it at score 1."""
    if len(ids) <= IDENTICAL_RUN:
        return ids, values, PAIRS.empty_table()
    import pandas as pd  # here: the spec (which names this module's options) loads fast

    keys = pd.util.hash_pandas_object(pd.DataFrame(values), index=False).to_numpy()
    _, first, inverse, counts = np.unique(
        keys, return_index=True, return_inverse=True, return_counts=True
    )
    folded = (counts[inverse] > IDENTICAL_RUN) & (np.arange(len(ids)) != first[inverse])
    if not folded.any():
        return ids, values, PAIRS.empty_table()
    stars = pa.table(
        {
            "a": pa.array(ids[first[inverse][folded]], pa.string()),
            "b": pa.array(ids[folded], pa.string()),
            "score": pa.array(np.ones(int(folded.sum()), np.float32)),
        },
        schema=PAIRS,
    )
    return ids[~folded], values[~folded], stars


def minhash_pairs(ds: Any, threshold: float, num_perm: int) -> pa.Table:
    """Pairs of rows of ``ds`` (``sample_id``, uint32 MinHash ``fingerprint``) whose estimated
    Jaccard similarity is at least ``threshold``, through LSH bands (datasketch's choice of
    bands and rows for the threshold, false positives and negatives weighted alike)."""
    from datasketch.lsh import _optimal_param

    bands, width = _optimal_param(threshold, num_perm, 0.5, 0.5)
    bucketed = ds.map_batches(
        band_buckets, fn_kwargs={"bands": bands, "width": width}, batch_format="pyarrow"
    )
    found = bucketed.groupby("bucket").map_groups(
        pairs_in_group,
        fn_kwargs={"threshold": threshold, "kind": "minhash"},
        batch_format="pyarrow",
    )
    return unique_pairs(found)


def band_buckets(batch: pa.Table, *, bands: int, width: int) -> pa.Table:
    """Each row once per band, keyed by a 64-bit hash of (band, the band's values)."""
    import pandas as pd

    signatures = matrix(batch.column("fingerprint"))
    keys = []
    for band in range(bands):
        frame = pd.DataFrame(signatures[:, band * width : (band + 1) * width])
        frame["band"] = band
        keys.append(pd.util.hash_pandas_object(frame, index=False).to_numpy())
    rows = np.tile(np.arange(batch.num_rows), bands)
    out = batch.take(pa.array(rows))
    return out.append_column("bucket", pa.array(np.concatenate(keys) if keys else [], pa.uint64()))


def unique_pairs(found: Any) -> pa.Table:
    """The pairs of a Ray Dataset of pair tables, each pair once (found by several clusters or
    bands: the same score)."""
    pairs = collect(found)
    if not pairs.num_rows:
        return PAIRS.empty_table()
    pairs = pairs.select(PAIRS.names).cast(PAIRS)
    unique = pairs.group_by(["a", "b"]).aggregate([("score", "max")])
    unique = unique.rename_columns(["a", "b", "score"]).select(PAIRS.names)
    return unique.sort_by([("a", "ascending"), ("b", "ascending")])
