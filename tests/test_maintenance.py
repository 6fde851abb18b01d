"""Diff, vacuum, optimize and lineage on a pipeline-built store with two builds."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from features.errors import StoreError
from features.maintenance import diff, lineage, optimize, vacuum
from features.store import FeatureStore
from jobs.cli_query import register
from pipelines.build import build
from tests.helpers import corpus_sources, make_spec


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory, ray_session):
    """Samples v1: photos; v2: + catalog and shards. Returns the store and both builds' results."""
    root = tmp_path_factory.mktemp("catalog") / "store"
    sources = corpus_sources(corpus, broken=False)
    first = build(make_spec(root, sources[:1]))
    second = build(make_spec(root, sources))
    return FeatureStore(str(root)), first, second


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the built store, for tests that change files."""
    store = built[0]
    shutil.copytree(store.uri, tmp_path / "store")
    return FeatureStore(str(tmp_path / "store"))


def ids(store, version=None) -> set[str]:
    return set(store.to_arrow("samples", version, columns=["sample_id"]).column(0).to_pylist())


def test_diff_lists_keys_added_and_removed(built):
    store, first, second = built
    d = diff(store, "samples", 1, 2)
    assert set(d.added.column("sample_id").to_pylist()) == ids(store) - ids(store, 1)
    assert d.added.num_rows == second.counts["samples"]
    assert d.removed.num_rows == 0
    assert d.files_added >= 1
    assert d.files_removed == 0
    back = diff(store, "samples", 2, 0)
    assert back.removed.num_rows == len(ids(store))
    assert back.added.num_rows == 0
    assert diff(store, "samples", 1).v2 == store.version("samples")
    with pytest.raises(StoreError, match="no version 7"):
        diff(store, "samples", 1, 7)


def test_optimize_compacts_files_and_diff_sees_only_rewrites(copy):
    before = len(copy.delta("samples").file_uris())
    assert before > 1
    rows = ids(copy)
    result = optimize(copy, "samples")
    assert result["files_after"] < before
    assert result["files_after"] == len(copy.delta("samples").file_uris())
    assert ids(copy) == rows
    d = diff(copy, "samples", result["version"] - 1, result["version"])
    assert (d.added.num_rows, d.removed.num_rows, d.rewritten) == (0, 0, len(rows))


def test_vacuum_lists_first_and_needs_force_below_retention(copy):
    optimize(copy, "samples")
    # a file no commit references, as a killed job leaves behind
    orphan = f"{copy.table_uri('samples')}/part-killed-job.parquet"
    pq.write_table(pa.table({"sample_id": ["x"]}), orphan)
    assert not any(vacuum(copy).values())  # default retention: everything is too young
    with pytest.raises(StoreError, match="shorter than the tables' minimum.*--force"):
        vacuum(copy, retention_hours=0)
    planned = vacuum(copy, retention_hours=0, force=True)
    assert "part-killed-job.parquet" in planned["samples"]
    assert len(planned["samples"]) > 1  # the files optimize replaced, too
    assert shutil.os.path.exists(orphan)  # a dry run deletes nothing
    deleted = vacuum(copy, retention_hours=0, dry_run=False, force=True)
    assert deleted["samples"] == planned["samples"]
    assert not shutil.os.path.exists(orphan)
    assert len(ids(copy)) == copy.to_arrow("samples").num_rows


def test_lineage_names_the_run_spec_and_code_of_each_version(built):
    store, first, second = built
    rows = {r["version"]: r for r in lineage(store, "samples")}
    assert rows[1]["run_id"] == first.run_id
    assert rows[2]["run_id"] == second.run_id
    runs = {r["run_id"]: r for r in store.to_arrow("_runs").to_pylist()}
    for version in (1, 2):
        run = runs[rows[version]["run_id"]]
        assert rows[version]["spec_hash"] == run["spec_hash"]
        assert rows[version]["code_version"] == run["code_version"]
        assert rows[version]["kind"] == "build"


def test_cli_store_commands(copy):
    app, store_app = typer.Typer(), typer.Typer()
    app.add_typer(store_app, name="store")
    register(app, store_app)
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, ["store", *args, "--store", copy.uri])

    result = run("diff", "samples", "1", "2")
    assert result.exit_code == 0, result.output
    assert "samples v1 -> v2: +" in result.output
    result = run("vacuum", "--retention-hours", "0")
    assert result.exit_code == 2
    assert "--force" in result.output
    assert "Traceback" not in result.output
    result = run("optimize", "samples")
    assert result.exit_code == 0, result.output
    result = run("vacuum", "--retention-hours", "0", "--force")
    assert result.exit_code == 0, result.output
    assert "would delete" in result.output
    assert "dry run" in result.output
    result = run("lineage", "samples")
    assert result.exit_code == 0, result.output
    assert "OPTIMIZE" in result.output
    result = run("diff", "nope", "1")
    assert result.exit_code == 2
    assert "no key known for table 'nope'" in result.output
