"""``mmfp query``, ``mmfp search`` and ``mmfp store diff|vacuum|optimize|stats|index|lineage``.

Thin typer commands over the store (``features.sql``, ``features.search``,
``features.maintenance``, ``features.ann``, ``features.stats``); ``register``
adds them to the ``mmfp`` app (``jobs/cli.py``), wrapped so that store errors
print one line and exit with code 2.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from features.ann import build_index
from features.errors import StoreError
from features.maintenance import diff as table_diff
from features.maintenance import optimize as run_optimize
from features.maintenance import vacuum as run_vacuum
from features.search import search as run_search
from features.sql import run_sql, write_result
from features.stats import embedding_map as plot_embedding_map
from features.stats import plot_stats
from features.stats import stats as table_stats
from features.store import FeatureStore
from features.tables import Version
from jobs.errors import clean, open_store, user_errors
from jobs.options import DEFAULT_STORE, StoreOpt, TableArg, VersionOpt
from jobs.report import console, print_history, print_relation
from jobs.report import table as grid
from pipelines.decode import modality_of
from pipelines.encode import embed_query


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def register(app: typer.Typer, store_app: typer.Typer) -> None:
    """Add this module's commands to the ``mmfp`` app and its ``store`` group."""
    app.command("query")(user_errors(query))
    app.command("search")(user_errors(search))
    for name, fn in [
        ("diff", diff),
        ("vacuum", vacuum),
        ("optimize", optimize),
        ("stats", stats),
        ("index", index),
        ("lineage", lineage),
    ]:
        store_app.command(name)(user_errors(fn))


def parse_versions(values: list[str] | None) -> Version | dict[str, Version]:
    """``["3"]`` -> ``"3"``; ``["samples=3", "clip=2"]`` -> a dict; a mix is an error."""
    values = values or []
    pinned = dict(v.split("=", 1) for v in values if "=" in v)
    bare = [v for v in values if "=" not in v]
    if bare and (pinned or len(bare) > 1):
        raise StoreError(
            f"--version {' '.join(values)}: give one bare VERSION, or TABLE=VERSION for each table"
        )
    return pinned or (bare[0] if bare else None)


def query(
    sql: Annotated[
        str,
        typer.Argument(
            help='SQL. Tables by name (samples, _runs, "features/clip" or clip); '
            'a table at a version as "samples@3".'
        ),
    ],
    store: StoreOpt = DEFAULT_STORE,
    version: Annotated[
        list[str] | None,
        typer.Option(
            help="TABLE=VERSION (repeatable), or VERSION when the query reads one table. "
            "A version is a number or an ISO 8601 time."
        ),
    ] = None,
    as_of: Annotated[
        str | None, typer.Option(help="Every table at its last version at or before this time.")
    ] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", "-f")] = OutputFormat.table,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="File; default stdout.")] = None,
    max_rows: Annotated[int, typer.Option(min=1, help="Rows --format table shows.")] = 50,
) -> None:
    """Run DuckDB SQL over the store's tables; results stream to the terminal or a file."""
    if fmt == OutputFormat.parquet and out is None:
        raise StoreError("--format parquet needs --out FILE (Parquet is not written to a terminal)")
    relation = run_sql(open_store(store), sql, version=parse_versions(version), as_of=as_of)
    if fmt == OutputFormat.table:
        rows = print_relation(relation, max_rows=max_rows, out=out)
    else:
        rows = write_result(relation, fmt.value, out or sys.stdout.buffer)
    if out is not None:
        typer.echo(f"{rows} rows -> {out}", err=True)


