"""An OpenAI-compatible fake server: instant (the load generator's ceiling) or slow, with faults.

:class:`FakeServer` runs :func:`serve` in a subprocess on 127.0.0.1 (a
:class:`~kit.serving.servers.ServerProcess`: own process group, always stopped). It answers
``GET /v1/models`` (one model, ``owned_by: fake``), ``POST /v1/chat/completions`` and
``/v1/completions`` (streamed as SSE with chunked transfer encoding, or one JSON body),
and ``/tokenize`` / ``/extras/tokenize`` (one token per whitespace-separated word). HTTP/1.1
keep-alive, no framework: with ``ttft_s = itl_s = 0`` it answers a request in well under a
millisecond of its own CPU, so a client measured against it meets its own limit first.

An answer is ``min(max_tokens, tokens)`` chunks of ``token_text``, then a chunk with
``finish_reason`` (``length`` or ``stop``), a usage chunk and ``[DONE]``; the first chunk
comes ``ttft_s`` after the request, each next one ``itl_s`` later. Markers in the prompt
(the text prompt or the last chat message) inject faults, so a test decides per prompt
what goes wrong, whatever the arrival order:

============  ====================================================================
``#error500`` HTTP 500 with a JSON error body (``#error429``, ``#error400`` alike)
``#drop``     close the connection without answering
``#hang``     wait ``hang_s`` before answering (longer than any client timeout)
``#truncate`` send two chunks, then close the connection mid-stream
``#done``     send two chunks and ``[DONE]`` without a ``finish_reason`` (what
              llama-cpp-python's server does to an interrupted stream)
``#slow=X``   add X seconds to the time to first token
============  ====================================================================

``die_after`` makes the process exit (code 1, connections cut) when generation request
number ``die_after + 1`` arrives: a server dying in the middle of a sweep.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from typing import Any

FAULTS = ("#error500", "#error429", "#error400", "#drop", "#hang", "#truncate", "#done")
_SLOW = re.compile(r"#slow=([0-9.]+)")


@dataclass(frozen=True)
class FakeConfig:
    """What the fake server answers and how fast (see module docstring)."""

    model: str = "fake-model"
    tokens: int = 16
    token_text: str = " tok"
    ttft_s: float = 0.0
    itl_s: float = 0.0
    hang_s: float = 3600.0
    die_after: int | None = None
    usage: bool = True


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Handler:
    def __init__(self, config: FakeConfig):
        self.config = config
        self.generations = 0
        models = {"object": "list", "data": [{"id": config.model, "owned_by": "fake"}]}
        self._models = _response(200, json.dumps(models).encode())

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, length = _parse_head(head)
                body = await reader.readexactly(length) if length else b""
                if not await self._answer(method, path, body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _answer(
        self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection must close."""
        if method == "GET" and path.startswith("/v1/models"):
            writer.write(self._models)
        elif method == "POST" and path in ("/tokenize", "/extras/tokenize"):
            request = json.loads(body or b"{}")
            text = str(request.get("prompt") or request.get("input") or "")
            tokens = list(range(len(text.split())))
            writer.write(
                _response(200, json.dumps({"tokens": tokens, "count": len(tokens)}).encode())
            )
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            self.generations += 1
            if self.config.die_after is not None and self.generations > self.config.die_after:
                os._exit(1)
            return await self._generate(path.endswith("chat/completions"), body, writer)
        else:
            writer.write(_response(404, b'{"error": {"message": "not found", "code": 404}}'))
        await writer.drain()
        return True

    async def _generate(self, chat: bool, body: bytes, writer: asyncio.StreamWriter) -> bool:
        request = json.loads(body or b"{}")
        prompt = _prompt_of(request)
        fault = next((f for f in FAULTS if f in prompt), None)
        if fault == "#drop":
            return False
        if fault is not None and fault.startswith("#error"):
            status = int(fault.removeprefix("#error"))
            message = json.dumps({"error": {"message": f"injected {status}", "code": status}})
            writer.write(_response(status, message.encode()))
            await writer.drain()
            return True
        slow = _SLOW.search(prompt)
        delay = self.config.ttft_s + (float(slow.group(1)) if slow else 0.0)
        if fault == "#hang":
            delay += self.config.hang_s
        cap = (
            request.get("max_tokens") or request.get("max_completion_tokens") or self.config.tokens
        )
        n = max(0, min(int(cap), self.config.tokens))
        if delay:
            await asyncio.sleep(delay)
        if not request.get("stream"):
            writer.write(_response(200, json.dumps(self._whole(chat, n)).encode()))
            await writer.drain()
            return True
        return await self._stream(chat, n, fault, writer)

    async def _stream(
        self, chat: bool, n: int, fault: str | None, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\nserver: fake\r\n\r\n"
        )
        cut = 2 if fault in ("#truncate", "#done") else None
        for i in range(n):
            if i and self.config.itl_s:
                await writer.drain()
                await asyncio.sleep(self.config.itl_s)
            if cut is not None and i == cut:
                break
            writer.write(_chunk(_event(self._piece(chat, {"text": self.config.token_text}))))
        if fault == "#truncate":
            await writer.drain()
            return False
        if fault != "#done":
            reason = "length" if n < self.config.tokens else "stop"  # max_tokens cut it
            writer.write(_chunk(_event(self._piece(chat, {}, finish=reason))))
            if self.config.usage:
                usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
                writer.write(_chunk(_event({"choices": [], "usage": usage})))
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        return True

    def _piece(self, chat: bool, content: dict[str, str], finish: str | None = None) -> dict:
        if chat:
            delta = {"content": content["text"]} if content else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": content.get("text", ""), "finish_reason": finish}
        return {"id": "fake", "model": self.config.model, "choices": [choice]}

    def _whole(self, chat: bool, n: int) -> dict[str, Any]:
        text = self.config.token_text * n
        reason = "length" if n < self.config.tokens else "stop"
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        usage = {"prompt_tokens": 8, "completion_tokens": n, "total_tokens": 8 + n}
        return {"id": "fake", "model": self.config.model, "choices": [choice], "usage": usage}


def _prompt_of(request: dict[str, Any]) -> str:
    if isinstance(request.get("prompt"), str):
        return request["prompt"]
    messages = request.get("messages") or [{}]
    return str(messages[-1].get("content", ""))


def _parse_head(head: bytes) -> tuple[str, str, int]:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = [*lines[0].split(" ", 2), "", ""][:3]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return method, path, length


def _response(status: int, body: bytes) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests"}
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nserver: fake\r\n"
        b"content-length: %d\r\n\r\n" % (status, reason.get(status, "Error").encode(), len(body))
    ) + body


def serve(port: int, config: FakeConfig) -> None:
    """Serve on ``127.0.0.1:port`` until killed (the subprocess entry point)."""

    async def run() -> None:
        server = await asyncio.start_server(_Handler(config), "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    serve(int(args[0]), FakeConfig(**json.loads(args[1])))


class FakeServer:
    """The fake server in a subprocess; a context manager with ``url`` and ``server``.

    Parameters are those of :class:`FakeConfig`; ``ready_timeout_s`` bounds the start.
    """

    def __init__(self, *, ready_timeout_s: float = 30.0, **config: Any):
        from kit.serving.servers import ServerProcess, free_port

        self.config = FakeConfig(**config)
        port = free_port()
        self.server = ServerProcess(
            ServerProcess.python_command(
                "from kit.serving.fake import main\nmain()",
                [str(port), json.dumps(asdict(self.config))],
            ),
            port=port,
            ready_timeout_s=ready_timeout_s,
            name="fake OpenAI server",
        )

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> FakeServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.close()
