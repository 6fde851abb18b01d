"""Everything mmfp prints: one table renderer and the summaries commands end with.

Only ``jobs/`` writes to the terminal; the library returns data (Arrow
tables, dicts, DuckDB relations) and these functions render it with rich.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from rich.console import Console
from rich.table import Table
from rich.text import Text

from features import runs, summary
from features.metadata import label_vocabulary
from features.sql import batches
from features.store import FeatureStore
from jobs.errors import clean
from pipelines.build import BuildResult
from pipelines.label import class_balance

if TYPE_CHECKING:
    import duckdb

# markup off: text from the data ("[/]", "[link=...]") is printed as it is, never parsed
console = Console(markup=False)


def table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    fold: bool = False,
    no_wrap: Sequence[str] = (),
    right: Sequence[str] = (),
    max_width: int | None = None,
    centered: bool = False,
) -> Table:
    """A rich table; cells are shown as text (None as blank).

    Long cells are cut with an ellipsis, or with ``fold`` wrap to show everything
    (ids and times in ``no_wrap`` columns stay on one line so they can be copied);
    ``right`` columns (numbers) align right.
    """
    out = Table(title=title, title_justify="center" if centered else "left")
    for col in columns:
        out.add_column(
            col,
            justify="right" if col in right else "left",
            no_wrap=col in no_wrap,
            overflow="fold" if fold else "ellipsis",
            max_width=max_width,
        )
    for row in rows:
        out.add_row(*(Text("" if v is None else clean(v)) for v in row))
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
        f"run {result.run_id}: {result.inputs} inputs -> "
        f"{c['samples']} new samples, {c['quarantined']} quarantined, "
        + (f"{c['filtered']} filtered by quality, " if c["filtered"] else "")
        + f"{c['duplicates']} duplicates, {c['already_stored']} already stored"
        + (f", {c['already_quarantined']} already quarantined" if c["already_quarantined"] else "")
    )
    if not result.changed:
        console.print(f"nothing new: store unchanged ({store.uri})")
        return
    counts = summary.split_modality_counts(store).to_pylist()
    splits = sorted({r["split"] for r in counts})
    modalities = sorted({r["modality"] for r in counts})
    grid = {(r["split"], r["modality"]): r["samples"] for r in counts}
    per_split = summary.split_counts(store)
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
    reasons = summary.quarantine_reasons(store, run_id=result.run_id).to_pylist()
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


def print_log_file(path: Path) -> None:
    """Name the run's log file, when Ray's lines went there (not with ``--verbose``)."""
    if path.exists():
        console.print(
            f"Ray's log lines: {path} (--verbose shows them here)", style="dim", soft_wrap=True
        )


def print_tables(store: FeatureStore) -> None:
    rows = []
    for name in store.tables():
        s = summary.table_summary(store, name)
        rows.append([name, s["rows"], s["files"], human_bytes(s["bytes"]), s["version"]])
    console.print(table(f"store {store.uri}", ["table", "rows", "files", "size", "version"], rows))


def print_describe(store: FeatureStore, name: str) -> None:
    dt = store.delta(name)
    size = summary.table_summary(store, name)
    console.print(
        f"{clean(name)} v{size['version']}: {size['rows']} rows in "
        f"{size['files']} files ({human_bytes(size['bytes'])})"
    )
    schema = [[f.name, str(f.type), f.nullable] for f in dt.schema().fields]
    console.print(table("schema", ["column", "type", "nullable"], schema))
    if name == "samples":
        print_class_balance(store)
    latest = runs.recent_runs(store, 5)
    if latest.num_rows:
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
                    for r in latest.to_pylist()
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
    vocabulary = label_vocabulary(store.properties("samples"))
    if vocabulary:
        console.print(f"closed label vocabulary: {clean(', '.join(vocabulary))}")


def print_history(store: FeatureStore, name: str, *, lineage: bool = False) -> None:
    """Every version of a table; with ``lineage`` also the run's kind, spec hash and code."""
    headers = ["version", "time", "operation", "rows", "run"]
    extra = ["kind", "spec_hash", "code_version"] if lineage else []
    rows = [
        [e["version"], f"{e['timestamp']:%Y-%m-%d %H:%M:%S}", e["operation"], e["rows_added"]]
        + [e["run_id"], *(e[k] for k in extra)]
        for e in (store.lineage(name) if lineage else store.history(name))
    ]
    if lineage:
        headers += ["kind", "spec", "code"]
    console.print(table(f"{'lineage' if lineage else 'history'} of {name}", headers, rows))


