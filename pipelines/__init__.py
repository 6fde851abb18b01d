"""The mmfp pipeline: a YAML spec in, Ray Data stages, a versioned feature store out.

``load_spec(path)`` reads and validates a spec; ``build(spec)`` collects,
labels, splits, augments and encodes its sources into the spec's store (Ray
must be initialised); ``encode_only(spec, name)`` runs one feature set alone;
``embed_query(store, feature_set, text=...)`` embeds a search query with the feature
set's own recorded encoder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from features.lazy import lazy_exports

if TYPE_CHECKING:
    from pipelines.build import BuildResult, build, encode_only
    from pipelines.encode import embed_query
    from pipelines.spec import PipelineSpec, load_spec, parse_spec

# name -> module, imported on first use: a Ray worker that runs one stage function
# (``pipelines.collect``) must not import the whole facade (Ray Data plans, encoders)
_PUBLIC = {
    "BuildResult": "pipelines.build",
    "build": "pipelines.build",
    "encode_only": "pipelines.build",
    "embed_query": "pipelines.encode",
    "PipelineSpec": "pipelines.spec",
    "load_spec": "pipelines.spec",
    "parse_spec": "pipelines.spec",
}


__getattr__ = lazy_exports(__name__, _PUBLIC)


__all__ = [
    "BuildResult",
    "PipelineSpec",
    "build",
    "embed_query",
    "encode_only",
    "load_spec",
    "parse_spec",
]
