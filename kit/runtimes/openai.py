"""OpenAI-compatible endpoint runtime: any server speaking ``/v1/chat/completions`` and
``/v1/completions`` (vLLM, TGI, llama.cpp's server, llama-cpp-python's server, Ollama).

``spec.endpoint`` is the server's base URL, with or without the trailing ``/v1``;
``spec.model`` is the model name the server serves; ``spec.api_key_env`` names the
environment variable holding the API key (sent as ``Authorization: Bearer``). Chat prompts
go to ``/v1/chat/completions``, text prompts to ``/v1/completions``.

``spec.options`` (all optional):

``concurrency`` (int, default ``spec.batch_size``)
    Requests in flight at once (an ``asyncio.Semaphore``; one ``httpx.AsyncClient`` per
    :meth:`~OpenAIRuntime.generate` call, keep-alive pool sized to it). A server that cuts
    a running stream short because another request waits (llama-cpp-python's server with
    its default ``--interrupt_requests true``: ``[DONE]`` without a ``finish_reason``) would
    lose answers at any concurrency above 1, so on the first such stream the runtime lowers
    concurrency to 1 for the rest of its life, asks every cut answer again, warns naming the
    fix, and records ``concurrency_backoff`` in ``identity().extra["options"]``.
``timeout_s`` (float, default 60)
    Deadline of one attempt, from sending the request to the end of the answer.
``connect_timeout_s`` (float, default ``min(10, timeout_s)``)
    Deadline for opening a connection (and for the ``/v1/models`` check at open time).
``max_retries`` (int, default 3)
    Extra attempts after connection errors, timeouts, broken streams, HTTP 5xx and 429;
    never after other 4xx. The attempts used are kept in ``Generation.extra["attempts"]``.
``backoff_s`` (float, default 0.5) and ``backoff_max_s`` (float, default 20)
    Wait before retry *n*: ``backoff_s * 2**(n-1)``, capped at ``backoff_max_s``, times a
    random factor in [0.5, 1] (jitter); a ``Retry-After`` header (seconds or HTTP date, at
    most 120 s) replaces it.
``logprobs`` (bool, default True)
    Ask for the generated tokens' logprobs (``logprobs: true, top_logprobs: 1`` for chat,
    ``logprobs: 1`` for text). A server that omits them gives ``token_logprobs=None``; one
    that refuses them with a 4xx naming logprobs is asked again without, for the rest of
    the run.
``stream`` (bool, default True)
    Stream the answer (SSE) to measure time to first token and inter-token gaps on the
    client; without streaming ``ttft_s`` is ``None``.
``neutral_sampling`` (bool, default True)
    Switch off sampling extras the server would otherwise apply by default, so every runtime
    decodes under the study's rule alone: llama.cpp servers get ``top_k: 0, min_p: 0,
    repeat_penalty: 1`` (llama-cpp-python defaults to 40 / 0.05 / 1.1), vLLM gets
    ``top_k: -1, min_p: 0, repetition_penalty: 1`` (it applies the model's
    generation_config otherwise). The server is recognised by ``owned_by`` in
    ``/v1/models``; unknown servers get nothing extra.
``extra_body`` (dict, default {})
    Sent with every generation request (after the above, so it wins).

Every request records client-side timings: ``ttft_s`` (request sent to first content
token), ``latency_s`` (to the end of the answer) and, in ``Generation.extra``, the median
and largest inter-token gap, the attempts and the number of streamed chunks (stored as the
``itl_p50_s``, ``itl_max_s`` and ``attempts`` output columns).
Timings are those of the attempt that succeeded. Token counts come from the server's
``usage`` (``stream_options.include_usage``), else from the logprobs or the number of
content chunks. A stream counts as complete only with a ``finish_reason`` (``[DONE]``
alone is not enough: llama-cpp-python's server ends a running stream with ``[DONE]`` when
another request waits, unless started with ``--interrupt_requests false``).

Failures never stop a run: the item keeps ``error`` and an ``error_class`` from
:data:`~kit.runtimes.base.ERROR_CLASSES` (``timeout``, ``connection``, ``http_5xx``,
``http_4xx``, ``truncated_stream``, ``invalid_response``, ``runtime_error``).

Choice scoring uses ``/v1/completions`` with ``echo: true, logprobs: 1, max_tokens: 1`` on
prompt + continuation and sums the logprobs of the echoed tokens that cover the
continuation (found by ``text_offset``; trailing whitespace of the context moves to the
continuation, as in lm-evaluation-harness). A probe at first use checks that the server
returns prompt logprobs aligned with their tokens (vLLM does; llama-cpp-python only for
models that add a BOS token: for others it drops the generated token and shifts every
prompt logprob by one position) and :attr:`~OpenAIRuntime.supports_choice_scoring` reports
the result. Chat prompts cannot be scored this way (the client cannot render the server's
chat template), so :meth:`~OpenAIRuntime.score_choices` raises ``NotImplementedError`` for
them.

:meth:`~OpenAIRuntime.count_tokens` uses the server's tokenizer endpoint: ``/tokenize``
(vLLM, llama.cpp) or ``/extras/tokenize`` (llama-cpp-python). Chat prompts are counted
exactly only where the endpoint takes messages (vLLM); elsewhere the message contents are
counted, without the chat template's own tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import functools
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from kit.errors import CompkitError
from kit.runtimes import RUNTIMES
from kit.runtimes.base import (
    ChoiceRequest,
    ChoiceScores,
    Generation,
    GenerationRequest,
    ModelIdentity,
    Progress,
    Prompt,
    Runtime,
)
from kit.study import ModelSpec, SamplingConfig

T = TypeVar("T")

#: ``spec.options`` keys this runtime reads, with the types each may have.
#: The ``spec.options`` this runtime reads (declared once, in the registry).
OPTIONS = RUNTIMES["openai"].options

#: Sampling settings that make a server decode under the study's rule alone, by server.
NEUTRAL_SAMPLING: dict[str, dict[str, Any]] = {
    "llama.cpp": {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},
    "vllm": {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0},
}
_OWNERS = {"me": "llama.cpp", "llamacpp": "llama.cpp", "vllm": "vllm"}

RETRY_AFTER_MAX_S = 120.0
#: Prompt of the probe that checks prompt logprobs (a greedy model continues it, not stops).
ECHO_PROBE_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class EndpointOptions:
    """The validated ``spec.options`` of an endpoint model."""

    concurrency: int
    timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    max_retries: int = 3
    backoff_s: float = 0.5
    backoff_max_s: float = 20.0
    logprobs: bool = True
    stream: bool = True
    neutral_sampling: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    #: how a JSON schema is sent: OpenAI's ``json_schema`` (vLLM, TGI, OpenAI) or
    #: ``json_object`` with ``schema`` (llama-cpp-python's server, which knows only that)
    response_format: str = "json_schema"

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> EndpointOptions:
        opts = dict(spec.options)
        where = f"model {spec.name!r}: options"
        for key, value in opts.items():
            if key not in OPTIONS:
                raise CompkitError(
                    f"{where}: unknown key {key!r}; the openai runtime reads "
                    f"{sorted(k for k in OPTIONS if k != 'progress')}"
                )
            allowed = OPTIONS[key] if isinstance(OPTIONS[key], tuple) else (OPTIONS[key],)
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise CompkitError(
                    f"{where}.{key}: expected {_type_name(OPTIONS[key])}, got {value!r}"
                )
        opts.pop("progress", None)
        timeout = float(opts.pop("timeout_s", 60.0))
        built = cls(
            concurrency=opts.pop("concurrency", spec.batch_size),
            timeout_s=timeout,
            connect_timeout_s=float(opts.pop("connect_timeout_s", min(10.0, timeout))),
            **opts,
        )
        if built.response_format not in RESPONSE_FORMATS:
            raise CompkitError(
                f"{where}.response_format: one of {list(RESPONSE_FORMATS)}, "
                f"got {built.response_format!r}"
            )
        for key in ("concurrency", "timeout_s", "connect_timeout_s"):
            if getattr(built, key) <= 0:
                raise CompkitError(f"{where}.{key}: must be > 0, got {getattr(built, key)}")
        for key in ("max_retries", "backoff_s", "backoff_max_s"):
            if getattr(built, key) < 0:
                raise CompkitError(f"{where}.{key}: must be >= 0, got {getattr(built, key)}")
        return built


def _type_name(t: type | tuple[type, ...]) -> str:
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join(x.__name__ for x in types)


class RequestFailed(Exception):
    """One attempt failed; ``error_class`` is one of ``ERROR_CLASSES``."""

    def __init__(
        self,
        error_class: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        interrupted: bool = False,
    ):
        super().__init__(message)
        self.error_class = error_class
        self.status = status
        self.retry_after = retry_after
        self.interrupted = interrupted  # [DONE] without a finish_reason: the server cut it

    @property
    def retryable(self) -> bool:
        if self.error_class == "http_4xx":
            return self.status == 429
        return self.error_class in ("timeout", "connection", "http_5xx", "truncated_stream")


def classify_failure(
    exc: BaseException, *, got_response: bool, url: str, timeout_s: float
) -> RequestFailed:
    """The :class:`RequestFailed` (with its ``ERROR_CLASSES`` class) for an exception raised
    while sending a request to ``url`` or reading its answer.

    Timeouts (asyncio's deadline or httpx's) are ``timeout``; a transport error is
    ``connection`` before any answer and ``truncated_stream`` after the response began;
    other httpx errors are ``invalid_response``; anything else ``runtime_error``.
    """
    if isinstance(exc, RequestFailed):
        return exc
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        what = "connecting" if isinstance(exc, httpx.ConnectTimeout) else "waiting for the answer"
        return RequestFailed("timeout", f"timed out {what} from {url} (timeout_s={timeout_s:g})")
    if isinstance(exc, httpx.TransportError):
        cls = "truncated_stream" if got_response else "connection"
        where = "while reading the answer" if got_response else "before any answer"
        return RequestFailed(cls, f"{type(exc).__name__} {where} from {url}: {exc}")
    if isinstance(exc, httpx.HTTPError):
        return RequestFailed("invalid_response", f"{type(exc).__name__} from {url}: {exc}")
    return RequestFailed("runtime_error", f"{type(exc).__name__} handling {url}: {exc}")


@dataclass
class _Attempt:
    """What one attempt has received so far (decides connection vs truncated_stream)."""

    got_response: bool = False


# ---------------------------------------------------------------------------- SSE + answers


class SSEParser:
    """Server-sent events, line by line: yields the ``data`` of each complete event.

    Comment lines (``:``) and other fields are skipped; several ``data:`` lines of one event
    are joined with newlines; an event ends at a blank line (or at :meth:`flush`).
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            return self.flush()
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data.clear()
        return data


