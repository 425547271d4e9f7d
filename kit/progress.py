"""Progress from inside a stage notebook to the terminal that runs ``compkit run``.

papermill only knows cells ("Executing 12% 1/8"), and a cell that runs four candidates takes
minutes. So the kit code inside the kernel reports its own progress as events, and the parent
process relays them:

* :func:`task_progress` (kernel side) appends JSON lines ``{task, done, total, unit, t}`` to
  the file named by the environment variable :data:`ENV` and does nothing when it is unset
  (a notebook run by hand, a test). :func:`kit.execute.run_model` reports every model this
  way, one event per stored batch (at most every :data:`MIN_INTERVAL_S` seconds, always the
  last).
* :class:`ProgressRelay` (parent side; :func:`kit.pipeline.run_pipeline` starts one per
  stage) sets :data:`ENV` for the kernel it starts, tails the file in a thread and prints
  each task's progress with its rate and ETA: live bars on a terminal, a line at most every
  :data:`LINE_INTERVAL_S` seconds (and when a task finishes) otherwise.

The channel is the environment, not a notebook parameter, so a stage's recorded parameters
(``pipeline.json``, used for resume) never depend on whether progress was shown.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ENV = "COMPKIT_PROGRESS_FILE"
MIN_INTERVAL_S = 0.5
LINE_INTERVAL_S = 10.0
POLL_S = 0.25


# --------------------------------------------------------------------------- kernel side


class TaskProgress:
    """Reports one task's progress (``update(n)``, ``close()``) as events; see the module."""

    def __init__(self, path: Path | None, task: str, *, total: int, initial: int, unit: str):
        self.path, self.task, self.total, self.unit = path, task, int(total), unit
        self.done, self._last = int(initial), 0.0
        self._emit(force=True)

    def update(self, n: int = 1) -> None:
        """``n`` more units are done."""
        self.done += int(n)
        self._emit(force=self.done >= self.total)

    def close(self) -> None:
        """The task ended (finished or not): report where it stands."""
        self._emit(force=True)

    def _emit(self, *, force: bool) -> None:
        now = time.time()
        if self.path is None or (not force and now - self._last < MIN_INTERVAL_S):
            return
        self._last = now
        event = {"task": self.task, "done": self.done, "total": self.total, "unit": self.unit}
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({**event, "t": now}) + "\n")
        except OSError:
            self.path = None  # progress must never break the stage

    def __enter__(self) -> TaskProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def task_progress(task: str, *, total: int, initial: int = 0, unit: str = "item") -> TaskProgress:
    """A :class:`TaskProgress` writing to the file in :data:`ENV` (a no-op when unset)."""
    target = os.environ.get(ENV)
    return TaskProgress(
        Path(target) if target else None, task, total=total, initial=initial, unit=unit
    )


# --------------------------------------------------------------------------- parent side


@dataclass
class _Task:
    total: int
    unit: str
    start_done: int
    start_t: float
    done: int = 0
    t: float = 0.0
    printed_t: float = field(default=-1e18)
    finished: bool = False
    bar: Any = None


def format_progress(
    task: str, done: int, total: int, unit: str, rate: float | None, elapsed: float
) -> str:
    """``"q4: 40/90 items · 3.2 items/s · ETA 16s"`` (``done in 28s`` when finished)."""
    units = unit if unit.endswith("s") else f"{unit}s"
    parts = [f"{task}: {done}/{total} {units}"]
    if rate:
        parts.append(f"{rate:.1f} {units}/s")
    if done >= total:
        parts.append(f"done in {_duration(elapsed)}")
    elif rate:
        parts.append(f"ETA {_duration((total - done) / rate)}")
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressRelay:
    """Relays a stage kernel's progress events to a stream (a context manager).

    Parameters
    ----------
    label
        Printed before each task (``"[2/5] candidates"``).
    stream
        Where to print (default ``sys.stderr``).
    live
        tqdm bars (default: when ``stream`` is a terminal) or plain lines.
    clock
        Time source of the line throttle (tests pass a fake one).
    """

    def __init__(
        self,
        label: str,
        *,
        stream: IO[str] | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.label, self.stream = label, stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.clock = clock
        self.tasks: dict[str, _Task] = {}
        self._offset, self._stop = 0, threading.Event()
        self._thread: threading.Thread | None = None
        fd, name = tempfile.mkstemp(prefix="compkit-progress-", suffix=".jsonl")
        os.close(fd)
        self.path = Path(name)
        self._previous: str | None = None

    def __enter__(self) -> ProgressRelay:
        self._previous = os.environ.get(ENV)
        os.environ[ENV] = str(self.path)  # inherited by the kernel papermill starts
        self._thread = threading.Thread(target=self._run, name="compkit-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()
        for name, task in self.tasks.items():
            if task.bar is not None:
                task.bar.close()
            elif not task.finished and task.printed_t < task.t:
                self._line(name, task)
        if self._previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = self._previous
        self.path.unlink(missing_ok=True)

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll()

    def poll(self) -> None:
        """Read the events written since the last poll and show them."""
        try:
            with open(self.path, encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind("\n") + 1]  # a line being written waits for the next poll
        self._offset += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            try:
                self.handle(json.loads(line))
            except (ValueError, KeyError, TypeError):
                continue

    def handle(self, event: dict[str, Any]) -> None:
        """Show one event ``{task, done, total, unit, t}``."""
        name, done, total = str(event["task"]), int(event["done"]), int(event["total"])
        task = self.tasks.get(name)
        if task is None:
            task = self.tasks[name] = _Task(
                total, str(event.get("unit", "item")), done, float(event["t"])
            )
        task.done, task.t, task.total = done, float(event["t"]), total
        if self.live:
            self._bar(name, task)
            return
        finished = done >= total
        now = self.clock()
        if (finished and not task.finished) or now - task.printed_t >= LINE_INTERVAL_S:
            self._line(name, task)
            task.printed_t = now
        task.finished = finished

    def _rate(self, task: _Task) -> float | None:
        elapsed = task.t - task.start_t
        return (task.done - task.start_done) / elapsed if elapsed > 0 else None

    def _line(self, name: str, task: _Task) -> None:
        text = format_progress(
            name, task.done, task.total, task.unit, self._rate(task), task.t - task.start_t
        )
        print(f"{self.label} {text}", file=self.stream, flush=True)

    def _bar(self, name: str, task: _Task) -> None:
        from tqdm.auto import tqdm

        if task.bar is None:
            task.bar = tqdm(
                total=task.total,
                initial=task.start_done,
                desc=f"{self.label} {name}",
                unit=task.unit,
                file=self.stream,
                dynamic_ncols=True,
            )
        task.bar.update(task.done - task.bar.n)
