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


def _clusters(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    fixed = torch.Generator().manual_seed(0)  # the same four classes in every draw
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=fixed), dim=1) * 3
    g = torch.Generator().manual_seed(seed)
    labels = [f"c{i % 4}" for i in range(n)]
    x = centres[[i % 4 for i in range(n)]] + torch.randn(n, 16, generator=g) * 0.5
    return torch.nn.functional.normalize(x, dim=1), labels


def test_knn_and_linear_probe_read_classes_from_clustered_features_only():
    from jobs.pretrain.metrics import knn_accuracy, linear_probe_accuracy

    train, train_labels = _clusters(80, seed=0)
    test, test_labels = _clusters(40, seed=1)
    test_labels[-1] = "unseen"  # a class the train rows lack is not scored
    for accuracy in (knn_accuracy, linear_probe_accuracy):
        acc, n = accuracy(train, train_labels, test, test_labels)
        assert n == 39
        assert acc >= 0.95
    shuffled = [f"c{(i * 4) // 80}" for i in range(80)]  # labels unrelated to the clusters
    for accuracy in (knn_accuracy, linear_probe_accuracy):
        acc, _ = accuracy(train, shuffled, test, test_labels)
        assert acc <= 0.6  # far from what the real labels give