@dataclass
class _Answer:
    """An answer as it arrives: text pieces, token logprobs, arrival times, usage."""

    started: float
    pieces: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    has_logprobs: bool = False
    token_times: list[float] = field(default_factory=list)
    chunks: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    ended: float | None = None

    def add(self, event: Any, now: float) -> None:
        """Fold one response object (a stream chunk or a whole answer) into the answer."""
        if not isinstance(event, dict):
            raise RequestFailed(
                "invalid_response", f"expected a JSON object, got {str(event)[:200]!r}"
            )
        if event.get("error") is not None and not event.get("choices"):
            raise error_event(event["error"])
        self.chunks += 1
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        choices = event.get("choices")
        if not isinstance(choices, list) or (not choices and self.usage is None):
            raise RequestFailed(
                "invalid_response", f"response without choices: {json.dumps(event)[:200]}"
            )
        if not choices:
            return
        choice = choices[0]
        text = choice_text(choice)
        if text:
            self.pieces.append(text)
            self.token_times.append(now)
        values = token_logprob_values(choice.get("logprobs"))
        if values is not None:
            self.has_logprobs = True
            self.logprobs.extend(values)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]

    def generation(self, item_id: str, *, batch_size: int, attempts: int) -> Generation:
        end = self.ended if self.ended is not None else time.perf_counter()
        usage = self.usage or {}
        output_tokens = usage.get("completion_tokens")
        if output_tokens is None:
            output_tokens = len(self.logprobs) if self.has_logprobs else len(self.token_times)
        gaps = [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]
        return Generation(
            item_id=item_id,
            text="".join(self.pieces),
            prompt_tokens=usage.get("prompt_tokens"),
            output_tokens=output_tokens,
            ttft_s=self.token_times[0] - self.started if self.token_times else None,
            latency_s=end - self.started,
            token_logprobs=list(self.logprobs) if self.has_logprobs and self.logprobs else None,
            finish_reason=self.finish_reason,
            batch_size=batch_size,
            extra={
                "itl_p50_s": statistics.median(gaps) if gaps else None,
                "itl_max_s": max(gaps) if gaps else None,
                "attempts": attempts,
                "chunks": self.chunks,
            },
        )


