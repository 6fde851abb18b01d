"""One version resolver for every command: a number, an ISO time, or an error naming the range.

Regression: ``mmfp search clip --version 1`` once read "1" as a timestamp and answered
"no version '1'" while ``mmfp query --version features/clip=1`` worked.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from features import FeatureStore, StoreError, parse_version
from jobs.cli import app

runner = CliRunner()


def test_parse_version():
    assert parse_version("3") == 3
    assert parse_version(" 12 ") == 12
    assert parse_version(4) == 4
    at = parse_version("2026-11-25T01:30:00+00:00")
    assert at == datetime(2026, 11, 25, 1, 30, tzinfo=UTC)
    assert parse_version("2026-11-25T01:30:00").tzinfo is not None  # naive: local time
    for bad in ("yesterday", "-1", -1, "1.5", True):
        with pytest.raises(StoreError, match="bad version"):
            parse_version(bad)


@pytest.fixture(scope="module")
def demo_store(demo) -> FeatureStore:
    workdir, _ = demo
    return FeatureStore(str(workdir / "store"))


def _commands(store: FeatureStore, version: str) -> list[list[str]]:
    sample = store.to_arrow("samples", columns=["sample_id"]).column(0)[0].as_py()
    where = ["--store", store.uri]
    return [
        ["search", "clip", "--column", "image_emb", "--id", sample, "--version", version, *where],
        ["store", "stats", "features/clip", "--version", version, *where],
        ["store", "index", "clip", "--column", "image_emb", "--version", version, *where],
        ["query", 'SELECT count(*) FROM "features/clip"', "--version", version, *where],
        ["query", "SELECT count(*) FROM clip", "--version", f"features/clip={version}", *where],
        ["store", "diff", "features/clip", version, *where],
    ]


def test_every_command_reads_a_version_number(demo_store):
    latest = demo_store.version("features/clip")
    for args in _commands(demo_store, str(latest)):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{args}: {result.output}"


def test_every_command_reads_an_iso_time(demo_store):
    now = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    for args in _commands(demo_store, now):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{args}: {result.output}"


def test_every_command_names_a_missing_version(demo_store):
    latest = demo_store.version("features/clip")
    for args in _commands(demo_store, "99"):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, f"{args}: {result.output}"
        assert f"has no version 99 (versions 0..{latest}" in result.output
        assert "Traceback" not in result.output
    before = "2000-01-01T00:00:00+00:00"
    for args in _commands(demo_store, before):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, f"{args}: {result.output}"
        assert "did not exist at 2000-01-01" in result.output


def test_the_python_api_takes_the_same_versions(demo_store):
    latest = demo_store.version("samples")
    assert demo_store.delta("samples", str(latest)).version() == latest
    assert demo_store.delta("samples", latest).version() == latest
    assert demo_store.delta("samples", datetime.now(UTC)).version() == latest
    with pytest.raises(StoreError, match="has no version 99"):
        demo_store.to_arrow("samples", "99")
