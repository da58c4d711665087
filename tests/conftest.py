"""A real jupyverse app on a free 127.0.0.1 port, with real ipykernel processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import pytest
import yaml

from .support.processes import processes_with

TESTS = Path(__file__).parent

# A kernelspec whose command does not exist: its kernels fail to start.
BAD_ARGV = {"argv": ["/nonexistent/kernel", "{connection_file}"], "display_name": "Bad argv"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kernel_processes(runtime_dir: Path) -> list[int]:
    """Pids of the ipykernel processes whose connection file is in `runtime_dir`."""
    return processes_with(b"ipykernel_launcher", str(runtime_dir).encode())


def kernel_pid(runtime_dir: Path, kernel_id: str) -> int:
    """The pid of the ipykernel process serving `kernel_id`."""
    for pid in kernel_processes(runtime_dir):
        if kernel_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise AssertionError(f"no process for kernel {kernel_id}")


class Service(Protocol):
    def start(self) -> None: ...

    def stop(self) -> object: ...


S = TypeVar("S", bound=Service)


@contextmanager
def running(*services: S) -> Iterator[tuple[S, ...]]:
    """`services` started in order, and stopped, the last first, whatever happens."""
    with ExitStack() as stack:
        for service in services:
            stack.callback(service.stop)
            service.start()
        yield services


def serving(service: S) -> Iterator[S]:
    """A fixture's body for a server (or gateway): started, yielded, stopped."""
    with running(service):
        yield service


@asynccontextmanager
async def started(srv: JupyverseServer) -> AsyncIterator[httpx.AsyncClient]:
    """`srv` started, and an HTTP client of it for the time of the block; stopped after."""
    with running(srv):
        async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=60) as http:
            yield http


def new_kernel(client: httpx.Client, name: str = "python3") -> Iterator[str]:
    """A fixture's body for a fresh kernel: started, its id yielded, shut down after."""
    response = client.post("/api/kernels", json={"name": name})
    assert response.status_code == 201, response.text
    kernel_id = response.json()["id"]
    yield kernel_id
    client.delete(f"/api/kernels/{kernel_id}")


def write_kernelspec(share: Path, name: str, spec: dict[str, Any]) -> Path:
    spec_dir = share / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return spec_dir


class JupyverseServer:
    """Starts jupyverse as its own process and stops it by its process id."""

    def __init__(
        self,
        home: Path,
        kernels: dict[str, Any] | None = None,
        auth: str = "noauth",
        yjs: bool = False,
        extra_components: dict[str, Any] | None = None,
    ) -> None:
        self.home = home
        self.root = home / "root"
        self.runtime_dir = home / "runtime"
        self.share = home / "share"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.log_path = home / "server.log"
        for path in (self.root, self.runtime_dir, self.share):
            path.mkdir(parents=True, exist_ok=True)
        components: dict[str, Any] = {
            "app": {"type": "app"},
            "auth": {"type": "fps_noauth.main:NoAuthComponent"}
            if auth == "noauth"
            else {"type": "tests.support.token_auth:TokenAuthComponent"},
            "frontend": {"type": "frontend"},
            "kernels": {"type": "kernels", **(kernels or {})},
        }
        if yjs:
            components["contents"] = {"type": "contents"}
            components["yjs"] = {"type": "yjs"}
        components.update(extra_components or {})
        self.config = {
            # Asphalt gives the components 10 s to start by default: too little for the whole
            # stack's imports on a loaded 2-core machine.
            "start_timeout": 120,
            "component": {
                "type": "jupyverse",
                "host": "127.0.0.1",
                "port": self.port,
                "components": components,
            },
            "logging": {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {
                    "default": {"format": "[%(asctime)s %(levelname)s %(name)s] %(message)s"}
                },
                "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "default"}},
                "root": {"handlers": ["console"], "level": "INFO"},
            },
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            JUPYTER_RUNTIME_DIR=str(self.runtime_dir),
            JUPYTER_PATH=str(self.share),
            PYTHONPATH=os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")]),
        )
        return env

    def start(self, timeout: float = 60) -> None:
        config_file = self.home / "config.yaml"
        config_file.write_text(yaml.safe_dump(self.config))
        asphalt = Path(sys.executable).parent / "asphalt"
        self.log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(asphalt), "run", str(config_file)],
            cwd=self.root,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyverse exited at start:\n{self.read_log()}")
            try:
                httpx.get(f"{self.url}/api/kernelspecs", timeout=5, headers=self.headers)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"jupyverse did not answer within {timeout}s:\n{self.read_log()}")

    @property
    def headers(self) -> dict[str, str]:
        if self.config["component"]["components"]["auth"]["type"].startswith("fps_noauth"):
            return {}
        return {"Authorization": "token secret"}

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        code = self.process.returncode
        self.process = None
        return code

    def server_tracebacks(self) -> list[str]:
        """Traceback lines logged by the server itself (not kernels' own output, which the
        server passes on to its log as `[kernel …]` lines)."""
        return [
            line
            for line in self.read_log().splitlines()
            if "Traceback" in line and "fps_kernels.kernel_driver.process] [kernel " not in line
        ]

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyverseServer]:
    """The shared server: no auth, default options."""
    home = tmp_path_factory.mktemp("jupyverse")
    srv = JupyverseServer(home)
    write_kernelspec(
        srv.share,
        "broken",
        {"display_name": "broken"},  # no argv: skipped with a log line
    )
    (srv.share / "kernels" / "notjson").mkdir(parents=True)
    (srv.share / "kernels" / "notjson" / "kernel.json").write_text("{not json")
    write_kernelspec(
        srv.share,
        "exits",
        {
            "argv": [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
            "display_name": "Exits",
            "language": "python",
        },
    )
    write_kernelspec(srv.share, "nosuchbinary", BAD_ARGV)
    yield from serving(srv)


@pytest.fixture
def client(server: JupyverseServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def kernel(client: httpx.Client) -> Iterator[str]:
    """A fresh python3 kernel, shut down after the test."""
    yield from new_kernel(client)
