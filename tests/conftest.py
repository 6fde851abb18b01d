"""Shared fixtures: one local Ray per session, tiny real media written on disk."""

from __future__ import annotations

from typing import Any

import pytest
import ray

from pipelines import synthetic


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
