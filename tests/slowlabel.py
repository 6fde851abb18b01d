"""A label function that takes its time: lets a test kill a refresh in the middle."""

from __future__ import annotations

import time

import pyarrow as pa


def slow_label(batch: pa.Table) -> list[str | None]:
    time.sleep(0.5)
    return [None] * batch.num_rows
