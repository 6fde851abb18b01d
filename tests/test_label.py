"""The label stage decides which label each sample keeps and where it came from;
a wrong priority or a stray class silently skews every model trained on the store."""

from __future__ import annotations

import pickle
from typing import Any

import pyarrow as pa
import pytest
import yaml
from pydantic import ValidationError

from features.schema import SAMPLES, conform
from pipelines.errors import SpecError
from pipelines.label import (
    LABELLERS,
    Labeller,
    LabelSpec,
    UnknownLabel,
    class_balance,
    label_batch,
    label_vocabulary,
)

BATCH = pa.schema(
    [
        *SAMPLES,
        pa.field("error_stage", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
    ]
)
LABEL_COLUMNS = ["label", "labels", "label_source", "label_confidence"]


def make_batch(*rows: dict[str, Any]) -> pa.Table:
    """Collect-shaped rows: ``labels`` mirrors ``label`` as collect writes it."""
    full = []
    for n, row in enumerate(rows):
        row = {"sample_id": f"s{n}", "split": "train", **row}
        if row.get("label") and "labels" not in row:
            row["labels"] = [row["label"]]
        full.append(row)
    return conform(pa.Table.from_pylist(full, schema=BATCH), BATCH)


def spec(**raw: Any) -> LabelSpec:
    return LabelSpec.model_validate(raw)


def labelled(batch: pa.Table, **raw: Any) -> list[dict[str, Any]]:
    out = label_batch(batch, spec=spec(**raw))
    assert out.schema == batch.schema
    assert out.num_rows == batch.num_rows
    return out.select([*LABEL_COLUMNS, "error_type", "error_message"]).to_pylist()


ANIMALS = make_batch(
    {"text": "a cat on a mat", "label": "kitty", "label_source": "manifest"},
    {"text": "a dog in the park", "label": "dogs", "label_source": "folder"},
    {"text": "a category of birds", "label": "bird", "label_source": "webdataset"},
    {"text": None},
)
CAT_RULES = {"kind": "rules", "rules": [{"label": "cat", "pattern": r"\bcats?\b"}]}
DOG_WORDS = {"kind": "rules", "keywords": {"dog": ["dog", "puppy"]}}


def test_manifest_keeps_manifest_and_webdataset_labels_with_their_provenance():
    rows = labelled(ANIMALS, sources=[{"kind": "manifest"}])
    assert [r["label"] for r in rows] == ["kitty", None, "bird", None]
    assert [r["label_source"] for r in rows] == ["manifest", None, "webdataset", None]
    assert [r["labels"] for r in rows] == [["kitty"], [], ["bird"], []]
    assert [r["label_confidence"] for r in rows] == [1.0, None, 1.0, None]


def test_folder_keeps_only_folder_labels():
    rows = labelled(ANIMALS, sources=[{"kind": "folder"}])
    assert [(r["label"], r["label_source"]) for r in rows] == [
        (None, None),
        ("dogs", "folder"),
        (None, None),
        (None, None),
    ]


def test_rules_regex_and_whole_word_keywords():
    batch = make_batch(
        {"text": "Two CATS"}, {"text": "a puppy"}, {"text": "hotdog"}, {"text": None}
    )
    rows = labelled(batch, sources=[CAT_RULES, DOG_WORDS])
    assert [r["label"] for r in rows] == ["cat", "dog", None, None]  # "hotdog" is not a word match
    assert rows[0]["label_source"] == "rules"
    assert rows[0]["label_confidence"] == 1.0
    assert rows[2]["labels"] == []


def test_rules_respect_ignore_case_false_and_keyword_phrases():
    batch = make_batch(
        {"text": "Cat"}, {"text": "a golden   retriever"}, {"text": "goldenretriever"}
    )
    rules = {
        "kind": "rules",
        "rules": [{"label": "cat", "pattern": "cat", "ignore_case": False}],
        "keywords": {"retriever": ["Golden Retriever"]},
    }
    assert [r["label"] for r in labelled(batch, sources=[rules])] == [None, "retriever", None]


def test_function_source_accepts_str_list_and_none():
    batch = make_batch({"text": "a rather long caption here"}, {"text": "short"}, {"text": None})
    fn = {"kind": "function", "path": "tests.labelfns:by_length"}
    single = labelled(batch, sources=[fn])
    assert [r["labels"] for r in single] == [["long"], ["short"], []]
    assert single[0]["label_source"] == "function"
    multi = labelled(batch, sources=[fn], multi_label=True)
    assert multi[1]["labels"] == ["short", "tiny"]
    assert multi[1]["label"] == "short"


def test_priority_order_decides_the_single_label():
    batch = make_batch({"text": "a cat", "label": "dogs", "label_source": "folder"})
    folder_first = labelled(batch, sources=[{"kind": "folder"}, CAT_RULES])
    rules_first = labelled(batch, sources=[CAT_RULES, {"kind": "folder"}])
    assert (folder_first[0]["label"], folder_first[0]["label_source"]) == ("dogs", "folder")
    assert (rules_first[0]["label"], rules_first[0]["label_source"]) == ("cat", "rules")
    assert folder_first[0]["labels"] == ["dogs"]  # single-label keeps one


def test_later_source_fills_in_when_earlier_has_nothing():
    batch = make_batch(
        {"text": "a cat"}, {"text": "a dog", "label": "x", "label_source": "manifest"}
    )
    rows = labelled(batch, sources=[{"kind": "manifest"}, CAT_RULES])
    assert [(r["label"], r["label_source"]) for r in rows] == [("cat", "rules"), ("x", "manifest")]


def test_multi_label_unions_sources_in_priority_order_without_duplicates():
    batch = make_batch(
        {"text": "a cat and a puppy", "label": "cat", "label_source": "folder"},
        {"text": "a puppy"},
    )
    rows = labelled(batch, sources=[{"kind": "folder"}, CAT_RULES, DOG_WORDS], multi_label=True)
    assert rows[0]["labels"] == ["cat", "dog"]
    assert (rows[0]["label"], rows[0]["label_source"]) == ("cat", "folder")
    assert (rows[1]["labels"], rows[1]["label_source"]) == (["dog"], "rules")


def test_closed_vocabulary_quarantines_a_stray_label_and_keeps_the_rest():
    batch = make_batch(
        {"text": "a", "label": "cat", "label_source": "manifest"},
        {"text": "b", "label": "dgo", "label_source": "manifest"},
        {"text": "c"},
    )
    vocabulary = ["cat", "dog", "bird", "fish", "frog", "horse"]
    rows = labelled(batch, sources=[{"kind": "manifest"}], vocabulary=vocabulary)
    assert rows[0]["label"] == "cat"
    assert rows[0]["error_type"] is None
    assert rows[1]["error_type"] == "UnknownLabel"
    message = rows[1]["error_message"]
    assert "'dgo'" in message
    assert "did you mean 'dog'" in message
    assert "'cat', 'dog'" in message
    assert "6 in all" in message
    assert rows[1]["label_source"] == "manifest"  # an error row keeps its input label columns
    assert (rows[2]["label"], rows[2]["error_type"]) == (None, None)  # unlabelled is fine
    out = label_batch(batch, spec=spec(vocabulary=vocabulary))
    assert out.column("error_stage").to_pylist() == [None, "label", None]


def test_vocabulary_without_error_columns_raises_unknown_label():
    table = conform(
        pa.Table.from_pylist([{"sample_id": "s", "label": "x", "label_source": "manifest"}]),
        SAMPLES,
    )
    with pytest.raises(UnknownLabel, match="'x'"):
        label_batch(table, spec=spec(vocabulary=["cat"]))
    assert UnknownLabel.stage == "label"


def test_rows_already_in_error_pass_through_untouched():
    batch = make_batch(
        {"text": "a cat", "label": "kitty", "label_source": "folder"},
        {
            "text": "a cat",
            "label": "weird",
            "label_source": "manifest",
            "error_stage": "collect",
            "error_type": "ImageDecodeError",
            "error_message": "bad bytes",
        },
    )
    out = label_batch(batch, spec=spec(sources=[CAT_RULES], vocabulary=["cat"]))
    assert out.slice(1).to_pylist() == batch.slice(1).to_pylist()
    assert out.column("label").to_pylist() == ["cat", "weird"]


def test_a_batch_of_only_error_rows_is_returned_as_is():
    batch = make_batch({"text": "a cat", "error_stage": "collect", "error_type": "EmptyFile"})
    assert label_batch(batch, spec=spec(sources=[CAT_RULES])).equals(batch)


def test_bad_regex_is_rejected_at_load_naming_it():
    bad = {"kind": "rules", "rules": [{"label": "x", "pattern": "cat(s"}]}
    with pytest.raises(ValidationError, match=r"'cat\(s' is not a valid regular expression"):
        spec(sources=[bad])


@pytest.mark.parametrize("path", ["tests.labelfns", "tests/labelfns.py:f", ":f", "a:b:c"])
def test_bad_function_path_is_rejected_at_load(path):
    with pytest.raises(ValidationError, match="must look like 'package.module:function'"):
        spec(sources=[{"kind": "function", "path": path}])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"sources": [{"kind": "oracle"}]}, "manifest"),  # the error lists the known kinds
        ({"sources": [{"kind": "folder", "x": 1}]}, "Extra inputs are not permitted"),
        ({"sources": [{"kind": "rules"}]}, "needs `rules` or `keywords`"),
        ({"sources": [CAT_RULES], "vocabulary": ["dog"]}, r"\['cat'\] that are not in the vocab"),
        ({"vocabulary": ["a", "a"]}, "repeats"),
        ({"sources": []}, "at least 1 item"),
    ],
)
def test_invalid_specs_are_rejected(raw, message):
    with pytest.raises(ValidationError, match=message):
        LabelSpec.model_validate(raw)


