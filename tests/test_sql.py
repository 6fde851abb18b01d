"""SQL over a pipeline-built store: versions, time travel, output formats, errors."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from features.errors import StoreError
from features.sql import run_sql, write_result
from features.store import FeatureStore
from jobs.cli_query import register
from jobs.report import print_relation
from pipelines.build import build
from tests.helpers import corpus_sources, make_spec
from tests.test_search import write_feature_set

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory, ray_session):
    """Two builds: photos only (samples v1), then the catalog and shards too (v2)."""
    root = tmp_path_factory.mktemp("sql") / "store"
    sources = corpus_sources(corpus)
    build(make_spec(root, sources[:1]))
    time.sleep(0.05)
    between = datetime.now(UTC)
    time.sleep(0.05)
    build(make_spec(root, sources))
    store = FeatureStore(str(root))
    keys = store.to_arrow("samples", columns=["sample_id", "split", "label"])
    write_feature_set(store, "clip", keys, {"emb": np.eye(keys.num_rows, 4, dtype=np.float32)
                                           + 0.1})  # fmt: skip
    return store, corpus["counts"]["photos"], between


def count(store, query, **kw) -> int:
    return run_sql(store, query, **kw).fetchall()[0][0]


def test_latest_and_pinned_versions(built):
    store, photos, _ = built
    total = store.to_arrow("samples", columns=["sample_id"]).num_rows
    assert total > photos
    assert count(store, "SELECT count(*) FROM samples") == total
    assert count(store, "SELECT count(*) FROM samples", version=1) == photos
    assert count(store, "SELECT count(*) FROM samples", version={"samples": 1}) == photos
    assert count(store, 'SELECT count(*) FROM "samples@1"') == photos
    both = 'SELECT (SELECT count(*) FROM samples) - (SELECT count(*) FROM "samples@1")'
    assert count(store, both) == total - photos


def test_as_of_reads_each_table_at_that_time(built):
    store, photos, between = built
    q = "SELECT count(*) FROM samples s JOIN _runs r ON s.run_id = r.run_id"
    assert count(store, q, as_of=between) == photos
    assert count(store, q, as_of=between.isoformat()) == photos
    with pytest.raises(StoreError, match="did not exist at 2000-01-01"):
        run_sql(store, "SELECT * FROM samples", as_of="2000-01-01T00:00:00+00:00")


def test_feature_sets_answer_to_three_names(built):
    store, _, _ = built
    n = count(store, "SELECT count(*) FROM samples")
    for name in ('"features/clip"', "clip", "features__clip"):
        assert count(store, f"SELECT count(*) FROM {name}") == n
    joined = "SELECT count(*) FROM clip JOIN samples USING (sample_id) WHERE clip.split = 'train'"
    assert count(store, joined) == count(store, "SELECT count(*) FROM samples WHERE split='train'")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"query": "SELECT * FROM nope"},
            r"Table with name nope does not exist! \(tables: .*_runs.*samples",
        ),
        ({"query": "SELECT nope FROM samples"}, r'column "nope" not found'),
        ({"query": "SELEC 1"}, "syntax error"),
        ({"query": "SELECT * FROM samples", "version": 99}, r"no version 99 \(versions 0\.\.2"),
        ({"query": 'SELECT * FROM "samples@99"'}, "no version"),
        ({"query": "SELECT * FROM samples", "version": "yesterday"}, "bad version or time"),
        ({"query": "SELECT * FROM samples, _runs", "version": 1}, "applies to one table"),
        ({"query": "SELECT 1", "version": {"nope": 1}}, "unknown table 'nope'"),
    ],
)
def test_errors_are_store_errors_naming_the_problem(built, kwargs, match):
    store, _, _ = built
    with pytest.raises(StoreError, match=match):
        run_sql(store, **kwargs).fetchall()


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "COPY (SELECT * FROM samples) TO '/tmp/mmfp-leak.csv'",
        "ATTACH '/tmp/mmfp-leak.db'",
        "INSTALL httpfs",
        "SET disabled_filesystems = ''",
        "SET lock_configuration = false",
        "SELECT * FROM glob('/etc/*')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_blob('/etc/hostname')",
        "COPY (SELECT 1 AS x) TO '{store}/samples/_delta_log/99999999999999999999.json'",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
        "LOAD httpfs",
        "CREATE SECRET (TYPE s3, KEY_ID 'x', SECRET 'y')",
        "SELECT 1; SELECT * FROM read_text('/etc/hostname')",
    ],
)
def test_queries_cannot_reach_files_or_change_the_connection(built, query):
    """The one DuckDB door (features.duck.connect): registered tables only."""
    store, _, _ = built
    with pytest.raises(StoreError, match="SQL failed"):
        run_sql(store, query.format(store=store.uri)).fetchall()
    assert not list((Path(store.uri) / "samples" / "_delta_log").glob("9999*"))


def test_the_connection_does_not_need_a_working_directory(tmp_path):
    """Ray may remove a job's working_dir under it; DuckDB must still open."""
    code = (
        "import os; os.chdir(os.environ['GONE']); os.rmdir(os.environ['GONE']);"
        "from features.duck import connect; import pyarrow as pa;"
        "print(connect({'t': pa.table({'a': [1, 2]})}).sql('SELECT sum(a) FROM t').fetchall())"
    )
    gone = tmp_path / "gone"
    gone.mkdir()
    env = {**os.environ, "GONE": str(gone), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "[(3,)]" in proc.stdout


QUERY = "SELECT sample_id, split, modalities, image_width, ingested_at FROM samples ORDER BY 1"


def test_every_format_round_trips(built, tmp_path):
    store, _, _ = built
    expected = run_sql(store, QUERY).to_arrow_table()
    n = write_result(run_sql(store, QUERY), "parquet", tmp_path / "r.parquet", batch_rows=7)
    assert n == expected.num_rows
    assert pq.read_table(tmp_path / "r.parquet").equals(expected)
    write_result(run_sql(store, QUERY), "csv", tmp_path / "r.csv", batch_rows=7)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert [r["sample_id"] for r in rows] == expected.column("sample_id").to_pylist()
    assert json.loads(rows[0]["modalities"]) == expected.column("modalities")[0].as_py()
    write_result(run_sql(store, QUERY), "json", tmp_path / "r.jsonl", batch_rows=7)
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in lines] == expected.column("sample_id").to_pylist()
    assert lines[0]["modalities"] == expected.column("modalities")[0].as_py()
    assert datetime.fromisoformat(lines[0]["ingested_at"])
    shown = print_relation(run_sql(store, QUERY), max_rows=5, out=tmp_path / "r.txt")
    text = (tmp_path / "r.txt").read_text()
    assert shown == 5
    assert "first 5 rows shown" in text
    assert expected.column("sample_id")[0].as_py()[:10] in text


