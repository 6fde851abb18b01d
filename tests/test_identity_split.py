"""Laws of identities and splits (hypothesis): determinism, stability, group-awareness, ratios."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.identity import sample_id
from pipelines.same_split import ALWAYS_JOINED, join_near_sets, largest_joined
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


# ---- near duplicates join one split (pipelines.same_split) ---------------------------------


def _samples(rows: list[tuple[str, str | None, str]]) -> pa.Table:
    ids, groups, splits = zip(*rows, strict=True)
    return pa.table({"sample_id": ids, "group_id": groups, "split": splits})


def _pairs(pairs: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"a": [a for a, _ in pairs], "b": [b for _, b in pairs]}, pa.schema(
        [("a", pa.string()), ("b", pa.string())]))  # fmt: skip


def _mapping(table: pa.Table, key: str, value: str) -> dict:
    return dict(zip(table.column(key).to_pylist(), table.column(value).to_pylist(), strict=True))


def _after(samples: pa.Table, joined) -> dict[str, str]:
    return _mapping(samples, "sample_id", "split") | _mapping(joined.moves, "sample_id", "split")


def test_a_near_pair_across_splits_moves_its_whole_group_to_the_majority():
    samples = _samples([("s1", "g1", "train"), ("s2", "g1", "train"), ("s3", "g2", "test"),
                        ("s4", "g3", "test"), ("s5", None, "val")])  # fmt: skip
    joined = join_near_sets(samples, _pairs([("s1", "s3")]), by="group", pinned={})
    assert joined.moves.to_pylist() == [{"sample_id": "s3", "split": "train", "from_split": "test"}]
    assert joined.groups == {"g2": "train"}
    assert joined.counts() == {"test->train": 1}
    assert (joined.joined, joined.conflicts) == (1, 0)

    # a pinned group decides, and its whole set follows it (g1 has two samples)
    pinned = join_near_sets(samples, _pairs([("s1", "s3")]), by="group", pinned={"test": ["g2"]})
    assert _after(samples, pinned) == {"s1": "test", "s2": "test", "s3": "test", "s4": "test",
                                       "s5": "val"}  # fmt: skip
    assert pinned.groups == {"g1": "test"}

    # pinned apart: nothing moves, the conflict is counted
    apart = join_near_sets(
        samples, _pairs([("s1", "s3")]), by="group", pinned={"train": ["g1"], "test": ["g2"]}
    )
    assert apart.moves.num_rows == 0
    assert apart.conflicts == 1

    # a set larger than max_set (two speakers sharing a reused image) stays as it is
    big = join_near_sets(samples, _pairs([("s1", "s3")]), by="group", pinned={}, max_set=2)
    assert big.moves.num_rows == 0
    assert big.too_large == 1
    assert largest_joined(0.01, 100) == ALWAYS_JOINED
    assert largest_joined(0.01, 100_000) == 1000

    # a tie goes to the earlier of train, val, test (held-out splits only lose samples);
    # without groups only the sample moves; unknown ids are ignored
    tie = join_near_sets(samples, _pairs([("s4", "s5"), ("s4", "gone")]), by="group", pinned={})
    assert _after(samples, tie)["s4"] == _after(samples, tie)["s5"] == "val"
    assert tie.groups == {"g3": "val"}  # s5 has no group: nothing for later builds
    tie = join_near_sets(samples, _pairs([("s3", "s1"), ("s3", "s4")]), by="group", pinned={})
    assert set(_after(samples, tie).values()) == {"train", "val"}  # g1 2 + g2 1 + g3 1: train
    by_sample = join_near_sets(samples, _pairs([("s1", "s3")]), by="sample", pinned={})
    assert by_sample.moves.num_rows == 1
    assert by_sample.groups == {}
    same = join_near_sets(samples, _pairs([("s3", "s4")]), by="group", pinned={})
    assert same.moves.num_rows == 0
    assert same.joined == 0
    assert join_near_sets(samples, _pairs([]), by="group", pinned={}).moves.num_rows == 0


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from(["train", "val", "test"])),
        min_size=2,
        max_size=30,
    ),
    edges=st.lists(st.tuples(st.integers(0, 29), st.integers(0, 29)), max_size=20),
    pin=st.sampled_from([{}, {"test": ["g0"]}, {"val": ["g1"], "test": ["g2"]}]),
)
def test_after_joining_pairs_and_groups_share_a_split_and_pins_hold(rows, edges, pin):
    # each group starts in one split (as a build puts it), pinned groups in their pin
    pinned = {g: name for name, names in pin.items() for g in names}
    first = {}
    for group, split in rows:
        first.setdefault(f"g{group}", pinned.get(f"g{group}", split))
    samples = _samples([(f"s{i}", f"g{g}", first[f"g{g}"]) for i, (g, _) in enumerate(rows)])
    pairs = [(f"s{a}", f"s{b}") for a, b in edges if a < len(rows) and b < len(rows)]
    joined = join_near_sets(samples, _pairs(pairs), by="group", pinned=pin)
    split = _after(samples, joined)
    group = _mapping(samples, "sample_id", "group_id")
    for sid, g in group.items():  # a group never spans splits
        assert split[sid] == split[next(s for s, h in group.items() if h == g)]
    for g, name in pinned.items():  # pins hold
        assert all(split[s] == name for s, h in group.items() if h == g)
    if joined.conflicts == 0:
        assert all(split[a] == split[b] for a, b in pairs)
    moved = set(joined.moves.column("sample_id").to_pylist())
    assert all(split[s] != samples.to_pydict()["split"][int(s[1:])] for s in moved)
    later = split_batch(
        pa.table({"sample_id": ["new"] * len(joined.groups), "group_id": list(joined.groups),
                  "split": pa.nulls(len(joined.groups), pa.string())}),
        seed=0, ratios=RATIOS, groups=pin, moved=joined.groups,
    )  # fmt: skip
    assert later.column("split").to_pylist() == list(joined.groups.values())