def test_function_returning_wrong_length_is_a_spec_error_naming_it():
    batch = make_batch({"text": "a"}, {"text": "b"})
    with pytest.raises(SpecError, match="tests.labelfns:too_few returned 1 labels for 2 rows"):
        label_batch(
            batch, spec=spec(sources=[{"kind": "function", "path": "tests.labelfns:too_few"}])
        )


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("tests.no_such_module:f", "'tests.no_such_module:f' cannot be imported"),
        ("tests.labelfns:missing", "'tests.labelfns:missing' cannot be imported"),
        ("tests.labelfns:NOT_A_FUNCTION", "is not callable"),
    ],
)
def test_unimportable_function_is_a_spec_error_naming_the_path(path, message):
    labeller = Labeller(spec(sources=[{"kind": "function", "path": path}]))
    with pytest.raises(SpecError, match=message):
        labeller.check()
    with pytest.raises(SpecError, match=message):
        labeller(make_batch({"text": "a"}))


def test_labeller_pickles_without_its_compiled_state():
    labeller = Labeller(
        spec(sources=[CAT_RULES, {"kind": "function", "path": "tests.labelfns:by_length"}])
    )
    before = labeller(ANIMALS)
    assert labeller._sources is not None
    clone = pickle.loads(pickle.dumps(labeller))
    assert clone._sources is None
    assert clone(ANIMALS).equals(before)


