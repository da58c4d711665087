"""Kernel processes that are not our children: those a previous server started.

A pid alone proves nothing (pids are reused), so a recorded kernel is taken back only when the
process with that pid started when the record says, belongs to this user, and runs with the
recorded connection file on its command line. The handle pins the process with a pidfd, so
that a signal never reaches a later process given the same pid.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import deque
from pathlib import Path

from ..kernel_driver.ownership import process_start
from ..kernel_driver.process import end_process_group, stop_watching_fd
from .logs import tail_lines

logger = logging.getLogger(__name__)

# The exit status of a process that is not our child cannot be known (only its parent may
# wait for it): an adopted kernel that ended reports this.
EXIT_STATUS_UNKNOWN = 0


def same_process(pid: int, pid_start: str, connection_file: str) -> bool:
    """Whether `pid` is still the kernel a record describes."""
    if pid <= 1 or not pid_start:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False  # gone, or another user's process
    if process_start(pid) != pid_start:
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    wanted = os.fsencode(connection_file)
    return any(wanted in arg for arg in argv)


class AdoptedProcess:
    """A kernel started by an earlier server, with the interface of KernelProcess the
    server uses: pid, returncode, is_alive(), wait(), signal_group(), terminate(),
    recent_output. Make it with adopt()."""

    def __init__(self, pid: int, pidfd: int | None, log_path: Path | None = None) -> None:
        self._pid = pid
        self._pidfd = pidfd
        self.log_path = log_path
        self._returncode: int | None = None
        self._exited: asyncio.Future[int] | None = None

    @classmethod
    def adopt(
        cls, pid: int, pid_start: str, connection_file: str, log_path: Path | None = None
    ) -> AdoptedProcess | None:
        """The handle of the recorded kernel, None if it is gone or the pid is another's."""
        pidfd: int | None = None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except OSError:
            pidfd = None  # no pidfd on this system: fall back to polling the pid
        # Checked after opening the pidfd: if the pid is still the kernel now, the pidfd
        # refers to the kernel for good.
        if not same_process(pid, pid_start, connection_file):
            if pidfd is not None:
                os.close(pidfd)
            return None
        return cls(pid, pidfd, log_path)

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def recent_output(self) -> deque[str]:
        """The tail of the kernel's log file (empty without one)."""
        lines = tail_lines(self.log_path) if self.log_path is not None else []
        return deque(lines, maxlen=20)

    def is_alive(self) -> bool:
        if self._returncode is not None:
            return False
        if not self._exists():
            self._ended()
            return False
        return True

    def _exists(self) -> bool:
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, 0)
            else:
                os.kill(self._pid, 0)
        except (ProcessLookupError, PermissionError):
            return False  # gone (or, without a pidfd, the pid went to another user)
        # An ended process not yet reaped by its parent still answers: /proc says 'Z'.
        try:
            state = Path(f"/proc/{self._pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")

    def _ended(self) -> None:
        if self._returncode is None:
            self._returncode = EXIT_STATUS_UNKNOWN
        stop_watching_fd(self._pidfd)
        self._pidfd = None
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(self._returncode)

    async def wait(self) -> int:
        """Wait for the process to end; its status is unknown: EXIT_STATUS_UNKNOWN."""
        if not self.is_alive():
            assert self._returncode is not None
            return self._returncode
        loop = asyncio.get_running_loop()
        if self._exited is None:
            self._exited = loop.create_future()
            if self._pidfd is not None:
                # A pidfd becomes readable when the process ends: no polling.
                loop.add_reader(self._pidfd, self._ended)
            else:
                loop.create_task(self._poll())
        return await asyncio.shield(self._exited)

    async def _poll(self) -> None:
        while self.is_alive():
            await asyncio.sleep(1)

    def signal_group(self, sig: int) -> None:
        """Signal the kernel's process group: it was started in a session of its own, so the
        group's id is its pid (the group outlives its leader while a child holds it)."""
        if not self.is_alive():
            return
        try:
            os.killpg(self._pid, sig)
        except (ProcessLookupError, PermissionError):
            self._signal_leader(sig)

    def _signal_leader(self, sig: int) -> None:
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self._pid, sig)
        except ProcessLookupError:
            pass

    async def terminate(self, term_wait: float, kill_wait: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL, to the process group; EXIT_STATUS_UNKNOWN once it ended,
        None if it would not end."""
        await end_process_group(self, self._pid, term_wait, kill_wait, f"Kernel pid {self._pid}")
        return None if self.is_alive() else self._returncode

    def close(self) -> None:
        """Forget the process without touching it (the server stops, the kernel stays)."""
        stop_watching_fd(self._pidfd)
        self._pidfd = None