def print_relation(
    relation: duckdb.DuckDBPyRelation, *, max_rows: int, out: str | Path | None = None
) -> int:
    """The first ``max_rows`` rows of a query result as a table (to ``out`` when given);
    returns the rows shown. Only those rows are read."""
    shown: list[dict[str, Any]] = []
    more = False
    for batch in batches(relation, max(max_rows + 1, 1)):
        shown.extend(batch.slice(0, max_rows + 1 - len(shown)).to_pylist())
        if len(shown) > max_rows:
            more = True
            shown = shown[:max_rows]
            break
    rows = ([_cell(v) for v in row.values()] for row in shown)
    grid = table("", relation.columns, rows, fold=True, max_width=60)
    note = (
        f"first {max_rows} rows shown; more were not read "
        "(LIMIT the query, or --format csv|json|parquet --out FILE for all)"
        if more
        else f"{len(shown)} row(s)"
    )
    if out is None:
        console.print(grid, Text(note, style="dim"))
    else:
        with open(out, "w") as handle:
            Console(file=handle, width=200, markup=False).print(grid, Text(note, style="dim"))
    return len(shown)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    text = str(value)
    return text if len(text) <= 200 else text[:197] + "..."


def print_runs(found: pa.Table) -> None:
    rows = []
    for r in found.to_pylist():
        took = (r["finished_at"] - r["started_at"]).total_seconds() if r["finished_at"] else None
        rows.append(
            [
                r["run_id"],
                r["kind"],
                f"{r['started_at']:%Y-%m-%d %H:%M:%S}",
                "unfinished" if took is None else f"{took:.1f}",
                r["inputs"],
                r["samples_written"],
                r["quarantined"],
            ]
        )
    headers = ["run", "kind", "started (UTC)", "seconds", "inputs", "samples", "quarantined"]
    console.print(table("runs, newest first", headers, rows, no_wrap=["run"], right=headers[3:]))


def print_stages(run_id: str, stages: pa.Table) -> None:
    """Each stage's time, share, throughput, CPU and accelerator use, how long Ray Data
    held it back and the memory its tasks reached; then the bottleneck and why."""
    rows = stages.to_pylist()
    total = runs.staged_seconds(rows) or 1.0
    with_gpus = any(r.get("gpus") for r in rows)
    out = []
    for r in rows:
        busy, held = runs.cpu_busy(r), runs.held_back(r)
        gpu = runs.accelerator_busy(r)
        line = [
            r["stage"],
            f"{r['seconds']:.2f}",
            f"{max(0.0, r['seconds']) / total:.0%}",
            r["rows"],
            f"{r['rows'] / r['seconds']:.0f}" if r["seconds"] > 0 and r["rows"] else "",
            human_bytes(r["bytes"]) if r["bytes"] else "",
            "" if busy is None else f"{busy:.0%} of {r['cpus']:g}",
            "" if held is None else f"{held:.0%}",
            human_bytes(r["peak_task_bytes"]) if r.get("peak_task_bytes") else "",
        ]
        if with_gpus:
            line.append("" if gpu is None else f"{gpu:.0%} of {r['gpus']:g}")
        out.append(line)
    headers = ["stage", "seconds", "share", "rows", "rows/s", "written", "CPU busy"]
    headers += ["held back", "task peak"] + (["GPU actors busy"] if with_gpus else [])
    title = f"run {run_id}: {total:.1f} s in stages"
    console.print(table(title, headers, out, no_wrap=["stage"], right=headers[1:]))
    peak = max((r.get("driver_peak_bytes") or 0 for r in rows), default=0)
    if peak:
        console.print(f"driver peak memory: {human_bytes(peak)}")
    worst = runs.bottleneck(stages)
    if worst:
        console.print(f"bottleneck: {worst.stage} ({worst.share:.0%} of the run): {worst.reason}")
