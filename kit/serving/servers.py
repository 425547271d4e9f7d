"""Server subprocesses that kit starts: on 127.0.0.1, bounded in time, always stopped.

:class:`ServerProcess` runs a command in its own process group and session, waits (bounded)
until a readiness URL answers 200, and stops the whole group (SIGTERM, then SIGKILL). Every
live server is in a registry that an ``atexit`` hook and a SIGTERM handler (installed while
a server lives, in the main thread only) stop, so a stage that ends by an exception,
Ctrl-C (``KeyboardInterrupt`` unwinds the ``with`` block) or SIGTERM leaves no server
behind. Against SIGKILL of kit itself, the child runs a watchdog thread that exits the
server within half a second of its parent's death (its parent pid changes).

:class:`LlamaCppServer` is ``python -m llama_cpp.server`` with a GGUF: model alias,
``n_ctx``, threads, ``--interrupt_requests`` and extra arguments, and a :class:`ColdStart`
measurement: process start -> ready (``/v1/models`` answers) -> first streamed token of a
one-token request. Where llama.cpp was built with AMX kernels and the CPU advertises AMX but
the kernel does not enable its tile state (Firecracker VMs), llama.cpp's extra buffer types
are switched off in the child before ``llama_cpp.server``'s own ``main()`` runs: exactly the
in-process runtime's rule, so both run the same kernels (repacked weight layouts change the
float results, and with them greedy answers of low-bit quantizations).

llama-cpp-python's server (0.3.x) has one ``Llama`` per model behind a double asyncio lock:
it decodes one request at a time, has no parallel slots, and queues concurrent requests
(their waiting shows up in TTFT). With ``--interrupt_requests true`` (its default) a
running stream is ended early with ``[DONE]`` as soon as another request waits; kit starts
it with ``false`` unless the deploy block says otherwise.

Example
-------
>>> with LlamaCppServer(gguf, alias="smollm2", n_threads=1) as server:   # doctest: +SKIP
...     print(server.url, server.cold_start)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kit.errors import CompkitError

HOST = "127.0.0.1"
_KIT_ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 5.0

#: Runs first in every child kit starts: a parent watchdog, then the real entry point.
WATCHDOG = """
import os, sys, threading, time
_parent = int(os.environ["COMPKIT_PARENT_PID"])
def _watch():
    while True:
        if os.getppid() != _parent:
            os._exit(3)
        time.sleep(0.5)
threading.Thread(target=_watch, daemon=True, name="compkit-parent-watch").start()
"""

_LLAMA_MAIN = """
import llama_cpp.llama_cpp as _low
# the in-process runtime's rule (kit.runtimes.llamacpp.amx_unusable): extra buffer types off
# only where llama.cpp has AMX kernels and the kernel does not enable AMX tile data
if os.environ.get("COMPKIT_AMX_TILE_UNUSABLE") == "1" and b"AMX" in _low.llama_print_system_info():
    _default = _low.llama_model_default_params
    def _params():
        params = _default()
        params.use_extra_bufts = False
        return params
    _low.llama_model_default_params = _params
from llama_cpp.server.__main__ import main
sys.argv = ["llama_cpp.server", *sys.argv[1:]]
main()
"""


class ServerStartError(CompkitError):
    """A server did not get ready: it exited, its port was taken, or it timed out."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    """Whether something listens on (or holds) ``127.0.0.1:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------- registry

_LIVE: set[ServerProcess] = set()
_LOCK = threading.Lock()
_SIGTERM_INSTALLED = False


def live_servers() -> list[ServerProcess]:
    """Servers started by this process and not stopped yet."""
    with _LOCK:
        return list(_LIVE)


def stop_all() -> None:
    """Stop every live server (the atexit hook; also safe to call by hand)."""
    for server in live_servers():
        server.stop()


atexit.register(stop_all)


def _on_sigterm(signum: int, frame: Any) -> None:
    stop_all()
    raise SystemExit(128 + signum)


def _register(server: ServerProcess) -> None:
    global _SIGTERM_INSTALLED
    with _LOCK:
        _LIVE.add(server)
        first = len(_LIVE) == 1
    if first and threading.current_thread() is threading.main_thread():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
                _SIGTERM_INSTALLED = True


