"""What a hostile store, query or environment can make the CLI print: data is printed as
data, failures as one line, secrets never, and nothing is deleted that mmfp did not make."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from features.storage import redact
from features.store import FeatureStore
from jobs import submit as jobsubmit
from jobs.cli import app
from pipelines.build import build
from tests.helpers import make_spec

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
HOSTILE_TEXT = {
    "markup": "a caption with [/] and [link=http://evil]a link[/link] and [bold]",
    "ansi": "red \x1b[31mtext\x1b[0m then \x1b]0;title\x07 and a bell \x07",
    "nul": "nul \x00 inside",
    "rtl": "right-to-left \u202e override",
}


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory, ray_session) -> tuple[FeatureStore, str]:
    root = tmp_path_factory.mktemp("hostile-text")
    data = root / "[bold]data"  # markup in a path the build summary prints
    data.mkdir()
    for name, text in HOSTILE_TEXT.items():
        (data / f"{name}.txt").write_text(text)
    (data / "[link=x]bad.jpg").write_bytes(b"not an image")  # markup in a quarantine row
    spec = make_spec(root / "store", [{"kind": "directory", "uri": str(data)}])
    build(spec)
    return FeatureStore(str(root / "store")), str(data)


def _printed_safely(output: str) -> None:
    assert "\x1b[31m" not in output  # escape sequences from the data are shown, not obeyed
    assert "\x07" not in output
    assert "\x00" not in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    "args",
    [
        ["query", "SELECT text, source_uri FROM samples"],
        ["query", "SELECT uri, message FROM quarantine"],
        ["query", "SELECT * FROM samples", "-f", "json"],
        ["store", "describe", "samples"],
        ["store", "stats", "samples"],
        ["store", "history", "quarantine"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_hostile_text_is_printed_as_text(hostile_store, args):
    store, _ = hostile_store
    result = runner.invoke(app, [*args, "--store", store.uri])
    assert result.exit_code == 0, result.output
    _printed_safely(result.output)
    if args[0] == "query" and "text" in args[1]:
        assert "[/]" in result.output
        assert "\\x1b[31m" in result.output


def test_the_build_summary_prints_hostile_paths(tmp_path, ray_session):
    data = tmp_path / "[red]in \x1b[2J"
    data.mkdir()
    (data / "x.jpg").write_bytes(b"\x1b[31mnot an image")
    (data / "ok.txt").write_text("fine")
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"sources": [{"kind": "directory", "uri": str(data)}]}))
    result = runner.invoke(app, ["build", str(spec)])
    assert result.exit_code == 0, result.output
    _printed_safely(result.output)
    assert "quarantined by this run" in result.output  # the table with the hostile uri


# ---- failures that are not the user's --------------------------------------------------------


def test_a_corrupt_log_is_one_line_and_exit_1(hostile_store, tmp_path):
    store, _ = hostile_store
    broken = tmp_path / "store"
    shutil.copytree(store.uri, broken)
    log = sorted((broken / "samples" / "_delta_log").glob("*.json"))[-1]
    log.write_text('{"add": "not an action"')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "jobs", "query", "SELECT count(*) FROM samples", "--store"]
    proc = subprocess.run([*cmd, str(broken)], capture_output=True, text=True, env=env)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ")
    assert "--debug" in lines[1]
    assert "Traceback" not in proc.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "jobs", "--debug", *cmd[3:], str(broken)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr


def test_demo_fresh_never_deletes_a_folder_it_did_not_make(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    result = runner.invoke(app, ["demo", "--workdir", str(home), "--fresh", "--no-train"])
    assert result.exit_code == 2
    assert "was not made by `mmfp demo`" in result.output
    assert (home / "thesis.tex").read_text() == "years of work"
    result = runner.invoke(app, ["demo", "--workdir", str(home), "--no-train"])
    assert result.exit_code == 2  # not a fresh start either: it holds someone's files
    assert "already holds files" in result.output


# ---- secrets ----------------------------------------------------------------------------------


def test_redaction_keeps_only_known_public_values():
    options = {
        "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "https://user:hunter2@minio.local:9000",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "AZURE_STORAGE_ACCOUNT_KEY": "azure-key",
        "GOOGLE_SERVICE_ACCOUNT_KEY": '{"private_key": "..."}',
        "AZURE_STORAGE_SAS_KEY": "sv=2020&sig=abc",
        "SOME_FUTURE_OPTION": "unknown, so secret",
    }
    shown = redact(options)
    assert shown["AWS_REGION"] == "eu-west-1"
    assert shown["AWS_ENDPOINT_URL"] == "https://***@minio.local:9000"
    assert all(shown[k] == "***" for k in options if k not in ("AWS_REGION", "AWS_ENDPOINT_URL"))
    assert "hunter2" not in json.dumps(shown)


def test_a_token_with_a_line_break_is_refused_and_never_printed(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("abc123secret\nX-Injected: 1\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    with pytest.raises(jobsubmit.ClusterError, match="line break inside") as err:
        jobsubmit.auth_token()
    assert "abc123secret" not in str(err.value)
    result = runner.invoke(app, ["submit", "build", "x.yaml", "--address", "http://127.0.0.2:9"])
    assert result.exit_code == 2
    assert "abc123secret" not in result.output


def test_secret_environment_values_never_reach_an_error_line(monkeypatch):
    from jobs.errors import scrub

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    assert (
        scrub("S3 said: bad signature for wJalrXUtnFEMI/K7MDENG")
        == "S3 said: bad signature for ***"
    )


def test_store_code_runs_only_when_trusted(tmp_path, ray_session):
    from features.errors import StoreError
    from pipelines.encode import embed_query

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("a caption")
    probe = {"name": "tests.probe_encoder:ProbeEncoder"}
    encode = {"feature_sets": [{"name": "probe", "views": False, "encoders": [probe]}]}
    build(make_spec(tmp_path / "store", [{"kind": "directory", "uri": str(data)}], encode=encode))
    store = FeatureStore(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="--trust-store-code"):
        embed_query(store, "probe", text="hello")
    assert embed_query(store, "probe", text="hello", trust_store_code=True).shape == (3,)
