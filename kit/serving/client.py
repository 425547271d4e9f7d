"""One streamed request, one timeline: the load generator's HTTP client.

:class:`LoadClient` sends OpenAI-compatible requests with one ``aiohttp`` session (a
keep-alive pool sized to the load) and records, per request, a :class:`RequestRecord`: when
it was scheduled and sent, when the response began (first byte), every content chunk's
arrival with its token count, every chunk with choices (vLLM's first token and gaps), the end of
the response, the text, token counts and how the request ended. Times are seconds after the
profile's start (``t0``, a ``time.perf_counter()`` value), so a stored timeline re-derives
every figure.

Failures get the quality runtime's classes (:data:`kit.runtimes.base.ERROR_CLASSES`, its
:class:`~kit.runtimes.openai.RequestFailed`, SSE parser and answer parsing): ``timeout``, ``connection``, ``http_5xx``,
``http_4xx``, ``truncated_stream`` (``interrupted`` when the server ended the stream with
``[DONE]`` but no ``finish_reason``), ``invalid_response``, ``runtime_error``. Nothing is
retried: under load a retry would hide the failure and distort the latency.

Token counts: the server's ``usage.completion_tokens`` when it sends it (vLLM, OpenAI);
else one token per content chunk (GuideLLM's fallback; llama-cpp-python streams one token
per chunk). A chunk carrying token logprobs counts its logprobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from kit.runtimes.openai import (
    RequestFailed,
    SSEParser,
    choice_text,
    error_event,
    json_body,
    retry_after_s,
    token_logprob_values,
    truncation_message,
)

#: Columns of a stored timeline, in order (one row per request).
TIMELINE_COLUMNS = [
    "index",
    "item_id",
    "phase",
    "scheduled_s",
    "sent_s",
    "first_byte_s",
    "first_chunk_s",
    "first_token_s",
    "last_token_s",
    "end_s",
    "chunk_s",
    "chunk_tokens",
    "event_s",
    "output",
    "output_tokens",
    "prompt_tokens",
    "token_source",
    "finish_reason",
    "status",
    "error_class",
    "error",
    "http_status",
    "interrupted",
]


@dataclass(frozen=True)
class RequestSpec:
    """What to send: the request's place in the profile, its item and its JSON body."""

    index: int
    item_id: str | None
    phase: str  # "warmup" | "measure"
    url: str
    payload: dict[str, Any]


@dataclass
class RequestRecord:
    """One request's timeline (seconds after the profile's start) and outcome."""

    index: int
    item_id: str | None
    phase: str
    scheduled_s: float | None
    sent_s: float
    first_byte_s: float | None = None
    first_chunk_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    end_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    event_s: list[float] = field(default_factory=list)  # every chunk with choices (vLLM)
    output: str = ""
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    token_source: str | None = None
    finish_reason: str | None = None
    status: str = "ok"  # "ok" | "error"
    error_class: str | None = None
    error: str | None = None
    http_status: int | None = None
    interrupted: bool = False

    def row(self) -> dict[str, Any]:
        return asdict(self)

    def fold(self, event: Any, now: float) -> None:
        """Add one response object (a stream chunk or a whole answer) arriving at ``now``."""
        if not isinstance(event, dict):
            raise RequestFailed("invalid_response", f"expected a JSON object, got {event!r:.200}")
        if event.get("error") is not None and not event.get("choices"):
            raise error_event(event["error"])
        usage = event.get("usage")
        if isinstance(usage, dict):
            self.output_tokens = usage.get("completion_tokens", self.output_tokens)
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.token_source = "usage"
        choices = event.get("choices")
        if not isinstance(choices, list) or (not choices and not isinstance(usage, dict)):
            raise RequestFailed("invalid_response", f"response without choices: {event!r:.200}")
        if not choices:
            return
        if self.first_chunk_s is None:
            self.first_chunk_s = now
        self.event_s.append(now)
        choice = choices[0]
        text = choice_text(choice)
        if text:
            if self.first_token_s is None:
                self.first_token_s = now
            self.last_token_s = now
            self.output += text
            self.chunk_s.append(now)
            logprobs = token_logprob_values(choice.get("logprobs"))
            self.chunk_tokens.append(len(logprobs) if logprobs else 1)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]

    def settle(self) -> None:
        """Fill token counts the server did not report (one per content chunk)."""
        if self.token_source is None and self.status == "ok" and self.chunk_tokens:
            self.output_tokens = sum(self.chunk_tokens)
            self.token_source = "chunks"