def choice_text(choice: Any) -> str | None:
    if not isinstance(choice, dict):
        raise RequestFailed("invalid_response", f"a choice is not an object: {str(choice)[:200]!r}")
    for holder in (choice.get("delta"), choice.get("message")):
        if isinstance(holder, dict):
            return holder.get("content")
    return choice.get("text")


def token_logprob_values(logprobs: Any) -> list[float] | None:
    """Token logprobs from either OpenAI shape; ``None`` when the server sent none.

    Chat: ``{"content": [{"token", "logprob", "top_logprobs"}, ...]}``; completions:
    ``{"tokens": [...], "token_logprobs": [...], ...}``. ``null`` entries are dropped.
    """
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("content"), list):
        values = [e.get("logprob") for e in logprobs["content"] if isinstance(e, dict)]
    elif isinstance(logprobs.get("token_logprobs"), list):
        values = logprobs["token_logprobs"]
    else:
        return None
    return [float(v) for v in values if isinstance(v, int | float)]


def error_event(error: Any) -> RequestFailed:
    message = error.get("message", error) if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) else None
    if status is not None and 400 <= status < 500:
        return RequestFailed(
            "http_4xx", f"server error in the stream (HTTP {status}): {message}", status=status
        )
    return RequestFailed(
        "http_5xx", f"server error in the stream: {str(message)[:300]}", status=status
    )


# ---------------------------------------------------------------------------- the runtime


