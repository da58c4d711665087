"""A kernel running as a local subprocess in its own process group."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import deque
from collections.abc import Sequence

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
        for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
            if not self.is_alive():
                break
            self.signal_group(sig)
            try:
                await asyncio.wait_for(self._process.wait(), wait)
            except asyncio.TimeoutError:
                logger.warning("%s did not exit within %ss of %s", self.log_name, wait, sig.name)
        returncode = await self.wait() if not self.is_alive() else None
        # Anything the kernel started in its group goes too, so nothing is left behind.
        if self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for reader in self._readers:
            reader.cancel()
        self._readers.clear()
        return returncode