def test_output_streams_in_batches(built):
    store, _, _ = built
    sink = io.BytesIO()
    rel = run_sql(store, "SELECT range AS i FROM range(200000)")
    assert write_result(rel, "csv", sink, batch_rows=10_000) == 200_000
    assert sink.getvalue().count(b"\n") == 200_001


def app() -> typer.Typer:
    main, store_app = typer.Typer(), typer.Typer()
    main.add_typer(store_app, name="store")
    register(main, store_app)
    return main


def test_cli_query_formats_and_errors(built):
    store, photos, _ = built
    runner = CliRunner()
    ok = runner.invoke(app(), ["query", "SELECT count(*) AS n FROM samples", "--store", store.uri,
                               "--version", "samples=1", "-f", "csv"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert list(csv.reader(io.StringIO(ok.stdout))) == [["n"], [str(photos)]]
    ok = runner.invoke(app(), ["query", "SELECT split FROM samples", "--store", store.uri])
    assert ok.exit_code == 0, ok.output
    assert "split" in ok.stdout
    for args, match in [
        (["SELECT * FROM nope"], "Table with name nope does not exist"),
        (["SELECT * FROM samples", "--version", "99"], "has no version 99"),
        (["SELECT * FROM samples", "-f", "parquet"], "needs --out FILE"),
    ]:
        bad = runner.invoke(app(), ["query", *args, "--store", store.uri])
        assert bad.exit_code == 2, bad.output
        assert match in bad.output
        assert "Traceback" not in bad.output
        assert len(bad.output.strip().splitlines()) == 1