class OpenAIRuntime(Runtime):
    """A model behind an OpenAI-compatible HTTP server.

    Parameters
    ----------
    spec
        ``endpoint``, ``model`` (served name), ``api_key_env`` and ``options`` as in the
        module docstring.
    base_dir
        Unused (kept for the common runtime signature).
    transport
        An ``httpx`` transport for both clients (tests pass ``httpx.MockTransport``).

    Raises
    ------
    CompkitError
        When the server cannot be reached (the message names the URL and the error), the
        API key variable is unset, or an option is invalid.

    Examples
    --------
    >>> spec = ModelSpec(name="served", runtime="openai", model="smollm2",
    ...                  endpoint="http://127.0.0.1:8000")  # doctest: +SKIP
    >>> with OpenAIRuntime(spec) as rt:  # doctest: +SKIP
    ...     rt.generate([GenerationRequest("q1", Prompt(text="Hello"), seed=1)],
    ...                 sampling=SamplingConfig(max_new_tokens=8))
    """

    name = "openai"

    def __init__(
        self,
        spec: ModelSpec,
        *,
        base_dir: Path | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(spec, base_dir=base_dir)
        if not spec.endpoint:
            raise CompkitError(
                f"model {spec.name!r}: the openai runtime needs 'endpoint' "
                "(the server's base URL, e.g. http://127.0.0.1:8000/v1)"
            )
        self.options = EndpointOptions.from_spec(spec)
        self.base_url, self.root_url = endpoint_urls(spec.endpoint)
        self._headers = {"Accept": "application/json"} | _auth_header(spec)
        self._transport = transport
        self._timeout = httpx.Timeout(
            self.options.timeout_s, connect=self.options.connect_timeout_s
        )
        self._client = httpx.Client(
            headers=self._headers, timeout=self._timeout, transport=transport
        )
        self._rng = random.Random()
        self._logprobs = self.options.logprobs
        #: set when the server interrupted streams and concurrency was lowered to 1
        self.backoff: dict[str, Any] | None = None
        self._identity: ModelIdentity | None = None
        try:
            self._server = self._describe_server()  # fail fast on a dead endpoint
        except BaseException:
            self._client.close()
            raise
        flavour = self._server["flavour"]
        neutral = NEUTRAL_SAMPLING.get(flavour, {}) if self.options.neutral_sampling else {}
        self._extra_body = {**neutral, **self.options.extra_body}

    # ------------------------------------------------------------------ identity

    def _describe_server(self) -> dict[str, Any]:
        url = f"{self.base_url}/models"
        try:
            resp = self._client.get(url, timeout=self.options.connect_timeout_s)
        except httpx.HTTPError as exc:
            raise CompkitError(
                f"model {self.spec.name!r}: cannot reach the OpenAI-compatible "
                f"server at {url}: {type(exc).__name__}: {exc}. Is it running, "
                "and is 'endpoint' right?"
            ) from None
        if resp.status_code in (401, 403):
            hint = (
                f"check the key in ${self.spec.api_key_env}"
                if self.spec.api_key_env
                else "set api_key_env to the variable holding its API key"
            )
            raise CompkitError(
                f"model {self.spec.name!r}: the server at {url} refused the "
                f"request (HTTP {resp.status_code}): {hint}"
            )
        if resp.status_code >= 400:
            raise CompkitError(
                f"model {self.spec.name!r}: GET {url} answered HTTP "
                f"{resp.status_code}: {resp.text[:300]} (is this an "
                "OpenAI-compatible server, and is 'endpoint' its base URL?)"
            )
        try:
            models = [m for m in resp.json().get("data", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            raise CompkitError(
                f"model {self.spec.name!r}: GET {url} did not answer a JSON "
                f"model list: {resp.text[:300]!r}"
            ) from None
        ids = [str(m.get("id")) for m in models]
        if ids and self.spec.model not in ids:
            warnings.warn(
                f"model {self.spec.name!r}: the server at {self.base_url} serves {ids}, not "
                f"{self.spec.model!r}; requests may fail (vLLM answers 404) or reach the "
                "server's default model (llama-cpp-python)",
                stacklevel=3,
            )
        owners = {str(m.get("owned_by")) for m in models}
        flavour = next((_OWNERS[o] for o in owners if o in _OWNERS), "unknown")
        return {
            "models": models,
            "ids": ids,
            "flavour": flavour,
            "server": resp.headers.get("server"),
        }

    @classmethod
    def check_source(cls, spec: ModelSpec, *, base_dir: Path, ids, repeats: int) -> str:
        """The endpoint answers ``/v1/models`` and serves the model (a single-model server,
        such as llama-cpp-python's, answers under any name)."""
        with cls(spec, base_dir=base_dir) as runtime:
            served = runtime._server["ids"]
        if len(served) > 1 and spec.model not in served:
            raise CompkitError(
                f"model {spec.name!r}: the server at {spec.endpoint} serves {served}, not "
                f"{spec.model!r}; set model to one of them"
            )
        return f"endpoint {spec.endpoint}: serves {served or 'an unnamed model'}"

    @property
    def headers(self) -> dict[str, str]:
        """Headers every request carries (``Accept``, and ``Authorization`` with a key)."""
        return dict(self._headers)

    def identity(self) -> ModelIdentity:
        if self._identity is None:
            self._identity = self._make_identity()
        return self._identity

    def _make_identity(self) -> ModelIdentity:
        server = self._server
        served = next((m for m in server["models"] if m.get("id") == self.spec.model), None)
        if served is None and len(server["models"]) == 1:
            served = server["models"][0]  # single-model servers answer under any name
        meta = (served or {}).get("meta") or {}  # llama.cpp's server: n_params, size, ...
        extra = {
            "server_models": server["models"],
            "server_flavour": server["flavour"],
            "model_listed": self.spec.model in server["ids"],
            "options": self._option_record(),
        }
        return ModelIdentity(
            runtime=self.name,
            runtime_version=f"httpx {httpx.__version__}; server: {server['server'] or 'unknown'}",
            model=self.spec.model,
            served_model=(served or {}).get("id"),
            endpoint=self.base_url,
            parameters=meta.get("n_params") if isinstance(meta.get("n_params"), int) else None,
            size_bytes=meta.get("size") if isinstance(meta.get("size"), int) else None,
            extra=extra,
        )

    def _option_record(self) -> dict[str, Any]:
        o = self.options
        return {
            "concurrency": o.concurrency,
            "concurrency_backoff": self.backoff,
            "stream": o.stream,
            "logprobs": o.logprobs,
            "sampling_extras": self._extra_body,
        }

    # ------------------------------------------------------------------ generate

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        sampling: SamplingConfig,
        progress: Progress | None = None,
    ) -> list[Generation]:
        if not requests:
            return []
        return run_coroutine(lambda: self._generate_all(requests, sampling, progress))

    async def _generate_all(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingConfig,
        progress: Progress | None,
    ) -> list[Generation]:
        async with self._async_client() as client:
            gate = asyncio.Semaphore(self.concurrency)
            serial = asyncio.Lock()

            async def one(req: GenerationRequest) -> Generation:
                async with gate:
                    if self.concurrency > 1:
                        gen = await self._generate_one(client, req, sampling, interruptible=True)
                    else:  # backed off: one request at a time
                        async with serial:
                            gen = await self._generate_one(client, req, sampling)
                if gen.extra.get("interrupted"):  # lost to the server's policy: back off
                    self._back_off(gen.error or "")
                    async with serial:
                        gen = await self._generate_one(client, req, sampling)
                if progress is not None:
                    progress(1)
                return gen

            return list(await asyncio.gather(*(one(r) for r in requests)))

    @property
    def concurrency(self) -> int:
        """Requests in flight at once: ``options.concurrency``, or 1 after a back-off."""
        return 1 if self.backoff is not None else self.options.concurrency

    def _back_off(self, error: str) -> None:
        """The server cut a stream short because another request waited: go on at
        concurrency 1, and say so (warning, ``identity().extra["concurrency_backoff"]``)."""
        if self.backoff is not None:
            self.backoff["interrupted"] += 1
            return
        self.backoff = {
            "from": self.options.concurrency,
            "to": 1,
            "interrupted": 1,
            "reason": error,
        }
        self._identity = None  # the identity records the back-off
        warnings.warn(
            f"model {self.spec.name!r}: the server at {self.base_url} cut a streamed answer "
            "short because another request was waiting (llama-cpp-python's server does this "
            "unless started with --interrupt_requests false); concurrency lowered from "
            f"{self.options.concurrency} to 1 for the rest of this run and the cut answers are "
            "asked again. Start the server with --interrupt_requests false to keep "
            f"concurrency {self.options.concurrency}.",
            stacklevel=2,
        )

    def _async_client(self) -> httpx.AsyncClient:
        _fail_fast_sniffio_import()
        n = self.options.concurrency
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=30)
        return httpx.AsyncClient(
            headers=self._headers, timeout=self._timeout, limits=limits, transport=self._transport
        )

    async def _generate_one(
        self,
        client: httpx.AsyncClient,
        req: GenerationRequest,
        sampling: SamplingConfig,
        *,
        interruptible: bool = False,
    ) -> Generation:
        """One request with retries; ``interruptible``: a stream the server interrupted is
        returned at once (``extra["interrupted"]``) instead of retried, so the caller can
        back off first."""
        url = self.request_url(req.prompt)

        async def attempt(state: _Attempt) -> _Answer:
            payload = self.request_payload(req, sampling)
            try:
                return await self._exchange(client, url, payload, state)
            except RequestFailed as exc:
                if not (self._refused_logprobs(exc) and payload.get("logprobs")):
                    raise
            self._logprobs = False  # refused: ask again without, for the rest of the run
            return await self._exchange(client, url, self.request_payload(req, sampling), state)

        try:
            answer, attempts = await self._with_retries(attempt, url, interruptible=interruptible)
        except _Exhausted as done:
            gen = _failed_generation(req.item_id, done.failure, done.attempts, self.concurrency)
            gen.extra["interrupted"] = interruptible and done.failure.interrupted
            return gen
        return answer.generation(req.item_id, batch_size=self.concurrency, attempts=attempts)

    def request_url(self, prompt: Prompt) -> str:
        """``/v1/chat/completions`` for chat prompts, ``/v1/completions`` for text."""
        chat = prompt.messages is not None
        return f"{self.base_url}/chat/completions" if chat else f"{self.base_url}/completions"

    def request_payload(self, req: GenerationRequest, sampling: SamplingConfig) -> dict[str, Any]:
        """The JSON body this runtime sends for ``req`` (to :meth:`request_url`)."""
        chat = req.prompt.messages is not None
        payload: dict[str, Any] = {"model": self.spec.model, "max_tokens": sampling.max_new_tokens}
        if chat:
            payload["messages"] = [dict(m) for m in req.prompt.messages or ()]
        else:
            payload["prompt"] = req.prompt.text
        if sampling.greedy:
            payload["temperature"] = 0.0
        else:
            payload.update(temperature=sampling.temperature, top_p=sampling.top_p, seed=req.seed)
        if sampling.stop:
            payload["stop"] = list(sampling.stop)
        if self._logprobs:
            payload.update({"logprobs": True, "top_logprobs": 1} if chat else {"logprobs": 1})
        if self.options.stream:
            payload.update(stream=True, stream_options={"include_usage": True})
        if req.json_schema is not None:
            payload.update(self._schema_body(req.json_schema, chat=chat))
        payload.update(self._extra_body)
        return payload

    def _schema_body(self, schema: Any, *, chat: bool) -> dict[str, Any]:
        """How the reply is constrained to ``schema``: ``response_format``, except a llama.cpp
        server's text completions, which ignore it and read a GBNF ``grammar`` (the same one
        the in-process llama.cpp runtime decodes under; :func:`kit.structured.gbnf_for`)."""
        if not chat and self._server["flavour"] == "llama.cpp":
            try:
                from kit.structured import gbnf_for

                return {"grammar": gbnf_for(schema)}
            except ImportError as exc:
                raise CompkitError(
                    f"model {self.spec.name!r}: a llama.cpp server's text completions are "
                    "constrained by a GBNF grammar, built by llama-cpp-python's converter, "
                    f"which is not installed ({exc}); install llama-cpp-python, use chat "
                    "prompts, or set structured_output: false"
                ) from exc
        return {"response_format": response_format(schema, style=self.options.response_format)}

    @staticmethod
    def _refused_logprobs(exc: RequestFailed) -> bool:
        return exc.error_class == "http_4xx" and exc.status != 429 and "logprob" in str(exc).lower()

    async def _exchange(
        self, client: httpx.AsyncClient, url: str, payload: dict[str, Any], state: _Attempt
    ) -> _Answer:
        """Send one request and read the whole answer (streamed or not)."""
        answer = _Answer(started=time.perf_counter())
        async with client.stream("POST", url, json=payload) as resp:
            state.got_response = True
            if resp.status_code >= 400:
                raise await http_failure(resp, url)
            if "text/event-stream" not in resp.headers.get("content-type", ""):
                answer.add(json_body(await resp.aread(), url), time.perf_counter())
                answer.token_times.clear()  # one arrival: no time to first token to tell
                return _finished(answer)
            parser, done, lines = SSEParser(), False, resp.aiter_lines()
            async for line in lines:
                data = parser.feed(line)
                if data is None:
                    continue
                if data.strip() == "[DONE]":
                    done = True
                    break
                answer.add(json_body(data, url), time.perf_counter())
            if done:  # read the end of the body so the connection goes back to the pool
                await _drain(lines)
            tail = parser.flush()
            if tail is not None and not done:
                if tail.strip() == "[DONE]":
                    done = True
                else:
                    answer.add(json_body(tail, url), time.perf_counter())
        if answer.finish_reason is None:
            raise RequestFailed(
                "truncated_stream",
                truncation_message(url, answer.chunks, done=done),
                interrupted=done,
            )
        return _finished(answer)

    # ------------------------------------------------------------------ retries

    async def _with_retries(
        self,
        attempt: Callable[[_Attempt], Awaitable[T]],
        url: str,
        *,
        interruptible: bool = False,
    ) -> tuple[T, int]:
        """Run ``attempt`` until it succeeds or fails for good; returns (result, attempts)."""
        tries = self.options.max_retries + 1
        for n in range(1, tries + 1):
            try:
                return await self._guarded(attempt, url), n
            except RequestFailed as exc:
                if not exc.retryable or n == tries or (interruptible and exc.interrupted):
                    raise _Exhausted(exc, n) from None
                await asyncio.sleep(self._retry_delay(n, exc.retry_after))
        raise AssertionError("unreachable")

    async def _guarded(self, attempt: Callable[[_Attempt], Awaitable[T]], url: str) -> T:
        """One attempt under the deadline, with every failure mapped to a RequestFailed."""
        state = _Attempt()
        limit = self.options.timeout_s
        try:
            async with asyncio.timeout(limit):
                return await attempt(state)
        except Exception as exc:  # never let one request stop the run
            raise classify_failure(
                exc, got_response=state.got_response, url=url, timeout_s=limit
            ) from None

    def _retry_delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), RETRY_AFTER_MAX_S)
        cap = min(self.options.backoff_s * 2 ** (attempt - 1), self.options.backoff_max_s)
        return cap * self._rng.uniform(0.5, 1.0)

    # ------------------------------------------------------------------ score choices

    @property
    def supports_choice_scoring(self) -> bool:
        """Whether the server returns aligned prompt logprobs (probed once, on first use)."""
        return self._echo_problem is None

    @functools.cached_property
    def _echo_problem(self) -> str | None:
        """``None`` when echo + logprobs work, else why not."""
        return self._probe_echo()

    def _probe_echo(self) -> str | None:
        url = f"{self.base_url}/completions"
        payload = _echo_payload(self.spec.model, ECHO_PROBE_PROMPT)
        try:
            resp = self._client.post(url, json=payload)
        except httpx.HTTPError as exc:
            return f"the probe request to {url} failed: {type(exc).__name__}: {exc}"
        if resp.status_code >= 400:
            return f"{url} refused echo + logprobs (HTTP {resp.status_code}): {resp.text[:200]}"
        try:
            choice = resp.json()["choices"][0]
            echoed_tokens(choice, prompt=ECHO_PROBE_PROMPT)
        except RequestFailed as exc:
            return str(exc)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return f"{url} answered the echo probe without usable logprobs ({type(exc).__name__}: {exc})"
        return None

    def score_choices(
        self, requests: Sequence[ChoiceRequest], *, progress: Progress | None = None
    ) -> list[ChoiceScores]:
        """Sum of each continuation's token logprobs after a text prompt (see module docstring).

        Raises
        ------
        NotImplementedError
            When the server gives no aligned prompt logprobs, or for chat prompts.
        """
        if not requests:
            return []
        problem = self._echo_problem
        if problem is not None:
            raise NotImplementedError(
                f"runtime 'openai' cannot score choices at {self.base_url}: {problem}"
            )
        if any(r.prompt.messages is not None for r in requests):
            raise NotImplementedError(
                "runtime 'openai' cannot score choices for chat prompts: /v1/completions needs the "
                "prompt as text, and the client cannot render the server's chat template "
                "(use prompt.chat: false, or an in-process runtime)"
            )
        return run_coroutine(lambda: self._score_all(requests, progress))

    async def _score_all(
        self, requests: Sequence[ChoiceRequest], progress: Progress | None
    ) -> list[ChoiceScores]:
        async with self._async_client() as client:
            gate = asyncio.Semaphore(self.options.concurrency)

            async def pair(context: str, continuation: str) -> tuple[float, int, float]:
                async with gate:
                    return await self._score_pair(client, context, continuation)

            async def one(req: ChoiceRequest) -> ChoiceScores:
                text = req.prompt.text or ""
                parts = await asyncio.gather(
                    *(pair(text, c) for c in req.continuations), return_exceptions=True
                )
                failed = next((p for p in parts if isinstance(p, BaseException)), None)
                if isinstance(failed, _Exhausted):
                    result = ChoiceScores(
                        req.item_id,
                        [],
                        [],
                        error=_message(failed.failure, failed.attempts),
                        error_class=failed.failure.error_class,
                    )
                elif failed is not None:
                    raise failed
                else:
                    result = ChoiceScores(
                        req.item_id,
                        [p[0] for p in parts],
                        [p[1] for p in parts],
                        latency_s=sum(p[2] for p in parts),
                    )
                if progress is not None:
                    progress(1)
                return result

            return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _score_pair(
        self, client: httpx.AsyncClient, context: str, continuation: str
    ) -> tuple[float, int, float]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        full = context + continuation
        url = f"{self.base_url}/completions"

        async def attempt(state: _Attempt) -> tuple[float, int, float]:
            start = time.perf_counter()
            resp = await client.post(url, json=_echo_payload(self.spec.model, full))
            state.got_response = True
            if resp.status_code >= 400:
                raise await http_failure(resp, url)
            body = json_body(resp.content, url)
            choices = body.get("choices") if isinstance(body, dict) else None
            if not isinstance(choices, list) or not choices:
                raise RequestFailed("invalid_response", f"{url} answered without choices")
            tokens = echoed_tokens(choices[0], prompt=full)
            total, n = continuation_logprob(tokens, start=len(context), end=len(full))
            return total, n, time.perf_counter() - start

        result, _ = await self._with_retries(attempt, url)
        return result

    # ------------------------------------------------------------------ count tokens

    def count_tokens(self, prompt: Prompt) -> int:
        """Prompt tokens by the server's tokenizer (chat: see the module docstring).

        Raises ``NotImplementedError`` when the server has no tokenizer endpoint.
        """
        if self._tokenizer_path is None:
            raise NotImplementedError(
                f"the server at {self.root_url} has no tokenizer endpoint "
                "(/tokenize or /extras/tokenize)"
            )
        path = self._tokenizer_path
        if prompt.messages is not None and self._server["flavour"] == "vllm":
            count = self._tokenize(
                path,
                {
                    "model": self.spec.model,
                    "add_generation_prompt": True,
                    "messages": [dict(m) for m in prompt.messages],
                },
            )
            if count is not None:
                return count
        count = self._tokenize(path, _tokenize_payload(path, self.spec.model, _prompt_text(prompt)))
        if count is None:
            raise CompkitError(
                f"model {self.spec.name!r}: {self.root_url}{path} failed to count "
                "the tokens of a prompt"
            )
        return count

    @functools.cached_property
    def _tokenizer_path(self) -> str | None:
        """The server's tokenizer endpoint (probed once), or ``None``."""
        for path in ("/tokenize", "/extras/tokenize"):
            if self._tokenize(path, _tokenize_payload(path, self.spec.model, "Hello")) is not None:
                return path
        return None

    def _tokenize(self, path: str, payload: dict[str, Any]) -> int | None:
        try:
            resp = self._client.post(f"{self.root_url}{path}", json=payload)
            body = resp.json() if resp.status_code < 400 else None
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(body, dict):
            return None
        if isinstance(body.get("count"), int):
            return body["count"]
        return len(body["tokens"]) if isinstance(body.get("tokens"), list) else None

    def close(self) -> None:
        self._client.close()


