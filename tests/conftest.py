"""Shared fixtures: one local Ray per session, tiny real media written on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import ray

from jobs.demo import corpus as synthetic

# Tests build their models from configs and load them by path: nothing may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def run_logs(tmp_path_factory) -> Path:
    """Run log files (``jobs.runtime.run_log``) go under the session's tmp dir, never ~/.cache."""
    folder = tmp_path_factory.mktemp("run-logs")
    os.environ["MMFP_LOG_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def ray_session():
    """A private local Ray with 2 CPUs (``address="local"`` never joins a stray cluster)."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Any]:
    """The demo corpus at a small size: three good sources plus the broken inputs."""
    return synthetic.write_demo_corpus(tmp_path_factory.mktemp("corpus"), n_per_class=3)


@pytest.fixture(scope="session")
def demo(tmp_path_factory, ray_session) -> tuple[Path, str]:
    """``mmfp demo`` once per session (3 samples per class, with training): the workdir,
    named ``mmfp-demo`` as the README's examples expect, and what the command printed."""
    from typer.testing import CliRunner

    from jobs.cli import app

    workdir = tmp_path_factory.mktemp("demo") / "mmfp-demo"
    result = CliRunner().invoke(app, ["demo", "--workdir", str(workdir), "--n-per-class", "3"])
    assert result.exit_code == 0, result.output
    return workdir, result.output
