"""This project's jupyverse, run as its own process on a free 127.0.0.1 port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc/<pid>/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def kernel_pids(runtime_dir: Path) -> list[int]:
    """ipykernel processes whose connection file lies in `runtime_dir` (i.e. ours)."""
    marker = str(runtime_dir).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended while we looked
        if any(b"ipykernel" in arg for arg in argv) and any(marker in arg for arg in argv):
            pids.append(int(proc.name))
    return pids


def _config(port: int) -> dict[str, Any]:
    return {
        "component": {
            "type": "jupyverse",
            "host": "127.0.0.1",
            "port": port,
            "components": {
                "app": {"type": "app"},
                "auth": {"type": "fps_noauth.main:NoAuthComponent"},
                "frontend": {"type": "frontend"},
                "kernels": {"type": "kernels"},
            },
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


class ServerProcess:
    """A server run as its own process on a free 127.0.0.1 port, stopped by its pid; its
    kernels' connection files go to its own runtime dir. Subclasses say how to run it."""

    name = "server"

    def __init__(self, home: Path, prefix: str = "server") -> None:
        self.home = home
        self.runtime_dir = home / f"{prefix}-runtime"
        self.cwd = home / f"{prefix}-root"
        self.log_path = home / f"{prefix}.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.process.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60) -> None:
        for path in (self.runtime_dir, self.cwd):
            path.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(self.runtime_dir), JUPYTER_PLATFORM_DIRS="1")
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(), cwd=self.cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_until_up(timeout)

    def _wait_until_up(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start:\n{self.log_tail()}")
            try:
                httpx.get(f"{self.url}/api/kernelspecs", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer within {timeout:g} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (the server then stops its kernels), wait, SIGKILL if it hangs."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self._log is not None:
            self._log.close()
        return process.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_problems(self) -> list[str]:
        """The server's WARNING/ERROR lines and tracebacks, for the end of the report."""
        # by the record's level only: kernels' own stderr is logged at INFO and often says WARNING
        problem = re.compile(r"^\[\S+ \S+ (WARNING|ERROR|CRITICAL) |^Traceback")
        return [line for line in self.log_text().splitlines() if problem.match(line)]


class JupyverseProcess(ServerProcess):
    """This project's jupyverse: `asphalt run config.yaml` in `home`."""

    name = "jupyverse"

    def command(self) -> list[str]:
        config_file = self.home / "config.yaml"
        config_file.write_text(yaml.safe_dump(_config(self.port)))
        return [str(Path(sys.executable).parent / "asphalt"), "run", str(config_file)]


def kill_leftovers(runtime_dirs: list[Path]) -> list[int]:
    """SIGKILL any kernel we started that is still alive; returns their pids."""
    killed = []
    for runtime_dir in runtime_dirs:
        for pid in kernel_pids(runtime_dir):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass  # it exited meanwhile, which is what we wanted
    return killed
