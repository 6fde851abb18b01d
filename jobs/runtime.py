"""Start or join Ray the way every mmfp job does."""

from __future__ import annotations

import os
from typing import Any

import ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS``; otherwise start a private local Ray.

    ``address="local"`` is explicit on purpose: a bare ``ray.init()`` joins any
    cluster a past ``ray start`` left on this machine.
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        configure_logging=True,
        logging_level="WARNING",
        log_to_driver=False,
        **kwargs,
    )
