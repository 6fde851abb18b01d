"""Vector search over feature sets of a pipeline-built store: exact, filtered, approximate."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import typer
from deltalake import write_deltalake
from typer.testing import CliRunner

from features.ann import build_index
from features.errors import StoreError
from features.metadata import ColumnMeta, EncoderMeta, FeatureSetMeta
from features.schema import ORIGINAL_VIEW, conform, feature_schema, list_of
from features.search import search
from features.storage import filesystem_for
from features.store import FeatureStore
from jobs.cli_query import register
from pipelines.build import build
from tests.helpers import corpus_sources, make_spec
from tests.test_object_storage import BUCKET
from tests.test_object_storage import s3_options as s3_options  # the moto server fixture

DIM = 16


def write_feature_set(
    store: FeatureStore,
    name: str,
    keys: pa.Table,
    columns: dict[str, list | np.ndarray],
    *,
    normalized: bool = True,
) -> None:
    """Append ``features/<name>`` rows: ``keys`` (sample_id, view, split, label, ...) + embeddings.

    A stand-in for the encode stage: the table contract of features/schema.py,
    with each column's shape in its ``FeatureSetMeta``.
    """
    dims = {c: next(len(v) for v in vs if v is not None) for c, vs in columns.items()}
    meta = FeatureSetMeta(
        encoders=[EncoderMeta(name="test", version="0", config_hash="0")],
        columns={
            c: ColumnMeta(shape=[d], encoder="test", normalized=normalized) for c, d in dims.items()
        },
    )
    schema = feature_schema({c: list_of(pa.float32()) for c in columns})
    table = f"features/{name}"
    store.ensure_table(table, schema=schema, properties=meta.to_properties())
    data = {c: keys.column(c) for c in keys.column_names}
    if "view" not in data:
        data["view"] = pa.array(np.full(keys.num_rows, ORIGINAL_VIEW, np.int32))
    for c, vectors in columns.items():
        data[c] = pa.array([None if v is None else np.asarray(v, np.float32) for v in vectors])
    write_deltalake(
        store.table_uri(table),
        conform(pa.table(data), schema),
        mode="append",
        storage_options=store.storage_options or None,
    )


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def store(corpus, tmp_path_factory, ray_session):
    """The corpus built by the pipeline, plus feature set ``clip``: label centre + noise.

    Text-only samples get no ``image_emb`` (a null, as the encode stage writes).
    """
    root = tmp_path_factory.mktemp("search") / "store"
    build(make_spec(root, corpus_sources(corpus, broken=False)))
    fs = FeatureStore(str(root))
    keys = fs.to_arrow("samples", columns=["sample_id", "split", "label", "modalities"])
    rng = np.random.default_rng(0)
    labels = sorted(set(keys.column("label").to_pylist()) - {None})
    centres = {label: rng.standard_normal(DIM) for label in labels}
    image, text = [], []
    for row in keys.to_pylist():
        centre = centres.get(row["label"], np.zeros(DIM))
        image.append(unit(centre + 0.3 * rng.standard_normal(DIM)))
        if "image" not in row["modalities"]:
            image[-1] = None
        text.append(unit(rng.standard_normal(DIM + 8)))
    write_feature_set(fs, "clip", keys, {"image_emb": image, "text_emb": text})
    write_feature_set(
        fs,
        "solo",
        keys,
        {"emb": [v if v is not None else t[:DIM] for v, t in zip(image, text, strict=True)]},
    )
    return fs


def brute_force(store, column="image_emb", name="clip", mask=None):
    rows = store.to_arrow(f"features/{name}").to_pylist()
    rows = [r for r in rows if r[column] is not None and (mask is None or mask(r))]
    return rows, np.array([r[column] for r in rows], np.float32)


@pytest.mark.parametrize("mode", [{"chunk_rows": 7}, {"cache": True}])
def test_vector_query_matches_brute_force(store, mode):
    rows, matrix = brute_force(store)
    q = unit(np.random.default_rng(1).standard_normal(DIM))
    hits = search(store, "clip", column="image_emb", vector=q * 3, k=5, **mode)
    expected = np.argsort(-(matrix @ q))[:5]
    assert hits.column("sample_id").to_pylist() == [rows[i]["sample_id"] for i in expected]
    np.testing.assert_allclose(hits.column("score").to_numpy(), (matrix @ q)[expected], rtol=1e-5)
    assert hits.column_names[:5] == ["sample_id", "view", "score", "split", "label"]
    assert {"source", "source_uri", "text", "metadata"} <= set(hits.column_names)


def test_sample_id_query_finds_its_label_and_leaves_itself_out(store):
    rows, _ = brute_force(store)
    me = next(r for r in rows if r["label"])
    hits = search(store, "clip", column="image_emb", sample_id=me["sample_id"], k=3)
    assert me["sample_id"] not in hits.column("sample_id").to_pylist()
    assert hits.column("label").to_pylist() == [me["label"]] * 3
    scores = hits.column("score").to_numpy()
    assert (np.diff(scores) <= 0).all()


def test_a_batch_of_queries_answers_what_each_query_alone_does(store):
    """One product for several queries (what a service batches), each with its own k,
    filter and exclusions: the same hits as searching one at a time."""
    from features.search import ExactQuery, ResidentColumn, ResidentSamples
    from features.vectors import where_rows

    column = ResidentColumn.load(store, "clip", "image_emb")
    rng = np.random.default_rng(5)
    me = column.keys.column("sample_id")[0].as_py()
    asked = [(unit(rng.standard_normal(DIM)), 3, None, ()),
             (unit(rng.standard_normal(DIM)), 7, "split = 'train'", ()),
             (column.vector_of(me), 4, None, (me,))]  # fmt: skip
    alone = [column.search(store, q, k, where=w, exclude=x) for q, k, w, x in asked]
    queries = [ExactQuery(q, k, None if w is None else where_rows(store, column.keys, w), x)
               for q, k, w, x in asked]  # fmt: skip
    together = column.search_many(store, queries, samples=ResidentSamples.load(store))
    assert [t.num_rows for t in together] == [3, 7, 4]
    for one, batched in zip(alone, together, strict=True):  # scores: a matrix product's rounding
        np.testing.assert_allclose(one["score"].to_numpy(), batched["score"].to_numpy(), 1e-6)
        assert one.drop_columns(["score"]).equals(batched.drop_columns(["score"]))
    assert set(together[1]["split"].to_pylist()) == {"train"}
    assert me not in together[2]["sample_id"].to_pylist()


@pytest.mark.parametrize("cache", [False, True])
def test_where_filters_on_feature_and_sample_columns(store, cache):
    q = unit(np.random.default_rng(2).standard_normal(DIM))
    hits = search(store, "clip", column="image_emb", vector=q, k=100, where="split = 'train'",
                  cache=cache)  # fmt: skip
    rows, matrix = brute_force(store, mask=lambda r: r["split"] == "train")
    assert hits.num_rows == len(rows)
    assert set(hits.column("split").to_pylist()) == {"train"}
    hits = search(store, "clip", column="image_emb", vector=q, k=4,
                  where="source = 'catalog' AND label IS NOT NULL", cache=cache)  # fmt: skip
    assert set(hits.column("source").to_pylist()) == {"catalog"}
    assert hits.num_rows == 4
    audio = "list_contains(modalities, 'audio') AND view = -1"
    hits = search(store, "clip", column="image_emb", vector=q, k=100, where=audio, cache=cache)
    rows, _ = brute_force(store, mask=lambda r: "audio" in r["modalities"])
    assert sorted(hits.column("sample_id").to_pylist()) == sorted(r["sample_id"] for r in rows)


def test_refusals_name_the_problem(store):
    with pytest.raises(
        StoreError, match="query vector has 8 dims but features/clip.image_emb has 16"
    ):
        search(store, "clip", column="image_emb", vector=np.ones(8))
    with pytest.raises(StoreError, match="several embedding columns"):
        search(store, "clip", vector=np.ones(DIM))
    with pytest.raises(StoreError, match="no embedding column 'nope'"):
        search(store, "clip", column="nope", vector=np.ones(DIM))
    with pytest.raises(StoreError, match="no table 'features/missing'"):
        search(store, "missing", vector=np.ones(DIM))
    with pytest.raises(StoreError, match="no row sample_id='nope'"):
        search(store, "solo", sample_id="nope")
    with pytest.raises(StoreError, match="search filter failed"):
        search(store, "solo", vector=np.ones(DIM), where="no_such_column = 1")
    assert search(store, "solo", vector=np.ones(DIM), k=2).num_rows == 2  # one column: no --column


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize(
    "where",
    [
        "split = 'train') OR (1 = 1",  # breaking out of the parentheses
        "1 = 1; COPY (SELECT 1) TO '{leak}'",  # a second statement
        "split = 'train' UNION SELECT * FROM f",
        "1 = 1 LIMIT 1",
    ],
)
def test_a_filter_is_one_expression(store, tmp_path, where, cache):
    """``--where`` is parsed as one SQL expression and applied as a filter, never pasted."""
    leak = tmp_path / "leak.csv"
    with pytest.raises(StoreError, match="search filter failed"):
        search(store, "solo", vector=np.ones(DIM), where=where.format(leak=leak), cache=cache)
    assert not leak.exists()


def test_ann_recall_at_10_on_random_data(tmp_path):
    """20k x 64 Gaussian vectors (the hard case for IVF): tuned nprobe holds recall@10."""
    store = FeatureStore(str(tmp_path / "ann"))
    rng = np.random.default_rng(3)
    vectors = unit(rng.standard_normal((20_000, 64)))
    ids = [f"s{i:05d}" for i in range(len(vectors))]
    keys = pa.table({"sample_id": ids, "split": ["train"] * len(ids), "label": [None] * len(ids)})
    write_feature_set(store, "rand", keys, {"emb": vectors})
    meta = build_index(store, "rand", target_recall=0.95)
    assert meta["recall_at_10"] >= 0.95
    assert meta["nprobe"] <= meta["nlist"]
    queries = unit(rng.standard_normal((30, 64)))
    found = []
    for q in queries:
        exact = search(store, "rand", vector=q, k=10, cache=True)
        approx = search(store, "rand", vector=q, k=10, method="ann")
        found.append(
            len(set(exact["sample_id"].to_pylist()) & set(approx["sample_id"].to_pylist()))
        )
    assert np.mean(found) / 10 >= 0.9
    assert meta["nprobe"] < meta["nlist"]  # so the filtered query below needs every list
    few = ids[::400]  # 50 rows spread over the lists: the probed ones hold only some
    where = f"sample_id IN ({', '.join(repr(i) for i in few)})"
    approx = search(store, "rand", vector=queries[0], k=100, method="ann", where=where)
    assert sorted(approx["sample_id"].to_pylist()) == few


def test_ann_index_is_per_version_and_honours_filters(store):
    with pytest.raises(StoreError, match="no index for features/solo.emb"):
        search(store, "solo", vector=np.ones(DIM), method="ann")
    meta = build_index(store, "solo")
    assert meta["uri"].endswith(f"_indexes/solo/v{meta['version']}")
    me = store.to_arrow("features/solo", columns=["sample_id"]).column(0)[0].as_py()
    hits = search(store, "solo", sample_id=me, k=5, method="ann", where="split = 'train'")
    assert me not in hits.column("sample_id").to_pylist()
    assert set(hits.column("split").to_pylist()) <= {"train"}
    exact = search(store, "solo", sample_id=me, k=5, where="split = 'train'")
    assert hits.column("sample_id").to_pylist() == exact.column("sample_id").to_pylist()
    images = "list_contains(modalities, 'image')"
    hits = search(store, "solo", vector=np.ones(DIM), k=500, method="ann", where=images)
    exact = search(store, "solo", vector=np.ones(DIM), k=500, where=images)
    assert hits.num_rows == exact.num_rows > 0


def test_cli_search(store, tmp_path):
    app, store_app = typer.Typer(), typer.Typer()
    app.add_typer(store_app, name="store")
    register(app, store_app)
    runner = CliRunner()
    me = store.to_arrow("features/solo", columns=["sample_id"]).column(0)[0].as_py()
    result = runner.invoke(app, ["search", "solo", "--id", me, "-k", "3", "--store", store.uri])
    assert result.exit_code == 0, result.output
    assert "top 3 in solo" in result.output
    np.save(tmp_path / "q.npy", np.ones(DIM + 1, np.float32))
    args = ["search", "solo", "--vector", str(tmp_path / "q.npy"), "--store", store.uri]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "has 17 dims but features/solo.emb has 16" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["store", "index", "solo", "--store", store.uri])
    assert result.exit_code == 0, result.output
    assert "recall@10" in result.output


def test_unnormalised_columns_are_scored_by_cosine(tmp_path):
    store = FeatureStore(str(tmp_path / "raw"))
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((50, 8)) * rng.uniform(0.1, 10, (50, 1))
    keys = pa.table({"sample_id": [f"r{i}" for i in range(50)], "split": ["train"] * 50,
                     "label": ["a"] * 50})  # fmt: skip
    write_feature_set(store, "raw", keys, {"emb": vectors}, normalized=False)
    q = unit(rng.standard_normal(8))
    hits = search(store, "raw", vector=q, k=5)
    cosine = unit(vectors) @ q
    assert hits["sample_id"].to_pylist() == [f"r{i}" for i in np.argsort(-cosine)[:5]]
    np.testing.assert_allclose(hits["score"].to_numpy(), np.sort(cosine)[::-1][:5], rtol=1e-5)


def test_sql_and_search_on_object_storage(s3_options, monkeypatch):
    from features.sql import run_sql

    options, _ = s3_options
    store = FeatureStore(f"s3://{BUCKET}/search-store", storage_options=options)
    rng = np.random.default_rng(5)
    vectors = unit(rng.standard_normal((300, 12)))
    keys = pa.table({"sample_id": [f"o{i:03d}" for i in range(300)],
                     "split": ["train", "val", "test"] * 100, "label": ["x"] * 300})  # fmt: skip
    write_feature_set(store, "objs", keys, {"emb": vectors})
    q = "SELECT split, count(*) AS n FROM objs GROUP BY split ORDER BY split"
    assert run_sql(store, q).fetchall() == [("test", 100), ("train", 100), ("val", 100)]
    hits = search(store, "objs", sample_id="o000", k=5, where="split <> 'val'")
    expected = [i for i in np.argsort(-(vectors @ vectors[0])) if i % 3 != 1 and i != 0][:5]
    assert hits["sample_id"].to_pylist() == [f"o{i:03d}" for i in expected]
    fs, root = filesystem_for(f"{store.uri}/_snapshots/objs/emb", options)

    made = fs.get_file_info(pafs.FileSelector(root))
    assert [i.extension for i in made] == ["arrow"]  # one data file, one snapshot
    monkeypatch.setattr("features.snapshots.file_matrices", None)  # read, not made again
    again = search(store, "objs", sample_id="o000", k=5, where="split <> 'val'")
    assert again["sample_id"].to_pylist() == hits["sample_id"].to_pylist()
    monkeypatch.undo()
    meta = build_index(store, "objs")
    assert meta["uri"].startswith(f"s3://{BUCKET}/search-store/_indexes/objs/v")
    approx = search(store, "objs", sample_id="o000", k=5, where="split <> 'val'", method="ann")
    assert approx["sample_id"].to_pylist() == hits["sample_id"].to_pylist()


def test_a_resident_column_follows_appends_by_reading_only_new_files(tmp_path):
    """An append stacks only the new files' rows under those held; a version that removed
    rows is loaded whole. Either way it equals a fresh load of that version."""
    from features.search import ResidentColumn
    from jobs.demo.synthetic_features import write_synthetic_feature_set

    store = FeatureStore(str(tmp_path))
    first = write_synthetic_feature_set(store, "syn", per_class=3, files=1)
    held = ResidentColumn.load(store, "syn", "image_emb", first)
    second = write_synthetic_feature_set(store, "syn", per_class=3, files=1, seed=5)

    def rows(column: ResidentColumn) -> list[str]:
        """Every (sample_id, view, vector), sorted: the same ids appear in both versions."""
        ids = column.keys.column("sample_id").to_pylist()
        views = column.keys.column("view").to_pylist()
        return sorted(
            f"{i} {v} {np.round(x, 5).tolist()}"
            for i, v, x in zip(ids, views, column.matrix, strict=True)
        )

    appended = held.at(store, second)
    assert appended.column.version == second
    assert appended.matrix.shape[0] == 2 * held.matrix.shape[0]
    fresh = ResidentColumn.load(store, "syn", "image_emb", second)
    assert rows(appended) == rows(fresh)
    gone = held.keys.column("sample_id")[0].as_py()
    store.delta("features/syn").delete(f"sample_id = '{gone}'")
    third = store.version("features/syn")
    after = appended.at(store, third)
    assert gone not in after.keys.column("sample_id").to_pylist()
    assert len(after.matrix) == len(ResidentColumn.load(store, "syn", "image_emb", third).matrix)
