"""Search snapshots: made once per data file, mapped by later searches, never trusted blindly."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from features import snapshots
from features.errors import StoreError
from features.maintenance import optimize, vacuum
from features.search import ResidentColumn, search
from features.snapshots import SNAPSHOT_DIR, snapshot_name
from features.store import FeatureStore
from tests.test_search import unit, write_feature_set

FILES, ROWS, DIM = 3, 40, 8


def make_store(root: Path) -> tuple[FeatureStore, np.ndarray]:
    """``features/snap`` in three appends (three data files) of unnormalised vectors, a
    tenth of the rows without one."""
    store = FeatureStore(str(root))
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((FILES * ROWS, DIM)) * rng.uniform(0.5, 3, (FILES * ROWS, 1))
    for f in range(FILES):
        rows = range(f * ROWS, (f + 1) * ROWS)
        keys = pa.table({"sample_id": [f"s{i:03d}" for i in rows],
                         "split": [("train", "val")[i % 2] for i in rows],
                         "label": [str(i % 5) for i in rows]})  # fmt: skip
        column = [None if i % 10 == 9 else vectors[i] for i in rows]
        write_feature_set(store, "snap", keys, {"emb": column}, normalized=False)
    return store, vectors


def expected(vectors: np.ndarray, q: np.ndarray, k: int, keep=lambda i: True) -> list[str]:
    scores = unit(vectors) @ q
    order = [i for i in np.argsort(-scores) if i % 10 != 9 and keep(i)]
    return [f"s{i:03d}" for i in order[:k]]


def snapshot_files(store: FeatureStore) -> list[Path]:
    return sorted(Path(store.uri, SNAPSHOT_DIR).rglob("*"))


def no_decoding(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("decoded Parquet although every snapshot exists")

    monkeypatch.setattr(snapshots, "file_matrices", refuse)


@pytest.fixture
def query() -> np.ndarray:
    return unit(np.random.default_rng(1).standard_normal(DIM))


def test_a_search_makes_one_snapshot_per_file_and_later_ones_decode_nothing(
    tmp_path, monkeypatch, query
):
    store, vectors = make_store(tmp_path)
    first = search(store, "snap", vector=query, k=7)
    assert first["sample_id"].to_pylist() == expected(vectors, query, 7)
    made = snapshot_files(store)
    assert [p.suffix for p in made if p.is_file()] == [".arrow"] * FILES

    no_decoding(monkeypatch)
    again = search(store, "snap", vector=query, k=7)
    assert again["sample_id"].to_pylist() == first["sample_id"].to_pylist()
    np.testing.assert_allclose(again["score"].to_numpy(), first["score"].to_numpy(), rtol=1e-6)
    decoded = search(store, "snap", vector=query, k=7, snapshots=False, chunk_rows=11)
    assert decoded["sample_id"].to_pylist() == first["sample_id"].to_pylist()

    by_id = search(store, "snap", sample_id="s004", k=5)  # its vector from the snapshots
    assert by_id["sample_id"].to_pylist() == expected(
        vectors, unit(vectors[4]), 5, lambda i: i != 4
    )
    with pytest.raises(StoreError, match="has no emb"):  # a row without one: said so
        search(store, "snap", sample_id="s009", k=5)
    with pytest.raises(StoreError, match="no row sample_id='nope'"):
        search(store, "snap", sample_id="nope", k=5)

    train = search(store, "snap", vector=query, k=7, where="split = 'train' AND label <> '0'")
    keep = lambda i: i % 2 == 0 and i % 5 != 0  # noqa: E731
    assert train["sample_id"].to_pylist() == expected(vectors, query, 7, keep)

    held = ResidentColumn.load(store, "snap", "emb")
    ids = held.keys.column("sample_id").to_pylist()
    stored = unit(vectors[[int(i[1:]) for i in ids]])
    np.testing.assert_allclose(held.matrix, stored, rtol=1e-6)
    assert snapshot_files(store) == made


@pytest.mark.parametrize(
    "damage", ["truncated", "another file's", "not arrow", "wrong width", "hostile offsets"]
)
def test_a_damaged_snapshot_is_ignored_and_made_again(tmp_path, monkeypatch, query, damage):
    store, vectors = make_store(tmp_path)
    search(store, "snap", vector=query, k=5)
    victim, other = [p for p in snapshot_files(store) if p.is_file()][:2]
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    elif damage == "another file's":
        victim.write_bytes(other.read_bytes())
    elif damage == "not arrow":
        victim.write_bytes(b"PAR1 not a snapshot")
    else:
        table = pa.ipc.open_file(pa.memory_map(str(victim))).read_all()
        if damage == "wrong width":  # same file, same keys, vectors of another width
            column = pa.FixedSizeListArray.from_arrays(
                pa.array(np.zeros(table.num_rows * 4, "f4")), 4
            )
            table = table.set_column(table.num_columns - 1, snapshots.VECTOR, column)
        else:  # ids whose offsets run backwards: a reader trusting them reads out of bounds
            offsets = np.tile(np.array([0, 10], np.int32), table.num_rows // 2 + 1)
            offsets = offsets[: table.num_rows + 1].copy()
            offsets[-1] = 10
            ids = pa.StringArray.from_buffers(
                table.num_rows, pa.py_buffer(offsets), pa.py_buffer(b"x" * 10)
            )
            table = table.set_column(0, table.schema.field(0), ids)
        with pa.OSFile(str(victim), "wb") as out, pa.ipc.new_file(out, table.schema) as w:
            w.write_table(table)

    hits = search(store, "snap", vector=query, k=5)
    assert hits["sample_id"].to_pylist() == expected(vectors, query, 5)
    no_decoding(monkeypatch)  # the damaged one was made again
    assert search(store, "snap", vector=query, k=5)["sample_id"].to_pylist() == expected(
        vectors, query, 5
    )


def test_a_store_that_takes_no_snapshots_is_searched_by_decoding(tmp_path, query):
    store, vectors = make_store(tmp_path)
    Path(store.uri, SNAPSHOT_DIR).write_text("a file where the folder would go")
    hits = search(store, "snap", vector=query, k=5, where="split = 'val'")
    assert hits["sample_id"].to_pylist() == expected(vectors, query, 5, lambda i: i % 2 == 1)
    held = ResidentColumn.load(store, "snap", "emb")
    assert len(held.matrix) == FILES * ROWS * 9 // 10


def test_data_file_paths_from_the_log_name_files_inside_the_folder():
    paths = ["../../etc/passwd", "/abs/part.parquet", "a/b.parquet", "a_b.parquet", "..", ""]
    names = [snapshot_name(p) for p in paths]
    assert all("/" not in n and not n.startswith(".") and n.endswith(".arrow") for n in names)
    assert len(set(names)) == len(names)


def test_concurrent_first_searches_agree_and_leave_one_snapshot_per_file(tmp_path, query):
    store, vectors = make_store(tmp_path)
    with ThreadPoolExecutor(4) as pool:  # four first searches at once, each making them
        futures = [pool.submit(search, store, "snap", vector=query, k=5) for _ in range(4)]
    results = [f.result()["sample_id"].to_pylist() for f in futures]
    assert results == [expected(vectors, query, 5)] * 4
    assert [p.suffix for p in snapshot_files(store) if p.is_file()] == [".arrow"] * FILES


def test_vacuum_deletes_the_snapshots_no_search_can_use(tmp_path, monkeypatch, query):
    """Those of compacted-away files, of a dropped feature set and a killed write's
    staging file go; the snapshot of the live file stays and is used."""
    store, vectors = make_store(tmp_path)
    search(store, "snap", vector=query, k=5)
    old = {p.name for p in snapshot_files(store) if p.is_file()}
    optimize(store, "features/snap")
    search(store, "snap", vector=query, k=5)
    live = {p.name for p in snapshot_files(store) if p.is_file()} - old
    assert len(live) == 1
    root = Path(store.uri, SNAPSHOT_DIR)
    (root / "dropped" / "emb").mkdir(parents=True)
    (root / "dropped" / "emb" / "0123456789ab-part-x.parquet.arrow").write_bytes(b"x")
    staging = root / "snap" / "emb" / f"{next(iter(live))}.deadbeef.tmp"
    staging.write_bytes(b"half")

    plan = vacuum(store, retention_hours=0, force=True, dry_run=True)
    doomed = {p.rsplit("/", 1)[-1] for p in plan[SNAPSHOT_DIR]}
    assert doomed == old | {"0123456789ab-part-x.parquet.arrow", staging.name}
    assert len(plan["features/snap"]) == FILES
    assert staging.exists()  # a dry run deletes nothing

    vacuum(store, retention_hours=0, force=True, dry_run=False)
    assert {p.name for p in snapshot_files(store) if p.is_file()} == live
    no_decoding(monkeypatch)
    assert search(store, "snap", vector=query, k=5)["sample_id"].to_pylist() == expected(
        vectors, query, 5
    )


def test_a_filter_is_right_when_only_some_files_have_snapshots(tmp_path, query):
    """The first file's snapshot is missing: it is decoded after the mapped ones, so the
    filter's rows must follow each file, not the order files come in."""
    store, vectors = make_store(tmp_path)
    search(store, "snap", vector=query, k=5)
    first = store.delta("features/snap").file_uris()[0].rsplit("/", 1)[-1]
    (made,) = [p for p in snapshot_files(store) if p.name.endswith(f"-{first}.arrow")]
    made.unlink()
    hits = search(store, "snap", vector=query, k=9, where="label IN ('1', '2')")
    keep = lambda i: i % 5 in (1, 2)  # noqa: E731
    assert hits["sample_id"].to_pylist() == expected(vectors, query, 9, keep)
