"""The spec is validated before Ray starts; the CLI prints one line and exits 2 on user errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from pipelines.errors import SpecError
from pipelines.spec import load_spec

runner = CliRunner()


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_relative_paths_resolve_against_the_spec_file(tmp_path):
    spec = load_spec(
        _write(tmp_path / "s.yaml", {"sources": [{"kind": "directory", "uri": "data"}]})
    )
    assert spec.sources[0].uri == str(tmp_path / "data")
    assert spec.store.uri == str(tmp_path / "mmfp-store")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"sources": [{"kind": "folder", "uri": "x"}]}, "'directory', 'manifest', 'webdataset'"),
        ({"sources": [{"kind": "directory", "uri": "x", "clas_folders": True}]}, "clas_folders"),
        (
            {"sources": [{"kind": "directory", "uri": "x"}], "split": {"ratios": {"train": 0.5}}},
            "split.ratios",
        ),
        (
            {"sources": [{"kind": "manifest", "uri": "m.jsonl", "format": "xml"}]},
            "sources.0.manifest.format",
        ),
        (
            {"sources": [{"kind": "directory", "uri": "a"}, {"kind": "directory", "uri": "a"}]},
            "unique",
        ),
        ({"sources": []}, "sources"),
        ("- just\n- a list\n", "YAML mapping"),
        ("sources: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_specs_name_the_field(tmp_path, data, expected):
    with pytest.raises(SpecError, match=expected.replace(".", r"\.")):
        load_spec(_write(tmp_path / "bad.yaml", data))


@pytest.mark.parametrize(
    "entrypoint",
    [["jobs", "build"], ["jobs.build"], ["jobs", "refresh"], ["jobs.refresh"]],
    ids=" ".join,
)
def test_cli_bad_spec_exits_2_without_traceback(tmp_path, entrypoint):
    """``python -m jobs build`` and the old per-job modules (saved schedules run them)."""
    bad = _write(tmp_path / "bad.yaml", {"sources": [{"kind": "directory", "uri": "x", "oops": 1}]})
    proc = subprocess.run(
        [sys.executable, "-m", *entrypoint, str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "sources.0.directory.oops: unknown field" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_missing_spec_and_missing_store(tmp_path):
    result = runner.invoke(app, ["build", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert "spec file not found" in result.output
    result = runner.invoke(app, ["store", "ls", "--store", str(tmp_path / "no-store")])
    assert result.exit_code == 2
    assert "no feature store" in result.output


@pytest.mark.usefixtures("ray_session")
def test_demo_then_store_commands(tmp_path):
    workdir = tmp_path / "demo"
    result = runner.invoke(
        app, ["demo", "--workdir", str(workdir), "--n-per-class", "1", "--no-train"]
    )
    assert result.exit_code == 0, result.output
    assert "quarantined by this run" in result.output
    assert "TruncatedImage" in result.output
    store = str(workdir / "store")
    listing = runner.invoke(app, ["store", "ls", "--store", store])
    assert listing.exit_code == 0
    for name in ("samples", "quarantine", "views", "_inputs", "_runs"):
        assert name in listing.output
    described = runner.invoke(app, ["store", "describe", "samples", "--store", store])
    assert described.exit_code == 0
    assert "sample_id" in described.output
    assert "class balance per split" in described.output
    assert "circle" in described.output
    assert "train" in described.output
    history = runner.invoke(app, ["store", "history", "samples", "--store", store])
    assert history.exit_code == 0
    assert "WRITE" in history.output
    unknown = runner.invoke(app, ["store", "describe", "nope", "--store", store])
    assert unknown.exit_code == 2
    tables = "_inputs, _runs, _stages, features/clip, features/inputs, quality, quarantine, samples"
    assert tables in unknown.output
    # the demo is deterministic: a second run finds everything already stored
    again = runner.invoke(
        app, ["demo", "--workdir", str(workdir), "--n-per-class", "1", "--no-train"]
    )
    assert again.exit_code == 0
    assert "nothing new" in again.output


def test_demo_writes_an_augmentation_preview(demo):
    workdir, output = demo
    png = workdir / "augmentations.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(png))
    assert image.shape[0] > 200
    assert image.shape[1] > 600
    assert "new augmented views" in output
    # it ends with pretraining and the test recall table
    assert "r@1 / chance" in output
    assert "text->image" in output
    assert list((workdir / "store" / "_train" / "demo").glob("checkpoint_step*/export"))
