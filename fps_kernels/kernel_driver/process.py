"""A kernel running as a local subprocess in its own process group."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import deque
from collections.abc import Sequence
from typing import Protocol

logger = logging.getLogger(__name__)

_LIKELY_CAUSES = {
    signal.SIGKILL: "likely out of memory",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGABRT: "an abort in native code",
}


def describe_exit(returncode: int) -> str:
    """Why a process ended, in words an operator understands."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
        except ValueError:
            return f"killed by signal {-returncode}"
        cause = _LIKELY_CAUSES.get(sig)
        return f"killed by {sig.name}" + (f", {cause}" if cause else "")
    return f"exited with code {returncode}"


class ProcessHandle(Protocol):
    """What the server uses of a kernel's process, however it was started (KernelProcess
    here; persist's LaunchedProcess and AdoptedProcess for kernels that outlive the server)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def recent_output(self) -> deque[str]: ...

    def is_alive(self) -> bool: ...

    async def wait(self) -> int: ...

    def signal_group(self, sig: int) -> None: ...

    async def terminate(self, term_wait: float, kill_wait: float = 5.0) -> int | None: ...


class KernelProcess:
    """Starts, signals and reaps one kernel process; its output goes to the server log."""

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: str | None = None,
        capture_output: bool = True,
        log_name: str = "kernel",
    ) -> None:
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.capture_output = capture_output
        self.log_name = log_name
        self.recent_output: deque[str] = deque(maxlen=20)
        self._process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process else None

    async def start(self) -> None:
        pipe = asyncio.subprocess.PIPE if self.capture_output else None
        self._process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=pipe,
            stderr=pipe,
            cwd=self.cwd,
            env=self.env,
            # Its own process group, so that signals reach the kernel and its children,
            # and a Ctrl-C in the server's terminal does not interrupt every kernel.
            start_new_session=True,
        )
        if self.capture_output:
            for stream in (self._process.stdout, self._process.stderr):
                if stream is not None:
                    self._readers.append(asyncio.create_task(self._log_lines(stream)))

    async def _log_lines(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                # A line longer than the stream limit: asyncio drops it; say so, keep reading.
                logger.info("[%s] (an output line too long to log was skipped)", self.log_name)
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            self.recent_output.append(text)
            logger.info("[%s] %s", self.log_name, text)

    async def wait(self) -> int:
        assert self._process is not None, "the kernel process was not started"
        returncode = await self._process.wait()
        # Collect the tail of its output, so a failed start can say why.
        if self._readers:
            await asyncio.wait(self._readers, timeout=1)
        return returncode

    def is_alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def signal_group(self, sig: int) -> None:
        """Signal the kernel's whole process group (the kernel and whatever it started)."""
        if not self.is_alive() or self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            # The group leader may be gone while a child holds the group: signal the leader.
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    async def terminate(self, term_wait: float, kill_wait: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL, to the process group; returns the exit code once reaped."""
        if self._process is None:
            return None
        await end_process_group(self, self._process.pid, term_wait, kill_wait, self.log_name)
        returncode = await self.wait() if not self.is_alive() else None
        for reader in self._readers:
            reader.cancel()
        self._readers.clear()
        return returncode


class GroupLeader(Protocol):
    """A kernel process in a session of its own, whatever started it."""

    def is_alive(self) -> bool: ...

    def signal_group(self, sig: int) -> None: ...

    async def wait(self) -> int: ...


async def end_process_group(
    process: GroupLeader, pid: int, term_wait: float, kill_wait: float, name: str
) -> None:
    """SIGTERM, then SIGKILL, to the group of `process` (its pid), waiting for it after each;
    then SIGKILL to what is left of its group, so that nothing it started is left behind."""
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        if not process.is_alive():
            break
        process.signal_group(sig)
        try:
            await asyncio.wait_for(process.wait(), wait)
        except asyncio.TimeoutError:
            logger.warning("%s did not exit within %ss of %s", name, wait, sig.name)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop_watching_fd(fd: int | None) -> None:
    """Close a pidfd, and stop the running loop's watch on it if there is one."""
    if fd is None:
        return
    try:
        asyncio.get_running_loop().remove_reader(fd)
    except RuntimeError:
        pass  # no running loop: nothing watches it
    os.close(fd)
