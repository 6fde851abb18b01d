"""Helpers shared by tests: specs over the fixture corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.decode import modality_of
from pipelines.spec import PipelineSpec, parse_spec


def make_spec(store: Path, sources: list[dict[str, Any]], **sections: Any) -> PipelineSpec:
    return parse_spec({"sources": sources, "store": {"uri": str(store)}, **sections}).resolved(
        store.parent
    )


def corpus_sources(corpus: dict[str, Any], *, broken: bool = True) -> list[dict[str, Any]]:
    sources = [
        {"kind": "directory", "name": "photos", "uri": corpus["photos"], "class_folders": True},
        {"kind": "manifest", "name": "catalog", "uri": corpus["catalog"]},
        {"kind": "webdataset", "name": "shards", "uri": str(Path(corpus["shards"][0]).parent)},
    ]
    if broken:
        sources += [
            {"kind": "directory", "name": "broken", "uri": corpus["broken"]},
            {
                "kind": "manifest",
                "name": "broken-manifest",
                "uri": str(Path(corpus["broken"]) / "bad_manifest.jsonl"),
            },
        ]
    return sources


def expected_quarantine(corpus: dict[str, Any]) -> dict[str, str]:
    """Quarantine uri -> expected error type for every broken input of the corpus."""
    broken = corpus["broken"]
    expected = {}
    for key, error_type in corpus["expected_errors"].items():
        stem, _, ext = key.rpartition(".")
        if "#" in key or not stem or modality_of(ext) is None:
            expected[f"{broken}/{key}"] = error_type
        else:
            expected[f"{broken}/{stem}"] = error_type
    return expected
