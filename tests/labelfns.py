"""User label functions the label tests load by ``tests.labelfns:<name>`` path."""

from __future__ import annotations

import pyarrow as pa

NOT_A_FUNCTION = 42


def by_length(batch: pa.Table) -> list[str | list[str] | None]:
    """'long' / ['short', 'tiny'] / None by caption length, to exercise every return shape."""
    out: list[str | list[str] | None] = []
    for text in batch.column("text").to_pylist():
        if text is None:
            out.append(None)
        elif len(text) > 20:
            out.append("long")
        else:
            out.append(["short", "tiny"])
    return out


def too_few(batch: pa.Table) -> list[str]:
    """One label fewer than rows: a broken user function."""
    return ["x"] * (batch.num_rows - 1)
