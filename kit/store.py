"""Crash-safe, resumable per-item results.

Results of one model live in ``runs/NAME/outputs/<model>/`` as Parquet parts, one part per
finished batch. A part is written to a temporary file, flushed and fsynced, then renamed into
place (``os.replace`` is atomic on POSIX), so a process killed at any moment leaves either the
whole part or none of it. On restart the finished ``(item_id, repeat)`` keys are read back and
only the rest is run: nothing is lost and nothing is duplicated.

Several processes may append to one store at once (the shards of a Ray run,
:mod:`kit.execute_ray`): every append holds an exclusive lock on ``.append.lock`` in the store
folder (``filelock``, an ``fcntl`` lock the kernel releases when its holder dies, also on
``kill -9``) while it reads the parts other writers added, refuses or drops keys already stored,
numbers its part and renames it into place. Part numbers are therefore never shared, and a key
is never stored twice, whoever wrote it. Across machines this needs a shared filesystem with
POSIX locks (NFSv4, Lustre, EFS); on one machine any local filesystem will do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from kit.errors import CompkitError


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_PART = re.compile(r"^part-(\d{6})\.parquet$")
KEY = ["item_id", "repeat"]
#: How long an append waits for another writer's lock before it gives up (seconds).
LOCK_TIMEOUT_S = 300.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(
        path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    )


class OutputStore:
    """Append-only store of one model's per-(item, repeat) rows; safe for several writers."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._done: set[tuple[str, int]] | None = None  # read once, then kept up to date
        self._seen: set[str] = set()  # part names whose keys are in _done
        with self._locked():  # a temp file present while we hold the lock has no live writer
            for stale in self.root.glob(".part-*.tmp-*"):
                stale.unlink(missing_ok=True)

    @property
    def complete_marker(self) -> Path:
        return self.root / "_COMPLETE.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".append.lock"

    def _locked(self) -> FileLock:
        return FileLock(self.lock_file, timeout=LOCK_TIMEOUT_S, thread_local=False)

    def parts(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if _PART.match(p.name))

    def append(self, frame: pd.DataFrame, *, skip_stored: bool = False) -> Path | None:
        """Atomically add rows; refuses keys that are already stored.

        Parameters
        ----------
        frame
            Rows with ``item_id`` and ``repeat`` columns.
        skip_stored
            Drop rows whose key another writer stored meanwhile instead of refusing them
            (shards of a resumed run: the same key always gets the same request and seed).

        Returns
        -------
        The part written, or ``None`` when no row was left to write.
        """
        if frame.empty:
            return None
        missing = [c for c in KEY if c not in frame.columns]
        if missing:
            raise ValueError(f"rows need columns {KEY}; missing {missing}")
        try:
            with self._locked():
                return self._append_locked(frame, skip_stored=skip_stored)
        except Timeout:
            raise CompkitError(
                f"{self.lock_file}: another writer held the store's lock for over "
                f"{LOCK_TIMEOUT_S:.0f}s; is a filesystem lock server unreachable?"
            ) from None

    def _append_locked(self, frame: pd.DataFrame, *, skip_stored: bool) -> Path | None:
        existing = self._refresh()
        keys = list(zip(frame["item_id"], frame["repeat"], strict=True))
        clash = self._done & set(keys)  # type: ignore[operator]  # _refresh() filled it
        if clash and skip_stored:
            frame = frame[[k not in clash for k in keys]]
            keys = [k for k in keys if k not in clash]
            if frame.empty:
                return None
        elif clash:
            raise CompkitError(
                f"{self.root}: {len(clash)} row(s) already stored, e.g. {sorted(clash)[:3]}"
            )
        number = int(_PART.match(existing[-1].name).group(1)) + 1 if existing else 0
        path = self.root / f"part-{number:06d}.parquet"
        tmp = (
            self.root
            / f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.root)
        self._done |= set(keys)  # type: ignore[operator]
        self._seen.add(path.name)
        self.complete_marker.unlink(missing_ok=True)
        return path

    def _refresh(self) -> list[Path]:
        """Read the keys of parts not seen yet (other writers' too); returns every part."""
        if self._done is None:
            self._done = set()
        parts = self.parts()
        for part in parts:
            if part.name not in self._seen:
                t = pq.read_table(part, columns=KEY)
                self._done.update(
                    zip(
                        t.column("item_id").to_pylist(), t.column("repeat").to_pylist(), strict=True
                    )
                )
                self._seen.add(part.name)
        return parts

    def done_keys(self, *, refresh: bool = False) -> set[tuple[str, int]]:
        """Stored (item_id, repeat) keys; read from disk once per store object, then kept up to
        date by its own appends. ``refresh`` also reads parts other writers added since."""
        if self._done is None or refresh:
            self._refresh()
        return set(self._done)  # type: ignore[arg-type]

    def read(self) -> pd.DataFrame:
        """All rows, in write order. A complete store is verified first (:meth:`verify`);
        a key appearing twice is an error."""
        self.verify()
        parts = self.parts()
        if not parts:
            return pd.DataFrame()
        frame = pd.concat([pq.read_table(p).to_pandas() for p in parts], ignore_index=True)
        dupes = frame.duplicated(KEY)
        if dupes.any():
            raise CompkitError(
                f"{self.root}: duplicated rows for {frame.loc[dupes, KEY].head(3).values.tolist()}"
            )
        return frame

    def mark_complete(self, **meta: Any) -> None:
        """Record that every row is stored: the parts, their sha256 and the row count.

        :meth:`verify` checks the folder against this record later, so a part deleted,
        added or edited by hand is refused instead of silently judged on fewer rows.
        """
        parts = {p.name: file_sha256(p) for p in self.parts()}
        atomic_write_json(self.complete_marker, {"finished_at": now_iso(), "parts": parts, **meta})

    def is_complete(self) -> bool:
        return self.complete_marker.exists()

    def verify(self) -> None:
        """A complete store must hold exactly the parts its marker recorded, unchanged.

        Raises
        ------
        CompkitError
            Naming the part that is missing, added or changed, or an unreadable marker.
        """
        if not self.is_complete():
            return
        try:
            marker = json.loads(self.complete_marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CompkitError(
                f"{self.complete_marker}: unreadable completion marker: {exc}"
            ) from exc
        recorded = marker.get("parts")
        if not isinstance(recorded, dict):
            raise CompkitError(
                f"{self.complete_marker}: no part list; the store was written by an older kit or "
                "edited by hand; rerun this model with --force"
            )
        present = {p.name for p in self.parts()}
        problems = [f"{self.root / n}: missing" for n in sorted(set(recorded) - present)]
        problems += [
            f"{self.root / n}: not written by kit" for n in sorted(present - set(recorded))
        ]
        problems += [
            f"{self.root / n}: changed since it was written"
            for n in sorted(present & set(recorded))
            if file_sha256(self.root / n) != recorded[n]
        ]
        if problems:
            shown = "\n".join(f"  - {p}" for p in problems)
            raise CompkitError(
                f"{self.root}: the stored outputs disagree with {self.complete_marker.name} "
                f"({marker.get('rows', '?')} rows recorded); refusing to judge on them:\n{shown}\n"
                "rerun this model with `compkit candidates --force --only NAME`"
            )

    def clear(self) -> None:
        """Remove every stored row (used by ``--force`` reruns)."""
        shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        self._done, self._seen = set(), set()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def pending(keys: Iterable[tuple[str, int]], done: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """Keys not yet stored, in the given order."""
    return [k for k in keys if k not in done]
