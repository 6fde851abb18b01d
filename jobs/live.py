"""One live display per run: the running stage, its share done, rows/s and ETA, and what
went to quarantine so far; one plain line per stage when the output is not a terminal.

Fed by the run's ``pipelines.progress`` events; Ray's own progress bars and log lines
stay in the run's log file (``jobs.runtime``), so this is the only thing that moves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.live import Live
from rich.text import Text

from jobs.report import console
from pipelines.progress import Listener, StageProgress

PLAIN_EVERY = 10.0  # seconds between two in-stage lines when not on a terminal


def describe(p: StageProgress) -> str:
    """One line for a stage: running (share, ETA) or finished (rows, rows/s)."""
    seconds = p.seconds
    if p.finished:
        rate = f" ({p.rows / seconds:,.0f} rows/s)" if p.rows and seconds >= 0.1 else ""
        rows = f"{p.rows:,} rows in " if p.rows else ""
        line = f"{p.stage}: {rows}{seconds:.1f} s{rate}"
    elif p.done is None:
        line = f"{p.stage}: started" if seconds < 1 else f"{p.stage}: running for {seconds:.0f} s"
    else:
        eta = "" if p.eta is None else f", ETA {p.eta:.0f} s"
        line = f"{p.stage}: {p.done:.0%} after {seconds:.0f} s{eta}"
    return line + (f", {p.quarantined:,} quarantined so far" if p.quarantined else "")


@contextmanager
def live_progress() -> Iterator[Listener]:
    """A progress listener for ``build``/``encode_only`` that shows the run as it goes."""
    if not console.is_terminal:
        last = {"at": 0.0}

        def plain(p: StageProgress) -> None:
            if p.finished or time.monotonic() - last["at"] >= PLAIN_EVERY:
                last["at"] = time.monotonic()
                console.print(describe(p), soft_wrap=True)

        yield plain
        return
    with Live(Text(""), console=console, transient=True, refresh_per_second=4) as live:

        def update(p: StageProgress) -> None:
            if p.finished:
                console.print(Text(describe(p), style="dim"))
                live.update(Text(""))
            else:
                live.update(Text(describe(p), style="bold"))

        yield update
