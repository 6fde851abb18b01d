"""``python -m jobs.build SPEC``: the build job, as run by `mmfp build` or `ray job submit`."""

from __future__ import annotations

import sys

from features.store import FeatureStore
from jobs.report import print_build
from jobs.runtime import init_ray
from pipelines.build import BuildResult, build
from pipelines.spec import load_spec


def run_build(spec_path: str, *, address: str | None = None) -> BuildResult:
    spec = load_spec(spec_path)  # validated before Ray starts
    init_ray(address)
    result = build(spec)
    print_build(result, FeatureStore(spec.store.uri, storage_options=spec.store.storage_options))
    return result


if __name__ == "__main__":
    from jobs.cli import app

    sys.exit(app(["build", *sys.argv[1:]]))
