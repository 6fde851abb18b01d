"""Readable summaries printed at the end of commands (rich tables)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from features import query
from features.store import FeatureStore
from pipelines.build import LABEL_VOCABULARY_KEY, BuildResult
from pipelines.label import class_balance

console = Console()


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    out = Table(title=title, title_justify="left")
    for col in columns:
        out.add_column(col)
    for row in rows:
        out.add_row(*("" if v is None else str(v) for v in row))
    return out


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def print_build(result: BuildResult, store: FeatureStore) -> None:
    c = result.counts
    console.print(
        f"[bold]run {result.run_id}[/bold]: {result.inputs} inputs -> "
        f"{c['samples']} new samples, {c['quarantined']} quarantined, "
        f"{c['duplicates']} duplicates, {c['already_stored']} already stored"
        + (f", {c['already_quarantined']} already quarantined" if c["already_quarantined"] else "")
    )
    if not result.changed:
        console.print(f"nothing new: store unchanged ({store.uri})")
        return
    counts = query.split_modality_counts(store).to_pylist()
    splits = sorted({r["split"] for r in counts})
    modalities = sorted({r["modality"] for r in counts})
    grid = {(r["split"], r["modality"]): r["samples"] for r in counts}
    per_split = query.split_counts(store)
    console.print(
        table(
            "samples per split and modality (whole store)",
            ["split", "samples", *modalities],
            [[s, per_split.get(s, 0), *(grid.get((s, m), 0) for m in modalities)] for s in splits],
        )
    )
    if result.view_counts:
        console.print(
            f"views: {result.view_counts.get('views', 0)} new augmented views of train samples"
        )
    for name, rows in sorted(result.feature_counts.items()):
        console.print(f"feature set {name}: {rows} (sample, view) rows encoded")
    reasons = query.quarantine_reasons(store, run_id=result.run_id).to_pylist()
    if reasons:
        console.print(
            table(
                f"quarantined by this run ({len(reasons)})",
                ["error", "stage", "input", "reason"],
                [[r["error_type"], r["stage"], r["uri"], r["message"]] for r in reasons],
            )
        )
    versions = ", ".join(f"{name} v{v}" for name, v in sorted(result.versions.items()))
    console.print(f"store {store.uri}: committed {versions}")


def print_tables(store: FeatureStore) -> None:
    rows = []
    for name in store.tables():
        s = query.table_summary(store, name)
        rows.append([name, s["rows"], s["files"], human_bytes(s["bytes"]), s["version"]])
    console.print(table(f"store {store.uri}", ["table", "rows", "files", "size", "version"], rows))


def print_describe(store: FeatureStore, name: str) -> None:
    dt = store.delta(name)
    summary = query.table_summary(store, name)
    console.print(
        f"[bold]{name}[/bold] v{summary['version']}: {summary['rows']} rows in "
        f"{summary['files']} files ({human_bytes(summary['bytes'])})"
    )
    schema = [[f.name, str(f.type), f.nullable] for f in dt.schema().fields]
    console.print(table("schema", ["column", "type", "nullable"], schema))
    if name == "samples":
        print_class_balance(store)
    if store.exists("_runs"):
        runs = store.to_arrow("_runs").sort_by([("started_at", "descending")]).slice(0, 5)
        console.print(
            table(
                "lineage: latest runs",
                ["run", "kind", "spec", "code", "inputs", "written", "versions"],
                [
                    [
                        r["run_id"],
                        r["kind"],
                        r["spec_hash"],
                        r["code_version"],
                        r["inputs"],
                        r["samples_written"],
                        r["versions"],
                    ]
                    for r in runs.to_pylist()
                ],
            )
        )


def print_class_balance(store: FeatureStore) -> None:
    balance = class_balance(store.to_arrow("samples", columns=["split", "label"]))
    splits = list(balance)
    labels = list(dict.fromkeys(label for counts in balance.values() for label in counts))
    rows = [[label, *(balance[s].get(label, 0) for s in splits)] for label in labels]
    totals = ["total", *(sum(balance[s].values()) for s in splits)]
    console.print(table("class balance per split", ["label", *splits], [*rows, totals]))
    vocabulary = store.properties("samples").get(LABEL_VOCABULARY_KEY)
    if vocabulary:
        console.print(f"closed label vocabulary: {', '.join(json.loads(vocabulary))}")


def print_history(store: FeatureStore, name: str) -> None:
    rows = [
        [
            h["version"],
            f"{h['timestamp']:%Y-%m-%d %H:%M:%S}",
            h["operation"],
            h["rows_added"],
            h["run_id"],
        ]
        for h in store.history(name)
    ]
    console.print(
        table(f"history of {name}", ["version", "time", "operation", "rows", "run"], rows)
    )
