"""Headless Chromium (Playwright driving Debian's /usr/bin/chromium) and a JupyterLab server
for the browser tests (marker ``browser``).

Playwright's own browser download does not work here, so it launches the system Chromium.
Missing Chromium or Playwright skips a browser test on a developer machine and fails it when
``CI=true`` (``make test`` installs both: ``make browser`` and requirements/dev.txt).

Every page gets a route that aborts any request that is not ``file:`` or ``data:`` / ``blob:``
or to the local server, and records it: the pages must work with no network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ERROR_TEXTS = ("Error loading script", "Javascript Error", "Error displaying widget")


def require_browser() -> Path:
    """The Chromium binary; skip (or fail when ``CI=true``) when it or Playwright is missing."""
    problems = []
    if not CHROMIUM.exists():
        problems.append("Chromium at /usr/bin/chromium (`make browser`)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("the Python package playwright (requirements/dev.txt)")
    if problems:
        message = "the browser tests need " + " and ".join(problems)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@dataclass
class PageLog:
    """What a page did that a test must check: dialogs, console errors, page errors, and
    requests that were blocked because they left the machine."""

    dialogs: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)


def watch(page, *, allow_host: str | None = None) -> PageLog:
    """Record ``page``'s dialogs (dismissed), console errors and page errors; abort and
    record every request to anywhere but ``allow_host`` (``127.0.0.1:PORT``)."""
    log = PageLog()

    def on_dialog(dialog) -> None:
        log.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def route(route) -> None:
        url = route.request.url
        local = url.startswith(("file:", "data:", "blob:")) or (
            allow_host is not None and url.startswith(f"http://{allow_host}/")
        )
        if local:
            route.continue_()
        else:
            log.blocked.append(url)
            route.abort()

    page.on("dialog", on_dialog)
    page.on("console", lambda m: log.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: log.page_errors.append(str(e)))
    page.route("**/*", route)
    return log


@contextlib.contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium browser (closed on exit)."""
    from playwright.sync_api import sync_playwright

    executable = require_browser()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Lab:
    url: str
    token: str
    root: Path

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}&reset"


@contextlib.contextmanager
def jupyterlab(
    root: Path, *, env: dict[str, str] | None = None, timeout: float = 90
) -> Iterator[Lab]:
    """JupyterLab on 127.0.0.1, a free port and a fixed token, serving ``root``, with its
    config, data, settings and runtime folders under ``root/.jupyter-test`` (no announcements,
    no update check). Always stopped: terminate, then kill after 10 s."""
    port, token = free_port(), "compkit-test-token"
    home = root / ".jupyter-test"
    config = home / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "jupyter_server_config.py").write_text(
        "c.LabApp.news_url = None\n"
        "c.LabApp.check_for_updates_class = 'jupyterlab.NeverCheckForUpdate'\n"
        "c.LabApp.extension_manager = 'readonly'\n"
        "c.ServerApp.shutdown_no_activity_timeout = 600\n"
    )
    settings = home / "settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True, exist_ok=True)
    (
        settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    ).write_text('{"fetchNews": "false", "checkForUpdates": false}')
    # every cell in the DOM (JupyterLab 4 detaches cells outside the viewport by default)
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True, exist_ok=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        '{"windowingMode": "none"}'
    )
    child_env = {
        **os.environ,
        **(env or {}),
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
    }
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={root}",
            "--allow-root",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=child_env,
        cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise AssertionError(
                    f"jupyter lab exited: {(home / 'server.log').read_text()[-3000:]}"
                )
            try:
                if httpx.get(f"{url}/api/status?token={token}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"jupyter lab did not answer within {timeout}s")
            time.sleep(0.3)
        yield Lab(url, token, root)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()
        shutil.rmtree(home / "runtime", ignore_errors=True)
