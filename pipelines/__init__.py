"""The mmfp pipeline: a YAML spec in, Ray Data stages, a versioned feature store out.

``load_spec(path)`` reads and validates a spec; ``build(spec)`` collects,
labels, splits, augments and encodes its sources into the spec's store (Ray
must be initialised); ``encode_only(spec, name)`` runs one feature set alone;
``embed_query(store, feature_set, text=...)`` embeds a search query with the feature
set's own recorded encoder.
"""

from __future__ import annotations

from pipelines.build import BuildResult, build, encode_only
from pipelines.encode import embed_query
from pipelines.spec import PipelineSpec, load_spec, parse_spec

__all__ = [
    "BuildResult",
    "PipelineSpec",
    "build",
    "embed_query",
    "encode_only",
    "load_spec",
    "parse_spec",
]
