"""A real Jupyter Kernel Gateway for the tests, on a free 127.0.0.1 port with a token."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from .conftest import free_port
from .support.processes import processes_with

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class KernelGateway:
    """`python -m kernel_gateway` as a subprocess, stopped by its pid (SIGTERM, then SIGKILL:
    KG 3.0.1 can hang on SIGTERM)."""

    def __init__(self, home: Path, port: int | None = None, token: str | None = None) -> None:
        self.home = home
        self.port = port or free_port()
        self.token = token or uuid.uuid4().hex
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime_dir = home / "runtime"
        self.log_path = home / "gateway.log"
        for sub in ("runtime", "config", "data", "ipython"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def start(self, extra_args: tuple[str, ...] = ()) -> None:
        env = dict(os.environ)
        env.update(
            KG_AUTH_TOKEN=self.token,
            JUPYTER_RUNTIME_DIR=str(self.runtime_dir),
            JUPYTER_CONFIG_DIR=str(self.home / "config"),
            JUPYTER_DATA_DIR=str(self.home / "data"),
            IPYTHONDIR=str(self.home / "ipython"),
        )
        command = [
            sys.executable,
            "-m",
            "kernel_gateway",
            "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={self.port}",
            "--KernelGatewayApp.port_retries=0",
            "--JupyterWebsocketPersonality.list_kernels=True",
            *extra_args,
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kernel gateway exited at start:\n{self.read_log()}")
            try:
                if httpx.get(f"{self.url}/api", headers=self.headers, timeout=2).is_success:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"kernel gateway did not answer in time:\n{self.read_log()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)
        for pid in self.kernel_pids():  # left behind by a SIGKILL
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def pause(self) -> None:
        """SIGSTOP: it keeps its port and accepts connections, and answers nothing."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def kernel_pids(self) -> list[int]:
        """The kernels this gateway started that are still running."""
        return processes_with(b"ipykernel_launcher", str(self.runtime_dir).encode())

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kernels(self) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/kernels", headers=self.headers, timeout=10)
        response.raise_for_status()
        return list(response.json())

    def start_kernel(self, name: str = "python3") -> str:
        response = httpx.post(
            f"{self.url}/api/kernels", json={"name": name}, headers=self.headers, timeout=30
        )
        response.raise_for_status()
        return str(response.json()["id"])

    def config(self, **options: Any) -> dict[str, Any]:
        """The plugin's `gateway` options for this gateway."""
        return {"url": self.url, "auth_token": self.token, **options}


class _Listener:
    """A TCP listener on a free 127.0.0.1 port, in a thread of its own with its own event
    loop; subclasses say what it does with each connection (`_serve`)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self._thread.start()
        self._call(self._listen())

    def stop(self) -> None:
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class TcpProxy(_Listener):
    """A TCP relay to 127.0.0.1:`target_port`, in a thread of its own, whose connections the
    test can cut (a network failure between jupyverse and the gateway)."""

    def __init__(self, target_port: int) -> None:
        super().__init__()
        self.target_port = target_port

    def cut(self, down_for: float) -> None:
        """Drop every connection, and refuse new ones for `down_for` seconds."""
        self._call(self._close())
        time.sleep(down_for)
        self._call(self._listen())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update((writer, up_writer))


class HungGateway(_Listener):
    """A TCP listener, in a thread of its own, that accepts connections and never answers
    (what a gateway stuck in a blocking call looks like)."""

    def __init__(self) -> None:
        super().__init__()
        self.accepted = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            while await reader.read(1 << 16):
                pass  # read and drop the request; never answer
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
