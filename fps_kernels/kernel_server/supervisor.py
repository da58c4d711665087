"""KernelSupervisor: a launched kernel's process, from its launch to its end.

It launches the process, watches it, restarts it when it dies on its own (up to
restart_limit deaths in a row right after a start, backing off between them), and stops it:
shutdown_request, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..kernel_driver.connection import ConnectionInfo, write_connection_file
from ..kernel_driver.kernelspec import KernelSpec, environment_for_kernel
from ..kernel_driver.process import KernelProcess, ProcessHandle, describe_exit
from ..kernel_driver.tasks import BackgroundTasks
from ..persist.launched import LaunchedProcess
from ..persist.logs import kernel_log_path
from .activity import ExecutionState
from .settings import ServerSettings

logger = logging.getLogger(__name__)

#: Tells the clients what happened to the kernel: (notice text, new state, reason).
DeathNotice = Callable[[str, ExecutionState, str], None]


class KernelStartError(RuntimeError):
    """The kernel did not come up: it could not be launched, exited, or never answered."""


class KernelSupervisor:
    """The process of one kernel launched from `spec`, with its connection file (or adopted:
    started by an earlier server; `spec`, when known, launches it again)."""

    def __init__(
        self,
        spec: KernelSpec | None,
        settings: ServerSettings,
        *,
        kernel_id: str,
        cwd: str,
        session_name: str | None,
        connection_file: str,
        connection_info: ConnectionInfo,
        write_file: bool,
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.kernel_id = kernel_id
        self.cwd = cwd
        self.session_name = session_name
        self.connection_file = connection_file
        self.connection_info = connection_info
        self.write_file = write_file
        self.process: ProcessHandle | None = None
        self._unstable_deaths = 0  # deaths right after a start, in a row
        self._ready_at = 0.0
        self._did_work = False  # ran a cell to its end since its last start
        self._tasks = BackgroundTasks(f"Kernel {kernel_id}")
        self._watcher: asyncio.Task[None] | None = None

    def cell_ran(self) -> None:
        """A cell ran to its end (whoever asked): the kernel is past its start."""
        self._did_work = True

    def ready(self) -> None:
        self._ready_at = asyncio.get_running_loop().time()

    def reset_deaths(self) -> None:
        self._unstable_deaths = 0

    def output_tail(self) -> str:
        if self.process is None or not self.process.recent_output:
            return ""
        return ": " + " | ".join(list(self.process.recent_output)[-5:])

    async def launch(self) -> None:
        if self.spec is None:
            # An adopted kernel whose kernelspec is gone: it cannot be launched again.
            raise KernelStartError(f"Kernel {self.kernel_id}: its kernelspec is gone")
        if self.write_file and not Path(self.connection_file).exists():
            # Removed when its first start failed: a restart launches it again.
            write_connection_file(self.connection_file, self.connection_info)
        argv = self.spec.command(os.path.realpath(self.connection_file))
        env = environment_for_kernel(self.spec, self.session_name)
        log_name = f"kernel {self.kernel_id[:8]}"
        process: KernelProcess | LaunchedProcess
        if self.settings.persist:
            process = LaunchedProcess(
                argv, env, self.log_path, cwd=self.cwd or None, log_name=log_name
            )
        else:
            process = KernelProcess(
                argv,
                env=env,
                cwd=self.cwd or None,
                capture_output=self.settings.capture_kernel_output,
                log_name=log_name,
            )
        try:
            await process.start()
        except OSError as error:
            raise KernelStartError(
                f"Could not launch kernel {self.spec.name!r} ({argv[0]}): {error}"
            ) from None
        logger.info(
            "Started kernel %s (%s), pid %s, in %s",
            self.kernel_id,
            self.spec.name,
            process.pid,
            self.cwd or os.getcwd(),
        )
        self.process = process
        self._did_work = False

    @property
    def log_path(self) -> Path:
        """Where a kernel that outlives the server writes its output (persist only)."""
        return kernel_log_path(self.kernel_id)

    @property
    def process_pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def adopt(self, process: ProcessHandle) -> None:
        """Take over a kernel process an earlier server started (persist)."""
        self.process = process
        self._did_work = False

    def let_go(self) -> None:
        """Forget the process without signalling it: the server stops, the kernel stays."""
        process, self.process = self.process, None
        close = getattr(process, "close", None)
        if close is not None:
            close()

    def interrupt(self) -> None:
        if self.process is not None:
            self.process.signal_group(signal.SIGINT)

    # --- watching --------------------------------------------------------------------------

    def watch(self, wait_ready: Callable[[], Awaitable[None]], tell: DeathNotice) -> None:
        """Watch the process; when it dies on its own, restart it (waiting with
        `wait_ready`) or give up; `tell` says either to the clients."""
        self._watcher = self._tasks.spawn(self._watch(wait_ready, tell), "the kernel watcher")

    async def stop_watching(self) -> None:
        await self._tasks.cancel_all()
        self._watcher = None

    async def _watch(self, wait_ready: Callable[[], Awaitable[None]], tell: DeathNotice) -> None:
        loop = asyncio.get_running_loop()
        while self.process is not None:
            returncode = await self.process.wait()
            cause = f"Kernel {describe_exit(returncode)}"
            stable = (
                self._did_work or loop.time() - self._ready_at >= self.settings.stable_start_time
            )
            self._unstable_deaths = 0 if stable else self._unstable_deaths + 1
            if (
                not self.settings.autorestart
                or self.spec is None
                or self._unstable_deaths >= self.settings.restart_limit
            ):
                why = (
                    "automatic restart is off"
                    if not self.settings.autorestart
                    else "its kernelspec is gone"
                    if self.spec is None
                    else f"it died {self._unstable_deaths} times in a row right after starting"
                )
                logger.error("Kernel %s died and stays dead (%s): %s", self.kernel_id, why, cause)
                await self.terminate()
                tell(f"{cause}; {why}, so it was not restarted.", "dead", cause)
                return
            logger.error("Kernel %s died (%s): restarting it", self.kernel_id, cause)
            tell(f"{cause}; restarting it.", "restarting", cause)
            await self.terminate()
            if self._unstable_deaths > 1:
                # Back off when it keeps failing: whatever kills it may pass.
                await asyncio.sleep(min(0.25 * 2 ** (self._unstable_deaths - 2), 2.0))
            try:
                await self.launch()
                await wait_ready()
            except KernelStartError as error:
                logger.error("Kernel %s did not come back: %s", self.kernel_id, error)
                if self.process is not None and self.process.is_alive():
                    await self.terminate()
                self._ready_at = loop.time()
                continue
            logger.info("Kernel %s restarted after: %s", self.kernel_id, cause)

    # --- stopping --------------------------------------------------------------------------

    async def terminate(self) -> int | None:
        """SIGTERM, then SIGKILL after shutdown_wait; the exit code (None: not reaped)."""
        if self.process is None:
            return None
        return await self.process.terminate(self.settings.shutdown_wait)

    async def stop(self, ask_shutdown: Callable[[], object] | None) -> None:
        """End the process: `ask_shutdown` (a shutdown_request) first if given, then
        terminate() if it is still there after shutdown_wait."""
        process = self.process
        if process is None:
            return
        if process.is_alive() and ask_shutdown is not None:
            ask_shutdown()
            try:
                await asyncio.wait_for(process.wait(), self.settings.shutdown_wait)
            except asyncio.TimeoutError:
                logger.info("Kernel %s ignored shutdown_request: terminating", self.kernel_id)
        returncode = await self.terminate()
        logger.info(
            "Kernel %s %s",
            self.kernel_id,
            describe_exit(returncode) if returncode is not None else "could not be reaped",
        )