def _unregister(server: ServerProcess) -> None:
    global _SIGTERM_INSTALLED
    with _LOCK:
        _LIVE.discard(server)
        last = not _LIVE
    main = threading.current_thread() is threading.main_thread()
    if last and _SIGTERM_INSTALLED and main:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _SIGTERM_INSTALLED = False


# --------------------------------------------------------------------------- a server process


class ServerProcess:
    """A command that serves HTTP on ``127.0.0.1:port``, in its own process group.

    Parameters
    ----------
    command
        The argv to run (its first element an executable). Python children should start
        with :data:`WATCHDOG` (:meth:`python_command` does that).
    port
        The port the command listens on (it must be free).
    ready_path
        Path that answers HTTP 200 once the server is ready.
    ready_timeout_s
        Seconds :meth:`start` waits for that; then the server is stopped and
        :class:`ServerStartError` raised with the end of its output.
    name
        Used in messages (``llama_cpp.server for model 'q4'``).
    env
        Extra environment variables.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        port: int,
        ready_path: str = "/v1/models",
        ready_timeout_s: float = 180.0,
        name: str = "server",
        env: dict[str, str] | None = None,
    ):
        self.command = list(command)
        self.port = port
        self.ready_path = ready_path
        self.ready_timeout_s = ready_timeout_s
        self.name = name
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None  # time.perf_counter() at spawn
        self.ready_at: float | None = None
        self.returncode: int | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  # closed in close()

    @staticmethod
    def python_command(code: str, args: Sequence[str] = ()) -> list[str]:
        """``python -c WATCHDOG + code args...`` with this interpreter."""
        return [sys.executable, "-c", WATCHDOG + code, *args]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> ServerProcess:
        """Spawn the command and wait until it is ready (bounded by ``ready_timeout_s``)."""
        if self.proc is not None:
            raise CompkitError(f"{self.name} is already started")
        if port_in_use(self.port):
            raise ServerStartError(
                f"{self.name}: port {self.port} on {HOST} is already in use; stop what "
                "listens there or choose another port (serving.port), or leave the port "
                "out to use a free one"
            )
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COMPKIT_PARENT_PID": str(os.getpid())}
        env["PYTHONPATH"] = os.pathsep.join(  # the child imports this very kit
            p for p in (str(_KIT_ROOT), os.environ.get("PYTHONPATH")) if p
        )
        env.update(self.env)
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # own process group: stop() signals all of it
        )
        _register(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self.started_at is not None
        deadline = self.started_at + self.ready_timeout_s
        last: str = "no answer yet"
        with httpx.Client(timeout=2.0) as client:
            while time.perf_counter() < deadline:
                code = self.poll()
                if code is not None:
                    raise ServerStartError(self._exit_message(code, "while starting"))
                try:
                    resp = client.get(f"{self.url}{self.ready_path}")
                    if resp.status_code == 200:
                        self.ready_at = time.perf_counter()
                        return
                    last = f"HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}"
                time.sleep(0.1)
        raise ServerStartError(
            f"{self.name} at {self.url} was not ready after {self.ready_timeout_s:g} s "
            f"(serving.ready_timeout_s; last answer: {last}); it was stopped. Its output "
            f"ends with:\n{self.log_tail()}"
        )

    def _exit_message(self, code: int, when: str) -> str:
        tail = self.log_tail()
        hint = ""
        if "address already in use" in tail.lower():
            hint = f" (port {self.port} was taken by another process)"
        return f"{self.name} exited with code {code} {when}{hint}; its output ends with:\n{tail}"

    def poll(self) -> int | None:
        """The exit code once the process has exited, else ``None``."""
        if self.proc is None:
            return self.returncode
        code = self.proc.poll()
        if code is not None:
            self.returncode = code
        return code

    def alive(self) -> bool:
        return self.proc is not None and self.poll() is None

    def death_message(self) -> str | None:
        """Why the server is gone, when it exited on its own; else ``None``."""
        code = self.poll()
        if code is None or self.proc is None:
            return None
        return self._exit_message(code, "while serving")

    def log_tail(self, n: int = 3000) -> str:
        if self._log.closed:
            return ""
        self._log.flush()
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - n))
        return self._log.read().decode("utf-8", errors="replace")

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after :data:`STOP_GRACE_S`; idempotent."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=STOP_GRACE_S)
            _signal_group(proc, signal.SIGKILL)  # anything left in the group
            self.returncode = proc.returncode
            self.proc = None
        _unregister(self)

    def close(self) -> None:
        self.stop()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


# --------------------------------------------------------------------------- llama.cpp


@dataclass(frozen=True)
class ColdStart:
    """Seconds from process start to ready, and from ready to the first streamed token."""

    ready_s: float
    first_token_s: float | None

    @property
    def total_s(self) -> float | None:
        """Process start -> first token (what a scale-from-zero request waits)."""
        return None if self.first_token_s is None else self.ready_s + self.first_token_s


class LlamaCppServer(ServerProcess):
    """``python -m llama_cpp.server`` serving one GGUF on 127.0.0.1 (see module docstring).

    Parameters
    ----------
    model
        The GGUF file (must exist).
    alias
        Served model name (``--model_alias``).
    n_ctx, n_threads
        Context size and llama.cpp threads (also used for batch threads).
    interrupt_requests
        llama-cpp-python's flag (its own default is True; kit's is False).
    logits_all
        llama-cpp-python's flag (default True, as its own: the echo logprobs of choice scoring
        need it; the serving stage passes the deploy block's, default False).
    extra_args
        More command-line arguments (``--n_batch 256`` ...).
    port
        Default: a free port.
    """

    def __init__(
        self,
        model: Path,
        *,
        alias: str = "model",
        n_ctx: int = 2048,
        n_threads: int = 1,
        interrupt_requests: bool = False,
        logits_all: bool = True,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        ready_timeout_s: float = 180.0,
        name: str | None = None,
    ):
        from kit.environment import amx_tile_unusable

        self.model = Path(model)
        if not self.model.is_file():
            raise CompkitError(f"{name or 'llama_cpp.server'}: model file {self.model} not found")
        self.alias, self.n_ctx, self.n_threads = alias, n_ctx, n_threads
        self.interrupt_requests = interrupt_requests
        args = [
            *("--model", str(self.model), "--model_alias", alias, "--host", HOST),
            *("--port", str(port or 0), "--n_ctx", str(n_ctx)),
            *("--n_threads", str(n_threads), "--n_threads_batch", str(n_threads)),
            *("--interrupt_requests", str(interrupt_requests).lower()),
            *("--logits_all", str(logits_all).lower()),
            *extra_args,
        ]
        env = {
            "OMP_NUM_THREADS": str(n_threads),
            "COMPKIT_AMX_TILE_UNUSABLE": "1" if amx_tile_unusable() else "0",
        }
        super().__init__(
            self.python_command(_LLAMA_MAIN, args),
            port=port or 0,
            ready_timeout_s=ready_timeout_s,
            name=name or f"llama_cpp.server ({self.model.name})",
            env=env,
        )
        self._fixed_port = port is not None
        self.cold_start: ColdStart | None = None

    def start(self) -> LlamaCppServer:
        """Start on the given port, or on a free one (a second free one if the first was
        taken in between); then measure the first token."""
        attempts = 1 if self._fixed_port else 2
        for attempt in range(attempts):
            if not self._fixed_port:
                self._set_port(free_port())
            try:
                super().start()
                break
            except ServerStartError as exc:
                if attempt + 1 == attempts or "was taken by another process" not in str(exc):
                    raise
        try:
            self.cold_start = self._measure_cold_start()
        except BaseException:
            self.stop()
            raise
        return self

    def _set_port(self, port: int) -> None:
        self.port = port
        i = self.command.index("--port")
        self.command[i + 1] = str(port)

    def _measure_cold_start(self) -> ColdStart:
        assert self.started_at is not None and self.ready_at is not None
        payload = {"model": self.alias, "prompt": "Hello", "max_tokens": 1, "stream": True}
        sent, first = time.perf_counter(), None
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.Client(timeout=self.ready_timeout_s) as client,
            client.stream("POST", f"{self.url}/v1/completions", json=payload) as resp,
        ):
            for line in resp.iter_lines():
                if first is None and _has_text(line):
                    first = time.perf_counter() - sent
        return ColdStart(ready_s=self.ready_at - self.started_at, first_token_s=first)


def _has_text(line: str) -> bool:
    """Whether an SSE line carries generated text (a completion chunk)."""
    if not line.startswith("data:") or line.strip() == "data: [DONE]":
        return False
    try:
        choices = json.loads(line[5:]).get("choices") or [{}]
    except (ValueError, AttributeError):
        return False
    return bool(isinstance(choices[0], dict) and choices[0].get("text"))
