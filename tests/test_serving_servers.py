"""Servers kit starts: clear outcomes for every start failure, never a hang, never an orphan."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from servers import ctrl_c_default

from kit.errors import CompkitError
from kit.serving.fake import FakeServer
from kit.serving.servers import (
    LlamaCppServer,
    ServerProcess,
    ServerStartError,
    free_port,
    live_servers,
)

ROOT = Path(__file__).resolve().parent.parent


def gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def python(code: str) -> list[str]:
    return ServerProcess.python_command(textwrap.dedent(code))


def test_a_port_in_use_is_refused_before_starting():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        server = ServerProcess(python("time.sleep(30)"), port=port, name="held")
        with pytest.raises(ServerStartError, match=rf"port {port} on 127.0.0.1 is already in use"):
            server.start()
    assert server.proc is None and not live_servers()


def test_readiness_timeout_stops_the_server_and_names_the_setting():
    server = ServerProcess(
        python("print('loading', flush=True); time.sleep(60)"),
        port=free_port(),
        ready_timeout_s=1.0,
        name="slow",
    )
    start = time.monotonic()
    with pytest.raises(
        ServerStartError, match=r"not ready after 1 s \(serving.ready_timeout_s"
    ) as err:
        server.start()
    assert time.monotonic() - start < 8
    assert "loading" in str(err.value) and server.proc is None and not live_servers()


def test_a_server_that_exits_while_starting_says_so_with_its_output():
    server = ServerProcess(
        python("print('bad model file', flush=True); sys.exit(3)"), port=free_port(), name="broken"
    )
    with pytest.raises(ServerStartError, match="broken exited with code 3 while starting") as err:
        server.start()
    assert "bad model file" in str(err.value)


def test_a_missing_model_file_is_an_error_before_any_process(tmp_path):
    with pytest.raises(CompkitError, match=r"model file .*nope.gguf not found"):
        LlamaCppServer(tmp_path / "nope.gguf")


def test_stop_kills_the_whole_process_group():
    code = """
    import subprocess, http.server, socketserver, threading
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(child.pid, flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
    """
    port = free_port()
    server = ServerProcess([*python(code), str(port)], port=port, ready_path="/", name="tree")
    with server:
        pid = server.pid
        child = int(server.log_tail().split()[0])
        assert psutil.pid_exists(child)
    assert gone(pid) and gone(child)


def test_a_server_outlives_no_parent_killed_with_sigkill():
    """kit itself killed with SIGKILL: the child's watchdog ends the server within a second."""
    code = """
    from kit.serving.fake import FakeServer
    fake = FakeServer().__enter__()
    print(fake.server.pid, flush=True)
    time.sleep(120)
    """
    parent = subprocess.Popen(
        python(code),
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "COMPKIT_PARENT_PID": str(os.getpid())},
    )
    try:
        server_pid = int(parent.stdout.readline())
        assert psutil.pid_exists(server_pid)
        parent.kill()
        parent.wait(10)
        assert gone(server_pid, within_s=5)
    finally:
        parent.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_every_server(sig):
    code = """
    from kit.serving.fake import FakeServer
    with FakeServer() as a, FakeServer() as b:
        print(json.dumps([a.server.pid, b.server.pid]), flush=True)
        time.sleep(120)
    """
    parent = subprocess.Popen(
        python("import json\n" + textwrap.dedent(code)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COMPKIT_PARENT_PID": str(os.getpid())},
        preexec_fn=ctrl_c_default,
    )
    try:
        pids = json.loads(parent.stdout.readline())
        assert all(psutil.pid_exists(p) for p in pids)
        parent.send_signal(sig)
        code = parent.wait(20)
        assert code != 0
        assert all(gone(p) for p in pids)
    finally:
        parent.kill()


def test_fake_server_is_a_server_process_and_stops():
    with FakeServer() as fake:
        pid = fake.server.pid
        assert fake.url.startswith("http://127.0.0.1:") and live_servers()
    assert gone(pid) and not live_servers()
