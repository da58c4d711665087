"""Kernels that outlive the server (`kernels.persist`): the registry's side.

With persist on, this server takes the lock of the runtime dir (persist/lock.py), takes back
the kernels the record of an earlier server names (same kernel and session ids), keeps the
record (persist/record.py) up to date at every change of its kernels and sessions, and at its
stop lets its kernels go instead of shutting them down. A second server on the same runtime
dir while the first runs gets no lock: it is read-only for persistence (it adopts nothing,
writes no record, and its own kernels do not outlive it).

With persist off, a record left by a persist run is honoured the other way: every kernel it
holds that still runs is shut down, and the files go.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from .config import KernelsPluginConfig
from .kernel_driver.kernelspec import KernelSpec
from .kernel_driver.paths import runtime_dir
from .kernel_server.registry import KernelEntry
from .kernel_server.server import KernelServer
from .persist.liveness import AdoptedProcess
from .persist.lock import StateLock, acquire
from .persist.record import (
    KernelRecord,
    RecordError,
    RecordWriter,
    RunningCell,
    ServerRecord,
    read_record,
    record_path,
    remove_record,
    this_writer,
)
from .persist.takeback import forget_kernel, remove_kernel_files, sort_kernels
from .providers.base import KernelProvider
from .records import SessionRecord
from .registry import Registry

logger = logging.getLogger(__name__)

#: Seconds a kernel has to end after SIGKILL, at start (jupyverse bounds a start's time).
KILL_WAIT = 2.0

#: The providers whose kernels are local processes of a kernelspec (those that persist).
LOCAL_PROVIDERS = ("spec", "pyimport")

#: The server-side executions in flight on a kernel (ServerSideExecution.running_cells).
RunningCells = Callable[[str], tuple[RunningCell, ...]]


class KernelPersistence:
    """The record of this server's kernels and sessions, and their take-back at start."""

    def __init__(
        self, registry: Registry, config: KernelsPluginConfig, directory: Path | None = None
    ) -> None:
        self._registry = registry
        self._config = config
        self._directory = directory
        self._lock: StateLock | None = None
        self._writer: RecordWriter | None = None
        self._last: tuple[tuple[KernelRecord, ...], tuple[SessionRecord, ...]] | None = None
        self._scheduled = False
        self._frozen = False
        self._watched: weakref.WeakSet[KernelServer] = weakref.WeakSet()
        #: Set by the server-side execution, when there is one.
        self.running_cells: RunningCells | None = None
        #: The server-side cells that were running when the earlier server stopped, by kernel.
        self.resumed: dict[str, tuple[RunningCell, ...]] = {}
        #: Those of kernels that did not outlive it, and why.
        self.gone: list[tuple[RunningCell, str]] = []

    @property
    def directory(self) -> Path:
        return self._directory if self._directory is not None else runtime_dir()

    @property
    def active(self) -> bool:
        """Whether this server holds the kernels of its runtime dir (persist on, lock held)."""
        return self._writer is not None

    def kept_connection_files(self) -> list[str]:
        """The connection files of the kernels taken back (not stale: their kernels run)."""
        return [
            entry.server.connection_file_path
            for entry in self._registry.kernels.values()
            if isinstance(entry.server, KernelServer) and self._persisted(entry)
        ]

    # --- start -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Before the providers start: with persist on, take the lock, take back the kernels
        of the record and write it anew; with persist off, shut down what a record holds."""
        if not self._config.persist:
            await self._clean_up()
            return
        lock = self._acquire()
        if lock is None:
            # Its kernels must not outlive it: they would be nobody's (no record names them).
            self._config.persist = False
            return
        self._lock = lock
        self._writer = RecordWriter(record_path(self.directory))
        record = self._read()
        if record is not None:
            await self._take_back(record)
        self._registry.on_change = self.changed
        self.changed()

    def _acquire(self) -> StateLock | None:
        try:
            return acquire(self.directory)
        except OSError as error:
            logger.error(
                "Cannot take the lock of %s (%s): kernels will not outlive this server",
                self.directory,
                error,
            )
            return None

    def _read(self) -> ServerRecord | None:
        path = record_path(self.directory)
        try:
            record, _problems = read_record(path, self.directory)  # each problem logged
        except FileNotFoundError:
            return None
        except (RecordError, OSError) as error:
            aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
            try:
                path.rename(aside)
            except OSError:
                aside = path
            logger.error(
                "The kernels record %s is refused (%s): no kernel taken back; kept as %s",
                path,
                error,
                aside.name,
            )
            return None
        return record

    async def _take_back(self, record: ServerRecord) -> None:
        found = sort_kernels(record.kernels, self.directory)
        for kernel in found.dead:
            forget_kernel(kernel, self.directory)
            self.gone += [(cell, "it ended while no server ran") for cell in kernel.running]
        taken: set[str] = set()
        for kernel, process in found.alive:
            if kernel.kernel_id in self._registry.kernels:
                logger.warning("Kernel %s is served already: not taken back", kernel.kernel_id)
                process.close()
                continue
            if await self._adopt(kernel, process):
                taken.add(kernel.kernel_id)
                if kernel.running:
                    self.resumed[kernel.kernel_id] = kernel.running
            else:
                self.gone += [(cell, "it could not be taken back") for cell in kernel.running]
        for session in record.sessions:
            if session.kernel_id in taken:
                self._registry.sessions[session.id] = session
            else:
                logger.info(
                    "Session %s (%s) is removed: its kernel %s ended while no server ran",
                    session.id,
                    session.path,
                    session.kernel_id,
                )
        if record.kernels:
            logger.info(
                "Took back %d kernel(s) and %d session(s) left by server pid %d; %d ended",
                len(taken),
                len(self._registry.sessions),
                record.written_by.pid,
                len(record.kernels) - len(taken),
            )

    async def _adopt(self, kernel: KernelRecord, process: AdoptedProcess) -> bool:
        """Serve the kernel again under its id; a kernel that cannot be reached (its
        connection file gone or bad) is shut down, as no server could ever reach it."""
        provider, spec = await self._origin(kernel.kernel_name)
        try:
            server = KernelServer.adopting(
                kernel,
                process,
                spec,
                settings=self._config.server_settings(),
                ports=self._registry.kernels.ports,
            )
            await server.take_back()
        except Exception as error:
            logger.error(
                "Kernel %s (pid %d) cannot be taken back (%s): shut down",
                kernel.kernel_id,
                kernel.pid,
                error,
            )
            await process.terminate(self._config.shutdown_wait, KILL_WAIT)
            remove_kernel_files(kernel, self.directory)
            return False
        self._registry.kernels[kernel.kernel_id] = KernelEntry(
            server, kernel.kernel_name, provider=provider, owned=True
        )
        logger.info(
            "Kernel %s (%s, pid %d) taken back", kernel.kernel_id, kernel.kernel_name, kernel.pid
        )
        return True

    async def _origin(self, kernel_name: str) -> tuple[KernelProvider | None, KernelSpec | None]:
        """The local provider listing `kernel_name` and its kernelspec (to restart the kernel
        from); none when it is gone meanwhile (the kernel is served, but not restarted)."""
        first: KernelProvider | None = None
        for provider in self._registry.providers:
            if provider.name not in LOCAL_PROVIDERS:
                continue
            first = first or provider
            try:
                types = await provider.kernelspecs()
            except Exception:
                logger.exception("Kernel provider %r could not list its kernels", provider.name)
                continue
            kernel_type = types.get(kernel_name) or types.get(kernel_name.lower())
            if kernel_type is not None:
                return provider, kernel_type.kernelspec
        logger.warning(
            "Kernel type %r is not installed any more: its kernels are served, not restarted",
            kernel_name,
        )
        return first, None

    async def _clean_up(self) -> None:
        """persist off: shut down the kernels a persist run left, remove their files and
        the record, unless a live server holds them."""
        path = record_path(self.directory)
        if not path.exists():
            return
        lock = self._acquire()
        if lock is None:
            return
        try:
            try:
                record, _problems = read_record(path, self.directory)
            except FileNotFoundError:
                return
            except (RecordError, OSError) as error:
                logger.error("The kernels record %s is refused (%s): removed", path, error)
                remove_record(path)
                return
            found = sort_kernels(record.kernels, self.directory)
            for kernel in found.dead:
                forget_kernel(kernel, self.directory)
            await asyncio.gather(*(self._shut_down(k, p) for k, p in found.alive))
            remove_record(path)
        finally:
            lock.release()

    async def _shut_down(self, kernel: KernelRecord, process: AdoptedProcess) -> None:
        logger.info(
            "Kernel %s (pid %d), left running by a server with kernels.persist on: shut down "
            "(kernels.persist is off)",
            kernel.kernel_id,
            kernel.pid,
        )
        await process.terminate(self._config.shutdown_wait, KILL_WAIT)
        remove_kernel_files(kernel, self.directory)

    # --- the record ------------------------------------------------------------------------

    def changed(self) -> None:
        """Something the record holds may have changed: write it, once per loop turn, if it
        did (never per message)."""
        if self._writer is None or self._frozen or self._scheduled:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._write_if_changed)

    def _write_if_changed(self) -> None:
        self._scheduled = False
        if self._writer is None or self._frozen:
            return
        self._update(self._snapshot())

    def _update(self, record: ServerRecord) -> None:
        assert self._writer is not None
        state = (record.kernels, record.sessions)
        if state != self._last:
            self._last = state
            self._writer.update(record)

    def _persisted(self, entry: KernelEntry) -> bool:
        server = entry.server
        return (
            entry.owned
            and isinstance(server, KernelServer)
            and server.settings.persist
            and server.owns_process
        )

    def _snapshot(self) -> ServerRecord:
        kernels: list[KernelRecord] = []
        for kernel_id, entry in list(self._registry.kernels.items()):
            server = entry.server
            if not isinstance(server, KernelServer) or not self._persisted(entry):
                continue
            self._watch(server)
            identity = server.process_identity()
            if identity is None:
                continue  # no process (dead, or between two of a restart)
            pid, pid_start = identity
            kernels.append(
                KernelRecord(
                    kernel_id=kernel_id,
                    kernel_name=entry.name or server.kernel_name,
                    connection_file=server.connection_file_path,
                    cwd=server.kernel_cwd,
                    pid=pid,
                    pid_start=pid_start,
                    shell_identity=server.zmq_identity.hex(),
                    clients=server.client_ids(),
                    running=self.running_cells(kernel_id) if self.running_cells else (),
                    keeper_socket=server.keeper_socket,
                )
            )
        known = {kernel.kernel_id for kernel in kernels}
        sessions = tuple(s for s in self._registry.sessions.values() if s.kernel_id in known)
        return ServerRecord(tuple(kernels), sessions, this_writer())

    def _watch(self, server: KernelServer) -> None:
        """Follow what the registry does not see: a new process after a restart, a keeper
        started, clients coming and going."""
        if server in self._watched:
            return
        self._watched.add(server)
        server.activity.listeners.append(lambda _state, _reason: self.changed())
        server.clients_changed = self.changed

    # --- stop ------------------------------------------------------------------------------

    def freeze(self) -> set[str]:
        """At the server's stop, before anything is stopped: write the last record and give
        the ids of the kernels to let go (left running) rather than shut down."""
        if self._writer is None:
            return set()
        record = self._snapshot()
        self._frozen = True
        self._update(record)
        return {kernel.kernel_id for kernel in record.kernels}

    def last_running(self, running: dict[str, tuple[RunningCell, ...]]) -> None:
        """The cells in flight as the drivers left them (after `freeze`): into the record."""
        if self._writer is None or self._last is None or not running:
            return
        kernels = tuple(
            replace(kernel, running=running.get(kernel.kernel_id, kernel.running))
            for kernel in self._last[0]
        )
        self._last = (kernels, self._last[1])
        self._writer.update(ServerRecord(kernels, self._last[1], this_writer()))

    async def close(self) -> None:
        """Once the kernels are let go: the record on disk, the lock given up."""
        if self._writer is not None:
            await self._writer.flush()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