class LoadClient:
    """An async HTTP client for load: one aiohttp pool, no retries, a deadline per request.

    aiohttp, not httpx (the quality runtime's client): against an instant server it costs
    about a fifth of the CPU per streamed request and keeps that at 32 requests in flight,
    where httpx's pool costs 2-3x more per request (``benchmarks/serving_vs_guidellm.py``).

    Parameters
    ----------
    headers
        Sent with every request (``Authorization`` for a keyed endpoint).
    timeout_s
        Deadline of one request, from sending it to the end of the answer.
    max_connections
        Size of the keep-alive pool (the profile's concurrency).
    """

    def __init__(
        self,
        *,
        headers: dict[str, str] | None = None,
        timeout_s: float = 60.0,
        max_connections: int = 16,
    ):
        self.timeout_s = timeout_s
        self.headers = dict(headers or {})
        self.max_connections = max(1, max_connections)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> LoadClient:
        connector = aiohttp.TCPConnector(
            limit=self.max_connections,
            limit_per_host=self.max_connections,
            keepalive_timeout=30,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, self.timeout_s)),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, spec: RequestSpec, *, t0: float, scheduled_s: float | None = None
    ) -> RequestRecord:
        """Send one request and record its timeline; never raises for a failed request."""
        rec = RequestRecord(
            spec.index, spec.item_id, spec.phase, scheduled_s, time.perf_counter() - t0
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._exchange(spec, rec, t0)
        except Exception as exc:
            failure = classify_aiohttp_failure(
                exc,
                got_response=rec.first_byte_s is not None,
                url=spec.url,
                timeout_s=self.timeout_s,
            )
            rec.status, rec.error_class, rec.error = "error", failure.error_class, str(failure)
            rec.http_status = failure.status if failure.status is not None else rec.http_status
            rec.interrupted = failure.interrupted
        rec.end_s = time.perf_counter() - t0
        rec.settle()
        return rec

    async def _exchange(self, spec: RequestSpec, rec: RequestRecord, t0: float) -> None:
        assert self._session is not None, "use LoadClient as an async context manager"
        async with self._session.post(spec.url, json=spec.payload) as resp:
            rec.first_byte_s = time.perf_counter() - t0
            rec.http_status = resp.status
            if resp.status >= 400:
                raise await _http_failure(resp, spec.url)
            if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                rec.fold(json_body(await resp.read(), spec.url), time.perf_counter() - t0)
                # one arrival: no first token or gaps to tell
                rec.chunk_s, rec.chunk_tokens, rec.event_s = [], [], []
                rec.first_token_s = rec.last_token_s = rec.first_chunk_s = None
                return
            done = await _read_stream(resp, rec, t0, spec.url)
            if rec.finish_reason is None:
                raise RequestFailed(
                    "truncated_stream",
                    truncation_message(spec.url, len(rec.chunk_s), done=done),
                    interrupted=done,
                )


async def _read_stream(
    resp: aiohttp.ClientResponse, rec: RequestRecord, t0: float, url: str
) -> bool:
    """Fold every SSE event into ``rec``; True when the stream sent ``[DONE]``."""
    parser, pending = SSEParser(), b""
    async for piece in resp.content.iter_any():
        now = time.perf_counter() - t0
        *lines, pending = (pending + piece).split(b"\n")
        for raw in lines:
            data = parser.feed(raw.rstrip(b"\r").decode("utf-8", errors="replace"))
            if data is None:
                continue
            if data.strip() == "[DONE]":
                with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                    async with asyncio.timeout(1.0):  # let the connection go back to the pool
                        await resp.read()
                return True
            rec.fold(json_body(data, url), now)
    for raw in (pending, b""):  # a last event without its blank line
        data = parser.feed(raw.rstrip(b"\r").decode("utf-8", errors="replace"))
        if data is not None:
            if data.strip() == "[DONE]":
                return True
            rec.fold(json_body(data, url), time.perf_counter() - t0)
    return False


async def _http_failure(resp: aiohttp.ClientResponse, url: str) -> RequestFailed:
    text = (await resp.read()).decode("utf-8", errors="replace").strip()
    status = resp.status
    return RequestFailed(
        "http_5xx" if status >= 500 else "http_4xx",
        f"HTTP {status} from {url}: {text[:300]}",
        status=status,
        retry_after=retry_after_s(resp.headers.get("Retry-After")),
    )


def classify_aiohttp_failure(
    exc: BaseException, *, got_response: bool, url: str, timeout_s: float
) -> RequestFailed:
    """The :class:`~kit.runtimes.openai.RequestFailed` for an aiohttp-side exception, with
    the quality runtime's classes (:func:`kit.runtimes.openai.classify_failure`): timeouts;
    a broken connection before the response (``connection``) or during it
    (``truncated_stream``); other client errors ``invalid_response``; the rest
    ``runtime_error``."""
    if isinstance(exc, RequestFailed):
        return exc
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return RequestFailed(
            "timeout", f"timed out waiting for the answer from {url} (timeout_s={timeout_s:g})"
        )
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientConnectionError):
        cls = "truncated_stream" if got_response else "connection"
        where = "while reading the answer" if got_response else "before any answer"
        return RequestFailed(cls, f"{type(exc).__name__} {where} from {url}: {exc}")
    if isinstance(exc, aiohttp.ClientError):
        return RequestFailed("invalid_response", f"{type(exc).__name__} from {url}: {exc}")
    return RequestFailed("runtime_error", f"{type(exc).__name__} handling {url}: {exc}")
