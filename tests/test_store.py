"""The crash-safe output store: atomic parts, resume keys, no duplicates."""

from __future__ import annotations

import pandas as pd
import pytest

from kit.errors import CompkitError
from kit.store import OutputStore


def rows(ids, repeat=0):
    return pd.DataFrame(
        {"item_id": ids, "repeat": [repeat] * len(ids), "output": [f"o-{i}" for i in ids]}
    )


def test_append_read_and_done_keys(tmp_path):
    store = OutputStore(tmp_path / "m")
    store.append(rows(["a", "b"]))
    store.append(rows(["a"], repeat=1))
    assert store.done_keys() == {("a", 0), ("b", 0), ("a", 1)}
    assert store.read()["item_id"].tolist() == ["a", "b", "a"]
    assert [p.name for p in store.parts()] == ["part-000000.parquet", "part-000001.parquet"]


def test_duplicate_keys_are_refused(tmp_path):
    store = OutputStore(tmp_path / "m")
    store.append(rows(["a"]))
    with pytest.raises(CompkitError, match="already stored"):
        store.append(rows(["a", "c"]))
    assert len(store.read()) == 1


def test_stale_temp_files_from_a_killed_writer_are_ignored(tmp_path):
    store = OutputStore(tmp_path / "m")
    store.append(rows(["a"]))
    (tmp_path / "m" / ".part-000001.parquet.tmp-999").write_bytes(b"half a parquet file")
    reopened = OutputStore(tmp_path / "m")
    assert reopened.done_keys() == {("a", 0)}
    assert not list((tmp_path / "m").glob(".part-*"))


def test_complete_marker_is_cleared_by_new_rows(tmp_path):
    store = OutputStore(tmp_path / "m")
    store.append(rows(["a"]))
    store.mark_complete(rows=1)
    assert store.is_complete()
    store.append(rows(["b"]))
    assert not store.is_complete()
    store.clear()
    assert store.read().empty


def _append_many(root: str, writer: int, n: int, start) -> None:
    """One writer process: ``n`` single-row parts with keys of its own."""
    start.wait()
    store = OutputStore(root)
    for i in range(n):
        store.append(rows([f"w{writer}-{i}"]))


def test_concurrent_writers_never_share_a_part_number_or_lose_a_row(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    writers = [
        ctx.Process(target=_append_many, args=(str(tmp_path / "m"), w, 15, start)) for w in range(4)
    ]
    for p in writers:
        p.start()
    start.set()  # all four race from here
    for p in writers:
        p.join(timeout=120)
        assert p.exitcode == 0
    store = OutputStore(tmp_path / "m")
    frame = store.read()
    assert len(frame) == 60 and not frame.duplicated(["item_id", "repeat"]).any()
    assert [p.name for p in store.parts()] == [f"part-{i:06d}.parquet" for i in range(60)]


def test_a_writer_sees_keys_another_writer_stored(tmp_path):
    first, second = OutputStore(tmp_path / "m"), OutputStore(tmp_path / "m")
    assert second.done_keys() == set()
    first.append(rows(["a", "b"]))
    assert second.done_keys() == set()  # cached until asked to refresh
    assert second.done_keys(refresh=True) == {("a", 0), ("b", 0)}
    with pytest.raises(CompkitError, match="already stored"):
        OutputStore(tmp_path / "m").append(rows(["b"]))
    # a shard of a resumed run drops what another writer stored meanwhile, keeps the rest
    fresh = OutputStore(tmp_path / "m")
    fresh.done_keys()
    first.append(rows(["c"]))
    fresh.append(rows(["c", "d"]), skip_stored=True)
    assert fresh.append(rows(["a"]), skip_stored=True) is None
    assert sorted(fresh.read()["item_id"]) == ["a", "b", "c", "d"]


def test_opening_a_store_keeps_a_temp_file_whose_writer_holds_the_lock(tmp_path):
    import threading

    store = OutputStore(tmp_path / "m")
    tmp = tmp_path / "m" / ".part-000000.parquet.tmp-otherhost-1-abc"
    opened = threading.Event()
    with store._locked():
        tmp.write_bytes(b"being written")
        t = threading.Thread(target=lambda: (OutputStore(tmp_path / "m"), opened.set()))
        t.start()
        assert not opened.wait(0.5)  # the new store waits for the writer...
        assert tmp.exists()  # ...and leaves its file alone
    t.join(timeout=30)
    assert opened.is_set() and not tmp.exists()  # once released, the leftover is stale
