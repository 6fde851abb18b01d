"""User quality predicates the quality tests load by ``tests.qualityfns:<name>`` path."""

from __future__ import annotations

import pyarrow as pa


def wide_enough(stats: pa.Table) -> list[bool]:
    """Keep rows whose image is at least 48 px wide (rows without an image pass)."""
    return [w is None or w >= 48 for w in stats.column("image_width").to_pylist()]


def one_value(stats: pa.Table) -> list[bool]:
    """Breaks the contract: one value whatever the batch size."""
    return [True]