# ---------------------------------------------------------------------------- helpers


class _Exhausted(Exception):
    """All attempts of one request failed (or the failure is not worth retrying)."""

    def __init__(self, failure: RequestFailed, attempts: int):
        super().__init__(str(failure))
        self.failure = failure
        self.attempts = attempts


#: ``options.response_format`` values: how a JSON schema goes into the request.
RESPONSE_FORMATS = ("json_schema", "json_object")


def response_format(schema: Any, *, style: str = "json_schema") -> dict[str, Any]:
    """The ``response_format`` body that constrains a reply to ``schema``.

    Examples
    --------
    >>> response_format({"type": "object"}, style="json_object")
    {'type': 'json_object', 'schema': {'type': 'object'}}
    """
    if style == "json_object":
        return {"type": "json_object", "schema": dict(schema)}
    return {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": dict(schema), "strict": True},
    }


def endpoint_urls(endpoint: str) -> tuple[str, str]:
    """(``.../v1`` base URL, server root) of an endpoint given with or without ``/v1``."""
    root = endpoint.strip().rstrip("/")
    if not root.startswith(("http://", "https://")):
        root = f"http://{root}"
    root = root.removesuffix("/v1")
    return f"{root}/v1", root


def _auth_header(spec: ModelSpec) -> dict[str, str]:
    if not spec.api_key_env:
        return {}
    key = os.environ.get(spec.api_key_env)
    if not key:
        raise CompkitError(
            f"model {spec.name!r}: api_key_env names the environment variable "
            f"{spec.api_key_env!r}, which is not set (export {spec.api_key_env}=...)"
        )
    return {"Authorization": f"Bearer {key}"}