def search(
    feature_set: Annotated[str, typer.Argument(help="Feature set, e.g. clip.")],
    sample_id: Annotated[
        str | None, typer.Option("--id", help="Query by a stored sample's embedding.")
    ] = None,
    text: Annotated[str | None, typer.Option(help="Query text (embedded by the encoder).")] = None,
    file: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Query image or audio file.")
    ] = None,
    vector: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Query vector (.npy).")
    ] = None,
    column: Annotated[
        str | None, typer.Option(help="Embedding column; needed when there are several.")
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="How many results.")] = 10,
    where: Annotated[
        str | None, typer.Option(help="SQL filter, e.g. \"split = 'train' AND source = 'x'\".")
    ] = None,
    version: VersionOpt = None,
    ann: Annotated[bool, typer.Option("--ann/--exact", help="Use the version's index.")] = False,
    trust_store_code: Annotated[
        bool,
        typer.Option(help="Import an encoder the store names by import path (runs its code)."),
    ] = False,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Nearest rows of a feature set by cosine similarity (exact, or with --ann the index)."""
    given = [x for x in (sample_id, text, file, vector) if x is not None]
    if len(given) != 1:
        raise StoreError("give exactly one query: --id, --text, --file or --vector")
    fs = open_store(store)
    query_vector = None
    if vector is not None:
        query_vector = np.load(vector, allow_pickle=False)
    elif text is not None or file is not None:
        query_vector = _embed(fs, feature_set, text, file, trust_store_code)
    hits = run_search(
        fs,
        feature_set,
        column=column,
        vector=query_vector,
        sample_id=sample_id,
        k=k,
        where=where,
        version=version,
        method="ann" if ann else "exact",
    )
    rows = [
        [i + 1, f"{r['score']:.4f}", r["sample_id"], r["view"], r["split"], r["label"]]
        + [r.get("source"), (r.get("text") or "")[:60]]
        for i, r in enumerate(hits.to_pylist())
    ]
    columns = ["#", "score", "sample_id", "view", "split", "label", "source", "text"]
    console.print(grid(f"top {k} in {feature_set}", columns, rows))


def _embed(
    store: FeatureStore, feature_set: str, text: str | None, file: Path | None, trust: bool
) -> Any:
    """The encode stage's ``embed_query`` hook: text or media -> a vector in the feature set."""
    if text is not None:
        return embed_query(store, feature_set, text=text, trust_store_code=trust)
    assert file is not None
    modality = modality_of(file.suffix.lstrip("."))
    if modality not in ("image", "audio"):
        raise StoreError(f"{file}: not an image or audio file (by its extension)")
    data = {f"{modality}_bytes": file.read_bytes()}
    return embed_query(store, feature_set, **data, trust_store_code=trust)


