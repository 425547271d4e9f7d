"""Load profiles and their schedules, modelled on GuideLLM's strategies and vLLM's bench serve.

A profile is a :class:`ProfileSpec` and a list of requests (``warmup`` ones first, then the
measured ones); :func:`run_profile` sends them and returns a :class:`ProfileRun` with one
:class:`~kit.serving.client.RequestRecord` per request sent.

========================  ===========================================================  =================
profile                   schedule                                                     slice / value
========================  ===========================================================  =================
``synchronous``           one request at a time, the next when the last ends            profile / synchronous
``concurrency=N``         N users, each sending its next request when its last ends     concurrency / N
                          (closed loop; vLLM's ``--max-concurrency`` at infinite rate)
``throughput``            ``max_concurrency`` requests in flight (GuideLLM throughput)  profile / throughput
``rate=R``                open loop: request i is sent at i / R seconds (GuideLLM       rate / R
                          ``constant``), at most ``max_concurrency`` in flight
``poisson=R``             open loop with exponential gaps of mean 1 / R, seeded         rate / R
                          (GuideLLM ``poisson``; vLLM's default arrivals)
========================  ===========================================================  =================

GuideLLM's sweep (:func:`sweep_rates`): run ``synchronous`` and ``throughput`` first, take
their request rates, and run ``sweep_size - 2`` constant (or Poisson) rates evenly spaced
between them, the synchronous rate excluded and the throughput rate included
(``numpy.linspace(sync, max, sweep_size - 1)[1:]``). Like GuideLLM, a rate whose requests
mostly fail stops the escalation.

Every profile is bounded: by its request count, by ``max_duration_s`` (no request is sent
after it; requests in flight end within their ``timeout_s``), and it stops early when the
server process is gone (``alive()`` turns False): the profile is then ``aborted`` with the
reason, the records so far are kept.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from kit.errors import CompkitError
from kit.serving.client import TIMELINE_COLUMNS, LoadClient, RequestRecord, RequestSpec

Kind = Literal["synchronous", "concurrency", "throughput", "constant", "poisson", "batch"]

#: Share of failed requests at a rate that stops a sweep's escalation (GuideLLM stops on
#: its error constraint).
SWEEP_STOP_ERROR_RATE = 0.5


@dataclass(frozen=True)
class ProfileSpec:
    """One load profile: its name, schedule and the evidence slice it reports under.

    ``group`` is the study's profile kind it belongs to (``concurrency``, ``rate_sweep``,
    ``prompt_length``, ``synthetic``, ``batch``...); ``concurrency`` is the number of
    closed-loop users, or the cap of an open-loop profile; ``rate`` requests per second.
    """

    name: str
    kind: Kind
    group: str
    slice: str
    slice_value: str
    concurrency: int = 1
    rate: float | None = None

    @classmethod
    def synchronous(cls, *, group: str = "synchronous", name: str | None = None) -> ProfileSpec:
        return cls(name or "synchronous", "synchronous", group, "profile", "synchronous")

    @classmethod
    def concurrent(cls, n: int, *, group: str = "concurrency") -> ProfileSpec:
        return cls(f"concurrency={n}", "concurrency", group, "concurrency", str(n), n)

    @classmethod
    def throughput(cls, max_concurrency: int) -> ProfileSpec:
        return cls(
            "throughput", "throughput", "rate_sweep", "profile", "throughput", max_concurrency
        )

    @classmethod
    def at_rate(
        cls, rate: float, *, poisson: bool = False, max_concurrency: int = 512
    ) -> ProfileSpec:
        if not (rate > 0 and math.isfinite(rate)):
            raise CompkitError(f"a request rate must be a positive number, got {rate}")
        label = f"{rate:.4g}"
        kind: Kind = "poisson" if poisson else "constant"
        name = f"{'poisson' if poisson else 'rate'}={label}"
        return cls(name, kind, "rate_sweep", "rate", label, max_concurrency, rate)

    @property
    def closed_loop(self) -> bool:
        return self.kind in ("synchronous", "concurrency", "throughput")

    def record(self) -> dict[str, Any]:
        return {
            "profile": self.name,
            "kind": self.kind,
            "group": self.group,
            "slice": self.slice,
            "slice_value": self.slice_value,
            "concurrency": self.concurrency,
            "rate": self.rate,
        }


@dataclass
class ProfileRun:
    """What one profile did: its records, wall time and why it stopped."""

    spec: ProfileSpec
    records: list[RequestRecord]
    wall_s: float
    stopped_by: str  # "count" | "time" | "aborted"
    aborted: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def frame(self, *, model: str) -> pd.DataFrame:
        """The timeline: one row per request (:data:`TIMELINE_COLUMNS`) plus the profile."""
        rows = [r.row() for r in self.records]
        frame = pd.DataFrame(rows, columns=TIMELINE_COLUMNS)
        meta = self.spec.record()
        frame.insert(0, "model", model)
        for i, (key, value) in enumerate(meta.items(), start=1):
            frame.insert(i, key, value)
        return frame

    @property
    def measured(self) -> list[RequestRecord]:
        return [r for r in self.records if r.phase == "measure"]

    def request_rate(self) -> float:
        """Successful measured requests per second over the measured window (0 if none)."""
        ok = [r for r in self.measured if r.status == "ok"]
        window = measured_window(self.measured)
        return len(ok) / window if ok and window > 0 else 0.0


def measured_window(records: Sequence[RequestRecord]) -> float:
    """Seconds from the first measured request's send to the last one's end."""
    if not records:
        return 0.0
    start = min(r.sent_s for r in records)
    end = max((r.end_s if r.end_s is not None else r.sent_s) for r in records)
    return end - start


def sweep_rates(synchronous_rps: float, throughput_rps: float, sweep_size: int) -> list[float]:
    """GuideLLM's sweep rates: ``linspace(sync, max, sweep_size - 1)[1:]`` (see module doc).

    Examples
    --------
    >>> [round(r, 3) for r in sweep_rates(1.0, 3.0, 5)]
    [1.667, 2.333, 3.0]
    """
    if sweep_size < 3:
        raise CompkitError(f"sweep_size must be >= 3, got {sweep_size}")
    if synchronous_rps <= 0 and throughput_rps <= 0:
        raise CompkitError("no successful request in the synchronous and throughput profiles")
    return [float(r) for r in np.linspace(synchronous_rps, throughput_rps, sweep_size - 1)[1:]]


def arrival_times(n: int, rate: float, *, poisson: bool, seed: int = 0) -> np.ndarray:
    """Send times (seconds) of ``n`` open-loop requests at ``rate`` per second.

    Constant: ``i / rate``. Poisson: cumulative exponential gaps of mean ``1 / rate`` from a
    seeded generator, the first at 0 (the first request starts the profile).
    """
    if poisson:
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
        return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if n else np.zeros(0)
    return np.arange(n, dtype=float) / rate


# --------------------------------------------------------------------------- running


@dataclass
class _State:
    records: list[RequestRecord] = field(default_factory=list)
    aborted: str | None = None
    out_of_time: bool = False


async def run_profile(
    client: LoadClient,
    spec: ProfileSpec,
    requests: Sequence[RequestSpec],
    *,
    max_duration_s: float,
    seed: int = 0,
    alive: Callable[[], str | None] | None = None,
    bar: Any = None,
) -> ProfileRun:
    """Send ``requests`` under ``spec``'s schedule; see the module docstring.

    ``alive`` returns ``None`` while the server lives, else why it is gone.
    """
    state = _State()
    t0 = time.perf_counter()
    deadline = t0 + max_duration_s

    def note(rec: RequestRecord) -> None:
        state.records.append(rec)
        if bar is not None:
            bar.update(1)
        if rec.status == "error" and rec.error_class in ("connection", "truncated_stream"):
            gone = alive() if alive is not None else None
            if gone and state.aborted is None:
                state.aborted = gone

    if spec.closed_loop:
        await _closed_loop(client, spec.concurrency, requests, t0, deadline, state, note)
    else:
        times = arrival_times(
            len(requests), spec.rate or 1.0, poisson=spec.kind == "poisson", seed=seed
        )
        await _open_loop(client, spec.concurrency, requests, times, t0, deadline, state, note)
    state.records.sort(key=lambda r: r.index)
    if state.aborted is None and alive is not None:
        state.aborted = alive()
    stopped = "aborted" if state.aborted else ("time" if state.out_of_time else "count")
    return ProfileRun(spec, state.records, time.perf_counter() - t0, stopped, state.aborted)


async def _closed_loop(client, users, requests, t0, deadline, state, note) -> None:
    queue = iter(requests)

    async def user() -> None:
        while state.aborted is None:
            if time.perf_counter() >= deadline:
                state.out_of_time = True
                return
            spec = next(queue, None)
            if spec is None:
                return
            note(await client.send(spec, t0=t0))

    await asyncio.gather(*(user() for _ in range(max(1, users))))


async def _open_loop(client, cap, requests, times, t0, deadline, state, note) -> None:
    gate = asyncio.Semaphore(max(1, cap))
    tasks: list[asyncio.Task[None]] = []

    async def one(spec: RequestSpec, at: float) -> None:
        async with gate:  # arrivals beyond the cap wait here: their queueing counts in TTFT
            note(await client.send(spec, t0=t0, scheduled_s=at))

    for spec, at in zip(requests, times, strict=True):
        if state.aborted is not None:
            break
        when = t0 + float(at)
        if when >= deadline:
            state.out_of_time = True
            break
        delay = when - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(spec, float(at))))
    await asyncio.gather(*tasks)


class ProfileProgress:
    """One profile's progress: events for ``compkit run``'s relay (:mod:`kit.progress`,
    always; a no-op outside a relayed run) and a tqdm bar on a terminal."""

    def __init__(self, task: str, total: int, *, bar: bool):
        from kit.progress import task_progress

        self.events = task_progress(task, total=total, unit="request")
        self.bar = (
            tqdm(total=total, desc=task, unit="req", dynamic_ncols=True, leave=False)
            if bar
            else None
        )

    def update(self, n: int = 1) -> None:
        self.events.update(n)
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        self.events.close()
        if self.bar is not None:
            self.bar.close()


def profile_bar(*, model: str, spec: ProfileSpec, total: int, progress: bool) -> ProfileProgress:
    """Progress of one profile (``model profile``): relayed events, and a tqdm bar when
    ``progress`` is on and stderr is a terminal (a notebook kernel gets :func:`profile_line`)."""
    return ProfileProgress(f"{model} {spec.name}", total, bar=progress and sys.stderr.isatty())


def profile_line(model: str, run: ProfileRun) -> str:
    """One line summing up a finished profile (printed with progress on)."""
    measured = run.measured
    errors = sum(r.status != "ok" for r in measured)
    warm = len(run.records) - len(measured)
    if run.aborted:
        end = f"; stopped: {run.aborted.splitlines()[0]}"
    else:
        end = "; time limit reached" if run.stopped_by == "time" else ""
    return (
        f"serving {model} {run.spec.name}: {len(measured)} requests (+{warm} warm-up) in "
        f"{run.wall_s:.1f} s, {run.request_rate():.2f} req/s, {errors} errors{end}"
    )


def seeded_order(ids: Sequence[str], seed: int) -> list[str]:
    """``ids`` in a seeded shuffled order (the same for every model)."""
    order = list(ids)
    random.Random(seed).shuffle(order)
    return order
