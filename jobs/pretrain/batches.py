"""Each worker's training batches, epoch by epoch.

The first epoch streams the worker's shard from the store through Ray Data (read,
convert, seeded local shuffle, prefetch). When the shard fits ``cache_mb`` (and another
epoch follows), its rows are kept as they arrive, and every later epoch draws its
batches from them in this process: a seeded permutation of the whole shard, with no
pipeline to restart and no read task sharing the cores with the model (restarting the
pipeline cost 0.2-0.5 s before each epoch's first batch on 2 cores, and its tasks
slowed the steps by 5-10%). A shard over the budget streams every epoch.

Determinism: the kept rows are in the first epoch's order, which ``preserve_order`` and
the seeded shuffle make the same in every run; a run resumed in a later epoch reads that
order again (one pass, no training) before it goes on, so its batches are those the
interrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from jobs.pretrain.config import TrainConfig

if TYPE_CHECKING:
    from ray.data import DataIterator

Batch = dict[str, torch.Tensor]
MB = 1 << 20


class EpochBatches:
    """``epoch(n)``: the full batches of epoch ``n`` for this worker (``cfg.batch_size``
    rows each; a last partial batch is left out, as ``drop_last`` does)."""

    def __init__(self, shard: DataIterator, cfg: TrainConfig) -> None:
        self.shard, self.cfg = shard, cfg
        self.kept: Batch | None = None
        # until the rows turn out larger than the budget; with one epoch, nothing to keep for
        self.fits = cfg.cache_mb > 0 and cfg.epochs > 1
        self.device = torch.device("cpu")  # where the stream put its batches (Ray Train's)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self.kept is None and self.fits and epoch > 0:
            for _ in self._keeping(self._streamed(0)):  # a resumed run: epoch 0's order
                pass
        if self.kept is not None:
            yield from self._drawn(self.kept, epoch)
            return
        batches = self._streamed(epoch)
        if self.fits:
            batches = self._keeping(batches)
        for batch in batches:
            if _rows(batch) == self.cfg.batch_size:
                yield batch

    def _streamed(self, epoch: int) -> Iterator[Batch]:
        cfg = self.cfg
        return iter(
            self.shard.iter_torch_batches(
                batch_size=cfg.batch_size,
                prefetch_batches=cfg.prefetch_batches,
                drop_last=False,  # the tail's rows are kept too; only full batches train
                local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                local_shuffle_seed=cfg.seed + epoch if cfg.shuffle_buffer else None,
            )
        )

    def _keeping(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        """``batches`` as they come, kept on the host until they outgrow the budget."""
        kept: list[Batch] | None = []
        size = 0
        for batch in batches:
            self.device = next(iter(batch.values())).device
            if kept is not None:
                size += sum(t.nbytes for t in batch.values())
                if size > self.cfg.cache_mb * MB:
                    kept, self.fits = None, False
                else:
                    # a copy: a step may change its batch in place (masking, noise)
                    kept.append({k: t.to("cpu", copy=True) for k, t in batch.items()})
            yield batch
        if kept:
            self.kept = {k: torch.cat([b[k] for b in kept]) for k in kept[0]}

    def _drawn(self, kept: Batch, epoch: int) -> Iterator[Batch]:
        """The kept rows in a permutation seeded by the epoch, a full batch at a time."""
        rows, size = _rows(kept), self.cfg.batch_size
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        for start in range(0, rows - size + 1, size):
            index = order[start : start + size]
            yield {k: t[index].to(self.device, non_blocking=True) for k, t in kept.items()}


def _rows(batch: Batch) -> int:
    return len(next(iter(batch.values())))
