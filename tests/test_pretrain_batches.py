"""Each worker's epochs: streamed first, then drawn from the kept rows when they fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.pretrain.batches import EpochBatches
from jobs.pretrain.config import TrainConfig

pytestmark = pytest.mark.usefixtures("ray_session")
ROWS, BATCH = 30, 4  # 7 full batches an epoch; 2 rows left over


def _shard():
    import ray.data

    rows = np.arange(ROWS, dtype=np.int64)
    ds = ray.data.from_items([{"i": int(i), "x": [float(i)] * 3} for i in rows])
    return ds.repartition(3).iterator()


def _config(**over) -> TrainConfig:
    values = {"batch_size": BATCH, "shuffle_buffer": 8, "prefetch_batches": 1, "seed": 5}
    return TrainConfig.model_construct(**(values | over))


def _ids(batches) -> list[list[int]]:
    return [b["i"].tolist() for b in batches]


def test_later_epochs_draw_every_kept_row_in_a_seeded_order():
    batches = EpochBatches(_shard(), _config())
    first = list(batches.epoch(0))
    streamed = _ids(
        _shard().iter_torch_batches(
            batch_size=BATCH, drop_last=True, local_shuffle_buffer_size=8, local_shuffle_seed=5
        )
    )
    assert _ids(first) == streamed  # the first epoch is the stream, full batches only
    first[0]["x"].fill_(-1.0)  # a step that changes its batch in place ...
    assert batches.kept is not None
    assert sorted(batches.kept["i"].tolist()) == list(range(ROWS))  # every row, tail too
    assert (batches.kept["x"] >= 0).all()  # ... does not change the kept rows
    epochs = [_ids(batches.epoch(e)) for e in (1, 2)]
    for ids in epochs:
        assert len(ids) == ROWS // BATCH
        assert all(len(b) == BATCH for b in ids)
        flat = [i for b in ids for i in b]
        assert len(set(flat)) == len(flat)  # each row at most once an epoch
    assert epochs[0] != epochs[1]  # a new order each epoch
    assert batches.epoch(1).__next__()["x"].dtype == torch.float64

    resumed = EpochBatches(_shard(), _config())  # a run resumed in epoch 2: same batches
    assert _ids(resumed.epoch(2)) == epochs[1]


def test_a_shard_over_the_budget_or_a_single_epoch_streams():
    for over in ({"cache_mb": 0}, {"cache_mb": 1e-6}, {"epochs": 1}):  # off, tiny, no need
        config = _config(**over)
        batches = EpochBatches(_shard(), config)
        for epoch in range(min(config.epochs, 2)):
            want = _shard().iter_torch_batches(
                batch_size=BATCH,
                drop_last=True,
                local_shuffle_buffer_size=8,
                local_shuffle_seed=5 + epoch,
            )
            assert _ids(batches.epoch(epoch)) == _ids(want)
            assert batches.kept is None