def run_coroutine(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, also under a running loop (Jupyter).

    Without a running loop this is ``asyncio.run``; inside one (a notebook cell), the
    coroutine runs on its own loop in a worker thread while the caller waits.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compkit-openai") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def http_failure(resp: httpx.Response, url: str) -> RequestFailed:
    body = (await resp.aread()).decode("utf-8", errors="replace").strip()
    status = resp.status_code
    cls = "http_5xx" if status >= 500 else "http_4xx"
    return RequestFailed(
        cls,
        f"HTTP {status} from {url}: {body[:300]}",
        status=status,
        retry_after=retry_after_s(resp.headers.get("retry-after")),
    )


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def json_body(data: bytes | str, url: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        raise RequestFailed(
            "invalid_response", f"{url} sent non-JSON data: {text[:200]!r}"
        ) from None


def _finished(answer: _Answer) -> _Answer:
    answer.ended = time.perf_counter()
    return answer


def _fail_fast_sniffio_import() -> None:
    """Make ``import sniffio`` fail at once where it is not installed.

    httpcore tries ``import sniffio`` each time an async lock is set up (four times a
    request); when it is missing every try searches ``sys.path`` again, a good share of the
    client's cost per request. A ``None`` entry in ``sys.modules`` gives the same
    ImportError (httpcore then assumes asyncio, which is right here) without the search.
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


async def _drain(lines: AsyncIterator[str], limit_s: float = 1.0) -> None:
    """Consume what follows ``[DONE]`` (normally nothing), for at most ``limit_s``."""
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(limit_s):
            async for _ in lines:
                pass


def truncation_message(url: str, chunks: int, *, done: bool) -> str:
    """Why a stream without a ``finish_reason`` counts as cut short (``done``: it sent
    ``[DONE]``, the signature of llama-cpp-python's interrupted streams)."""
    if not done:
        return (
            f"the stream from {url} ended after {chunks} chunks without [DONE] or a finish_reason"
        )
    return (
        f"the stream from {url} sent [DONE] after {chunks} chunks but no "
        "finish_reason: the server cut the answer short (llama-cpp-python's server does "
        "this to a stream when another request waits, unless started with "
        "--interrupt_requests False)"
    )


def _message(failure: RequestFailed, attempts: int) -> str:
    return f"{failure} (after {attempts} attempts)" if attempts > 1 else str(failure)


def _failed_generation(
    item_id: str, failure: RequestFailed, attempts: int, batch_size: int
) -> Generation:
    return Generation(
        item_id=item_id,
        text="",
        batch_size=batch_size,
        error=_message(failure, attempts),
        error_class=failure.error_class,
        extra={"attempts": attempts, "status": failure.status},
    )


def _echo_payload(model: str, prompt: str) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": prompt,
        "echo": True,
        "logprobs": 1,
        "max_tokens": 1,
        "temperature": 0.0,
    }


def echoed_tokens(choice: Any, *, prompt: str) -> list[tuple[int, int, float | None]]:
    """``(start, end, logprob)`` character spans of the echoed tokens of a completion choice.

    Raises :class:`RequestFailed` (``invalid_response``) when the choice has no echoed
    logprobs, or when they are misaligned: the greedy token generated after the prompt is
    missing although text was generated (llama-cpp-python, for models without a BOS token,
    drops it and pairs each prompt token with the logprob of the next).
    """
    lp = choice.get("logprobs") if isinstance(choice, dict) else None
    if not isinstance(lp, dict):
        raise RequestFailed("invalid_response", "no logprobs in the echo answer")
    offsets, values, tokens = lp.get("text_offset"), lp.get("token_logprobs"), lp.get("tokens")
    if (
        not (isinstance(offsets, list) and isinstance(values, list) and isinstance(tokens, list))
        or not (len(offsets) == len(values) == len(tokens))
        or not offsets
        or offsets[0] != 0
    ):
        raise RequestFailed(
            "invalid_response",
            "the echo answer has no prompt logprobs "
            "(text_offset / token_logprobs missing or not starting at 0)",
        )
    text = choice.get("text") or ""
    generated = text[len(prompt) :] if text.startswith(prompt) else ""
    if generated and offsets[-1] < len(prompt):
        raise RequestFailed(
            "invalid_response",
            "the server's prompt logprobs are misaligned "
            "(the generated token is missing from the echoed tokens, so each "
            "logprob belongs to the next token; llama-cpp-python does this for "
            "models that add no BOS token)",
        )
    ends = [*offsets[1:], offsets[-1] + len(tokens[-1] or "")]
    return [(int(s), int(e), v) for s, e, v in zip(offsets, ends, values, strict=True)]


def continuation_logprob(
    tokens: list[tuple[int, int, float | None]], *, start: int, end: int
) -> tuple[float, int]:
    """Sum and count of the logprobs of the tokens covering characters ``[start, end)``."""
    total, n, covered = 0.0, 0, start >= end
    for s, e, value in tokens:
        if s >= end:
            break
        if e <= start:
            continue
        if value is None or not math.isfinite(value):
            raise RequestFailed("invalid_response", f"no logprob for the continuation token at {s}")
        total += value
        n += 1
        covered = covered or e >= end
    if not covered:
        raise RequestFailed("invalid_response", "the echoed tokens do not cover the continuation")
    return total, n


def _tokenize_payload(path: str, model: str, text: str) -> dict[str, Any]:
    if path == "/extras/tokenize":  # llama-cpp-python
        return {"model": model, "input": text}
    return {"model": model, "prompt": text, "content": text, "add_special": True}  # vLLM, llama.cpp


def _prompt_text(prompt: Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    return "\n".join(m.get("content", "") for m in prompt.messages or ())
