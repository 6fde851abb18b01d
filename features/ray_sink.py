"""``StoreSink`` as a Ray Data ``Datasink``: its ``write`` runs in Ray's tasks, its
``record`` on the driver. Only Ray plans import this module (and with it Ray Data)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink

from features.sink import StoreSink


class RayStoreSink(Datasink):
    """Writes through ``sink`` in each task; the driver's ``sink`` gathers every file."""

    def __init__(self, sink: StoreSink) -> None:
        self.sink = sink

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        return self.sink.write(BlockAccessor.for_block(b).to_arrow() for b in blocks)

    def on_write_complete(self, write_result: Any) -> None:
        for result in write_result.write_returns:
            self.sink.record(result)
