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
