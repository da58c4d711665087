"""Helpers for the end-to-end browser test (tests/test_browser.py).

A JupyterLab server (jupyverse by default, or the reference jupyter_server
for comparison) runs as a subprocess in its own temporary root directory,
and Debian's chromium is driven through Playwright's sync API.

Environment variables:

* ``FPS_BROWSER_SERVER``: ``jupyverse`` (default) or ``jupyter-server``.
* ``FPS_SKIP_BROWSER=1``: skip the browser test when chromium is missing
  (otherwise a missing chromium is a test failure, not a silent skip).
* ``FPS_CHROMIUM``: path to the chromium executable (default
  ``/usr/bin/chromium``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("FPS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
SERVER_KINDS = ("jupyverse", "jupyter-server")
SERVER_START_TIMEOUT = 60.0
SERVER_STOP_TIMEOUT = 10.0
LOG_TAIL_CHARS = 6000


def server_kind() -> str:
    kind = os.environ.get("FPS_BROWSER_SERVER", "jupyverse")
    if kind not in SERVER_KINDS:
        pytest.fail(f"FPS_BROWSER_SERVER={kind!r}; expected one of {SERVER_KINDS}")
    return kind


def require_chromium() -> Path:
    """Return chromium's path; fail (or skip on FPS_SKIP_BROWSER=1) if missing."""
    if CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    message = (
        f"chromium not found at {CHROMIUM}: install Debian's package "
        "(apt-get install -y chromium) or set FPS_SKIP_BROWSER=1 to skip"
    )
    if os.environ.get("FPS_SKIP_BROWSER") == "1":
        pytest.skip(message)
    pytest.fail(message)


def free_port() -> int:
    # The port is released before the server binds it; the race is acceptable
    # for a test running on a local machine.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bin_dir() -> Path:
    # The console scripts live next to the interpreter running pytest.
    return Path(sys.executable).parent


def server_command(kind: str, port: int, root: Path, options: Sequence[str] = ()) -> list[str]:
    if kind == "jupyverse":
        # The `jupyverse` command's configuration, with a start timeout fit for a busy machine.
        command = [sys.executable, str(Path(__file__).parent / "support" / "jupyverse_cli.py")]
        command += ["--port", str(port), "--host", "127.0.0.1"]
        # `options`: jupyverse --set values, e.g. "kernels.gateway.url=http://…"
        return command + [arg for option in options for arg in ("--set", option)]
    command = [
        str(bin_dir() / "jupyter-lab"),
        "--no-browser",
        f"--port={port}",
        "--ip=127.0.0.1",
        # Empty token and password: no login page, like jupyverse + fps-noauth.
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        f"--ServerApp.root_dir={root}",
        # Without these, a port clash would silently move to another port.
        "--ServerApp.port_retries=0",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # jupyter_server refuses to start as root otherwise (containers, CI).
        command.append("--allow-root")
    return command


def server_env(state_dir: Path) -> dict[str, str]:
    """Environment isolating the server from the user's Jupyter state.

    Persisted workspaces or settings would reopen old notebooks or change the
    UI under the test.  PATH is inherited on purpose: the server must find the
    kernel's interpreter the way it does for a real user.
    """
    env = dict(os.environ)
    for name, sub in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"),
        ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"),
    ):
        path = state_dir / sub
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text[-chars:]


@dataclass
class Server:
    kind: str
    base_url: str
    root: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    command: list[str] = field(default_factory=list)

    def log_tail(self) -> str:
        return tail(self.log_path)


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_until_ready(server: Server, timeout: float = SERVER_START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    url = server.base_url + "/lab"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"{server.kind} exited with code {server.process.returncode} before "
                f"answering {url}\ncommand: {server.command}\n"
                f"--- server log ---\n{server.log_tail()}"
            )
        if _answers_http(url):
            return
        time.sleep(0.25)
    pytest.fail(
        f"{server.kind} did not answer {url} within {timeout:.0f}s\n"
        f"command: {server.command}\n--- server log ---\n{server.log_tail()}"
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server by pid, then SIGKILL if it does not exit in time."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=SERVER_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=SERVER_STOP_TIMEOUT)


def run_server(tmp_dir: Path, options: Sequence[str] = ()) -> Iterator[Server]:
    """Start the selected server in ``tmp_dir/root``; yield it; stop it.

    ``options`` are jupyverse ``--set`` values (jupyverse only).
    """
    kind = server_kind()
    root = tmp_dir / "root"
    root.mkdir()
    log_path = tmp_dir / "server.log"
    port = free_port()
    command = server_command(kind, port, root, options)
    if not Path(command[0]).is_file():
        pytest.fail(f"server executable not found: {command[0]}")
    with log_path.open("wb") as log:
        # A log file instead of a pipe: nobody reads a pipe while the test
        # runs, and a full pipe would block the server.
        process = subprocess.Popen(
            command,
            cwd=root,
            env=server_env(tmp_dir / "state"),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(kind, f"http://127.0.0.1:{port}", root, log_path, process, command)
    try:
        wait_until_ready(server)
        yield server
    finally:
        stop_process(process)
