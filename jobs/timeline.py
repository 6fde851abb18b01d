"""``mmfp runs show RUN --plot FILE``: a run's stages as a timeline and their throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from features import runs


def stage_spans(rows: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """``(stage, start, end)`` in seconds from the run's first stage, in start order.

    A stage's ``seconds`` leave out the stages nested in it (``start ray`` inside
    ``collect``, a commit inside ``encode``); its span on the timeline puts them back:
    every stage that starts before the span ends is inside it.
    """
    rows = sorted(rows, key=lambda r: r["started_at"])
    if not rows:
        return []
    t0 = rows[0]["started_at"]
    starts = [(r["started_at"] - t0).total_seconds() for r in rows]
    spans = []
    for i, row in enumerate(rows):
        end = starts[i] + max(0.0, row["seconds"])
        for j in range(i + 1, len(rows)):
            if starts[j] >= end:
                break
            end += max(0.0, rows[j]["seconds"])
        spans.append((row["stage"], starts[i], end))
    return spans


def plot_timeline(run_id: str, stages: pa.Table, path: Path) -> Path:
    """One PNG: each stage's span on a time axis (coloured by CPU busy) and its rows/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(stages.to_pylist(), key=lambda r: r["started_at"])
    spans = stage_spans(rows)
    fig, (ax_time, ax_rate) = plt.subplots(
        1, 2, figsize=(11, 0.5 * len(rows) + 1.6), gridspec_kw={"width_ratios": [3, 1]}
    )
    cmap = plt.get_cmap("viridis")
    for y, ((_, start, end), row) in enumerate(zip(spans, rows, strict=True)):
        busy = runs.cpu_busy(row)
        colour = "lightgrey" if busy is None else cmap(busy)
        ax_time.barh(y, end - start, left=start, color=colour, edgecolor="black", linewidth=0.5)
        label = f"{row['seconds']:.2f} s" + ("" if busy is None else f", CPU {busy:.0%}")
        ax_time.text(end, y, f" {label}", va="center", fontsize=7)
    names = [name for name, *_ in spans]
    ax_time.set_yticks(range(len(names)), names, fontsize=8)
    ax_time.invert_yaxis()
    ax_time.set(xlabel="seconds since the run's first stage", title="stages (colour: CPU busy)")
    ax_time.set_xlim(0, max(end for *_, end in spans) * 1.25 or 1)
    rates = [r["rows"] / r["seconds"] if r["seconds"] > 0 and r["rows"] else 0 for r in rows]
    ax_rate.barh(range(len(rows)), rates, color="steelblue")
    ax_rate.set_yticks(range(len(names)), [""] * len(names))
    ax_rate.invert_yaxis()
    if any(rates):  # commits move rows 100x faster than stages that decode them
        ax_rate.set_xscale("log")
    ax_rate.set(xlabel="rows/s (log)", title="throughput")
    worst = runs.bottleneck(stages)
    title = f"run {run_id}" + (f": bottleneck {worst.stage} ({worst.share:.0%})" if worst else "")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
