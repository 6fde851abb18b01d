"""Retrieval metrics are honest: a tie with the true item counts against the query."""

from __future__ import annotations

import pytest
import torch

from jobs.pretrain.metrics import recall_at_k


def test_recall_counts_ties_against_the_query():
    items = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 are identical
    recall = recall_at_k(items, items, ks=(1, 2))
    assert recall["r@1"] == pytest.approx(1 / 3)  # only row 2 finds itself first for sure
    assert recall["r@2"] == 1.0


def test_recall_of_distinct_items_is_their_rank():
    queries = torch.eye(3)
    items = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.2, 1.0], [0.0, 1.0, 0.1]])
    recall = recall_at_k(queries, items, ks=(1, 2))
    assert recall == {"r@1": pytest.approx(1 / 3), "r@2": 1.0}
