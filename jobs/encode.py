"""``python -m jobs.encode SPEC --feature-set NAME``: one feature set alone, incremental."""

from __future__ import annotations

import sys

from jobs.report import console
from jobs.runtime import init_ray
from pipelines.build import BuildResult, encode_only
from pipelines.spec import load_spec


def run_encode(
    spec_path: str, feature_set: str, *, reencode: bool = False, address: str | None = None
) -> BuildResult:
    spec = load_spec(spec_path)
    init_ray(address)
    result = encode_only(spec, feature_set, reencode=reencode)
    rows = result.feature_counts.get(feature_set, 0)
    store = spec.store.uri
    if not result.changed:
        console.print(f"feature set {feature_set!r} is up to date in {store}: nothing to encode")
    else:
        console.print(
            f"feature set {feature_set!r}: {rows} rows encoded, committed {result.versions}"
        )
    return result


if __name__ == "__main__":
    from jobs.cli import app

    sys.exit(app(["encode", *sys.argv[1:]]))