def test_yaml_section_validates_and_registry_covers_every_kind():
    raw = yaml.safe_load(
        """
        sources:
          - kind: manifest
          - kind: folder
          - kind: rules
            rules:
              - {label: cat, pattern: "\\\\bcats?\\\\b"}
            keywords:
              dog: [dog, puppy]
          - kind: function
            path: tests.labelfns:by_length
        multi_label: false
        vocabulary: [cat, dog, long, short]
        """
    )
    parsed = LabelSpec.model_validate(raw)
    assert [s.kind for s in parsed.sources] == ["manifest", "folder", "rules", "function"]
    assert parsed.sources[2].rules[0].pattern == r"\bcats?\b"
    assert {s.kind for s in parsed.sources} <= set(LABELLERS)
    assert [s.kind for s in LabelSpec().sources] == ["manifest", "folder"]


def test_label_vocabulary():
    assert label_vocabulary(None) is None
    assert label_vocabulary(spec()) is None  # manifest / folder labels are open-ended
    assert label_vocabulary(spec(vocabulary=["b", "a"])) == ["b", "a"]
    assert label_vocabulary(spec(sources=[CAT_RULES, DOG_WORDS])) == ["cat", "dog"]


def test_class_balance_counts_per_split_with_none_for_unlabelled():
    table = make_batch(
        {"split": "val", "label": "cat"},
        {"split": "train", "label": "dog"},
        {"split": "train", "label": "cat"},
        {"split": "train", "label": "cat"},
        {"split": "train"},
        {"split": None, "label": "cat"},
        {"split": "train", "label": "dog", "error_type": "UnknownLabel"},
    )
    balance = class_balance(table)
    assert balance == {
        "train": {"cat": 2, "dog": 1, "(none)": 1},
        "val": {"cat": 1},
        "(none)": {"cat": 1},
    }
    assert list(balance) == ["train", "val", "(none)"]
    assert list(balance["train"]) == ["cat", "dog", "(none)"]
    assert class_balance(table.drop_columns(["error_stage", "error_type", "error_message"]))[
        "train"
    ] == {"cat": 2, "dog": 2, "(none)": 1}
