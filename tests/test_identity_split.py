"""Laws of identities and splits (hypothesis): determinism, stability, group-awareness, ratios."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.identity import sample_id
from pipelines.split import assign_split, split_batch

RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}
keys = st.text(min_size=1, max_size=40)


@given(text=st.text(min_size=1, max_size=50), seed=st.integers(0, 2**31))
def test_sample_id_is_deterministic_and_content_sensitive(text, seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (4, 5, 3), np.uint8)
    a = sample_id(text=text, pixels=pixels)
    assert a == sample_id(text=text, pixels=pixels.copy())
    assert len(a) == 32
    changed = pixels.copy()
    changed[0, 0, 0] ^= 1
    assert sample_id(text=text, pixels=changed) != a
    assert sample_id(text=text) != a  # a modality more or less is another sample


def test_sample_id_modalities_cannot_alias():
    audio = np.zeros((10, 1), np.float32)
    assert sample_id(audio=audio, sample_rate=16000) != sample_id(audio=audio, sample_rate=8000)
    assert sample_id(text="ab") != sample_id(text="a")


@given(key=keys, seed=st.integers(0, 1000))
def test_split_is_a_pure_function(key, seed):
    assert assign_split(key, seed=seed, ratios=RATIOS) == assign_split(
        key, seed=seed, ratios=dict(RATIOS)
    )


@given(old=st.lists(keys, min_size=1, max_size=50, unique=True), new=st.lists(keys, max_size=50))
def test_adding_data_never_moves_existing_samples(old, new):
    def splits(ids):
        table = pa.table(
            {
                "sample_id": ids,
                "group_id": pa.nulls(len(ids), pa.string()),
                "split": pa.nulls(len(ids), pa.string()),
            }
        )
        out = split_batch(table, seed=7, ratios=RATIOS)
        return dict(zip(ids, out.column("split").to_pylist(), strict=True))

    before = splits(old)
    after = splits(old + [k for k in new if k not in before])
    assert all(after[k] == before[k] for k in old)


@given(group=keys, members=st.lists(keys, min_size=2, max_size=20, unique=True))
def test_a_group_shares_one_split(group, members):
    table = pa.table(
        {
            "sample_id": members,
            "group_id": [group] * len(members),
            "split": pa.nulls(len(members), pa.string()),
        }
    )
    assert len(set(split_batch(table, seed=1, ratios=RATIOS).column("split").to_pylist())) == 1


@settings(max_examples=10, deadline=None)
@given(
    train=st.floats(0.05, 0.9),
    val_share=st.floats(0.0, 1.0),
    seed=st.integers(0, 100),
)
def test_ratios_hold_on_large_n(train, val_share, seed):
    val = (1 - train) * val_share
    ratios = {"train": train, "val": val, "test": 1 - train - val}
    n = 20_000
    counts = {"train": 0, "val": 0, "test": 0}
    for i in range(n):
        counts[assign_split(f"id-{i}", seed=seed, ratios=ratios)] += 1
    for name, ratio in ratios.items():
        # binomial standard deviation at n=20k is < 0.0036; 0.015 is > 4 sigma
        assert abs(counts[name] / n - ratio) < 0.015


def test_zero_ratio_split_gets_nothing():
    ratios = {"train": 0.5, "val": 0.0, "test": 0.5}
    assert {assign_split(str(i), seed=0, ratios=ratios) for i in range(2000)} == {"train", "test"}


def test_pinned_groups_go_to_their_split_and_the_rest_do_not_move():
    speakers = ["jackson", "lucas", "nicolas", "theo", "yweweler"]
    batch = pa.table(
        {
            "sample_id": [f"s{i}" for i in range(50)],
            "group_id": [speakers[i % 5] for i in range(50)],
            "split": pa.nulls(50, pa.string()),
        }
    )
    ratios = {"train": 1.0}
    pinned = split_batch(
        batch, seed=0, ratios=ratios, groups={"test": ["theo"], "val": ["lucas"]}
    ).to_pylist()
    free = split_batch(batch, seed=0, ratios=ratios).to_pylist()
    for row, before in zip(pinned, free, strict=True):
        expected = {"theo": "test", "lucas": "val"}.get(row["group_id"], before["split"])
        assert row["split"] == expected
    assert {r["split"] for r in pinned} == {"train", "val", "test"}


def test_a_group_pinned_to_two_splits_is_a_spec_error():
    import pytest
    from pydantic import ValidationError

    from pipelines.spec import SplitSpec

    with pytest.raises(ValidationError, match="'theo' is pinned to both test and val"):
        SplitSpec(groups={"test": ["theo"], "val": ["theo"]})
    with pytest.raises(ValidationError, match="needs `by: group`"):
        SplitSpec(by="sample", groups={"test": ["theo"]})