def diff(
    table: TableArg,
    v1: Annotated[str, typer.Argument(help="From this version (number or ISO time).")],
    v2: Annotated[str | None, typer.Argument(help="To this version; default latest.")] = None,
    show: Annotated[int, typer.Option(min=0, help="Keys to list per side.")] = 20,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Rows added and removed between two versions of a table, by key."""
    d = table_diff(open_store(store), table, v1, v2)
    s = d.summary()
    console.print(
        f"{clean(table)} v{d.v1} -> v{d.v2}: +{s['rows_added']} rows, "
        f"-{s['rows_removed']} rows, {s['rows_rewritten']} rewritten "
        f"({s['files_added']} files added, {s['files_removed']} removed)"
    )
    for sign, keys in (("+", d.added), ("-", d.removed)):
        shown = keys.slice(0, show).to_pylist()
        for row in shown:
            console.print(f"  {sign} " + " ".join(clean(v) for v in row.values()))
        if keys.num_rows > len(shown):
            console.print(f"  {sign} ... {keys.num_rows - len(shown)} more")


def vacuum(
    store: StoreOpt = DEFAULT_STORE,
    retention_hours: Annotated[
        int | None,
        typer.Option(min=0, help="Keep files younger than this; default: each table's (168)."),
    ] = None,
    apply: Annotated[
        bool, typer.Option("--apply/--dry-run", help="Delete, or only list (default).")
    ] = False,
    force: Annotated[
        bool, typer.Option(help="Allow a retention below the tables' minimum.")
    ] = False,
) -> None:
    """Files no version within the retention window needs (and never-committed ones)."""
    files = run_vacuum(
        open_store(store), retention_hours=retention_hours, dry_run=not apply, force=force
    )
    verb = "deleted" if apply else "would delete"
    for table, paths in files.items():
        console.print(f"{clean(table)}: {verb} {len(paths)} file(s)")
        for path in paths:
            console.print(f"  {path}")
    if not apply and any(files.values()):
        console.print("dry run: nothing deleted (add --apply to delete)")


def optimize(table: TableArg, store: StoreOpt = DEFAULT_STORE) -> None:
    """Compact a table's small files into fewer large ones (one commit, same rows)."""
    r = run_optimize(open_store(store), table)
    console.print(
        f"{clean(table)} v{r['version']}: {r['files_before']} -> {r['files_after']} files"
    )


def stats(
    table: Annotated[str, typer.Argument(help="Table name.")] = "samples",
    version: VersionOpt = None,
    plot: Annotated[Path | None, typer.Option(help="Write the stats as a PNG here.")] = None,
    embedding_map: Annotated[
        Path | None, typer.Option("--map", help="Feature sets: PCA map PNG of an embedding.")
    ] = None,
    column: Annotated[str | None, typer.Option(help="Embedding column for --map.")] = None,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Counts per split / label / modality, media histograms and quarantine reasons
    (``quality``: every stat's percentiles per split)."""
    fs = open_store(store)
    summary = table_stats(fs, table, version)
    console.print(f"{clean(table)} v{summary['version']}: {summary['rows']} rows")
    for key, counts in summary.items():
        if key.startswith("by_") or key == "quarantine":
            title = "quarantine reasons" if key == "quarantine" else key.replace("_", " ")
            console.print(grid(title, ["value", "rows"], [[k, v] for k, v in counts.items()]))
    marked = summary.get("near_duplicates")
    if marked:
        rows = [[split, n] for split, n in marked["by_split"].items()]
        rows += [[f"{pair} (cross-split)", n] for pair, n in marked["cross_split"].items()]
        console.print(
            f"near duplicates marked by mmfp dedup (samples v{marked.get('samples_version')}):"
        )
        console.print(grid("marked per split", ["split", "samples"], rows))
    measured = summary.get("stats", {})
    if measured:
        rows = [
            [stat, split, p["n"], *(f"{p[k]:.4g}" for k in ("p5", "p50", "p95", "mean"))]
            for stat, h in measured.items()
            for split, p in h["splits"].items()
        ]
        columns = ["stat", "split", "samples", "p5", "p50", "p95", "mean"]
        title = (
            "quality stats (every measured sample, kept or filtered)"
            if table == "quality"
            else "cross-modal similarity (cosine in the encoder's joint space, original rows)"
        )
        console.print(grid(title, columns, rows))
    for name, worst in summary.get("least_agreeing", {}).items():
        rows = [[r["sample_id"], r["split"], f"{r[name]:.4f}"] for r in worst]
        console.print(grid(f"lowest {name}", ["sample_id", "split", "cosine"], rows))
    if plot is not None:
        console.print(f"stats plot -> {plot_stats(summary, plot)}")
    if embedding_map is not None:
        out = plot_embedding_map(fs, table, column, embedding_map, version=version)
        console.print(f"embedding map -> {out}")


def index(
    feature_set: Annotated[str, typer.Argument(help="Feature set, e.g. clip.")],
    column: Annotated[str | None, typer.Option(help="Embedding column.")] = None,
    version: VersionOpt = None,
    target_recall: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Build the approximate (IVF) index of a feature-set version, tuned to a recall@10."""
    m = build_index(
        open_store(store), feature_set, column, version=version, target_recall=target_recall
    )
    console.print(
        f"{m['table']}.{m['column']} v{m['version']}: {m['rows']} rows, "
        f"nlist {m['nlist']}, nprobe {m['nprobe']}, recall@10 {m['recall_at_10']:.3f} vs exact "
        f"({m['probe_queries']} queries), built in {m['build_s']:.1f}s -> {m['uri']}"
    )
    if m["nprobe"] >= m["nlist"] > 1:
        console.print(
            "note: reaching that recall takes every list: these embeddings have no cluster "
            "structure the index can use, so --ann is no faster than exact search"
        )


def lineage(table: TableArg, store: StoreOpt = DEFAULT_STORE) -> None:
    """Every version of a table with the run, spec hash and code version that wrote it."""
    print_history(open_store(store), table, lineage=True)
