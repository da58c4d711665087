"""A kernel process launched to outlive the server (kernels.persist).

Not an asyncio subprocess: asyncio's subprocess transport kills its child when it is closed
or garbage-collected (the loop's close at the server's exit does it). A plain Popen leaves
the kernel alone whatever happens to the server; a pidfd tells when it ends, without polling
and without a child watcher, and the Popen reaps it for its exit status. Its stdout and stderr
go to its log file (logs.py): a pipe to the server loses what is written once the server is
gone, and blocks the kernel once 64 KiB are left unread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from ..kernel_driver.process import end_process_group, stop_watching_fd
from .logs import open_kernel_log, tail_lines

logger = logging.getLogger(__name__)

_POLL = 0.5  # seconds, only where pidfds are missing


class LaunchedProcess:
    """Starts, signals and reaps one kernel process that may outlive the server, with the
    interface of KernelProcess; `close()` forgets it without touching it."""

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        log_path: Path,
        cwd: str | None = None,
        log_name: str = "kernel",
    ) -> None:
        self.argv = list(argv)
        # ipykernel's parent poller ends the kernel about a second after the server goes.
        self.env = {k: v for k, v in env.items() if k != "JPY_PARENT_PID"}
        self.log_path = log_path
        self.cwd = cwd
        self.log_name = log_name
        self._popen: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._exited: asyncio.Future[int] | None = None

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode if self._popen is not None else None

    @property
    def recent_output(self) -> deque[str]:
        """The tail of the kernel's log file."""
        return deque(tail_lines(self.log_path), maxlen=20)

    async def start(self) -> None:
        log = open_kernel_log(self.log_path)
        try:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.cwd,
                env=self.env,
                # Its own session: signals to the server's group never reach it.
                start_new_session=True,
            )
        finally:
            os.close(log)
        try:
            self._pidfd = os.pidfd_open(self._popen.pid)
        except OSError:
            self._pidfd = None  # no pidfd on this system: wait() polls

    def is_alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    async def wait(self) -> int:
        assert self._popen is not None, "the kernel process was not started"
        returncode = self._popen.poll()
        if returncode is not None:
            self._close_pidfd()
            return returncode
        loop = asyncio.get_running_loop()
        if self._exited is None or self._exited.done():
            self._exited = loop.create_future()
            if self._pidfd is not None:
                # Readable once the process has ended.
                loop.add_reader(self._pidfd, self._reap)
            else:
                loop.create_task(self._poll())
        return await asyncio.shield(self._exited)

    def _reap(self) -> None:
        if self._popen is None or self._popen.poll() is None:
            return
        self._close_pidfd()
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(self._popen.returncode)

    async def _poll(self) -> None:
        while self.is_alive():
            await asyncio.sleep(_POLL)
        self._reap()

    def _close_pidfd(self) -> None:
        stop_watching_fd(self._pidfd)
        self._pidfd = None

    def signal_group(self, sig: int) -> None:
        """Signal the kernel's whole process group (the kernel and whatever it started)."""
        pid = self.pid
        if not self.is_alive() or pid is None:
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            try:
                self._popen.send_signal(sig)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass

    async def terminate(self, term_wait: float, kill_wait: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL, to the process group; the exit code once reaped."""
        if self._popen is None:
            return None
        await end_process_group(self, self._popen.pid, term_wait, kill_wait, self.log_name)
        return self._popen.poll()

    def close(self) -> None:
        """Forget the process without touching it: the server stops, the kernel stays (the
        process is reparented when the server exits)."""
        self._close_pidfd()
        if self._exited is not None and not self._exited.done():
            self._exited.cancel()
