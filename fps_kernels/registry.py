"""The kernels and sessions of this server, and what may be done with them.

It takes plain values and answers with the records of `records.py`: HTTP (bodies, JSON,
status codes) is routes.py's business.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import KernelsPluginConfig
from .errors import (
    Conflict,
    KernelFailed,
    KernelNotFound,
    KernelsError,
    KernelspecNotFound,
    SessionNotFound,
)
from .kernel_driver.tasks import BackgroundTasks, run_together
from .kernel_server.activity import utc_now
from .kernel_server.base import ServedKernel
from .kernel_server.registry import KernelEntry, KernelRegistry
from .kernel_server.server import KernelServer
from .launchers import KernelRequest
from .providers.base import KernelProvider, KernelResource, KernelType, valid_kernel_name
from .records import KernelInfo, SessionInfo, SessionRecord

logger = logging.getLogger(__name__)

#: What the clients of a kernel left running at the server's stop are told.
_LET_GO = "The server is stopping; the kernel keeps running and will be served again."


def _nothing() -> None:
    pass


def kernel_cwd(root: Path, path: str | None) -> Path:
    """The directory a kernel for `path` runs in: the deepest existing one, inside `root`."""
    if not path:
        return root
    candidate = (root / path.lstrip("/")).resolve()
    if not candidate.is_relative_to(root):
        return root
    while candidate != root and not candidate.is_dir():
        candidate = candidate.parent
    return candidate


class Registry:
    """Owns the kernel map (upstream's `kernels`) and the sessions that use its kernels."""

    def __init__(
        self,
        config: KernelsPluginConfig,
        kernels: KernelRegistry,
        root_dir: Path,
        providers: Sequence[KernelProvider] = (),
    ) -> None:
        self.config = config
        self.kernels = kernels
        self.providers: list[KernelProvider] = list(providers)
        self.root_dir = root_dir.resolve()
        self._name_clashes: set[tuple[str, str]] = set()
        self.sessions: dict[str, SessionRecord] = {}
        self._path_locks: dict[str, asyncio.Lock] = {}
        self._tasks = BackgroundTasks("Kernel registry")
        #: Called after every change of the kernels or sessions (persistence.py's record).
        self.on_change: Callable[[], None] = _nothing

    def changed(self) -> None:
        """Tell the one who keeps a record (kernels.persist) that something changed."""
        self.on_change()

    # --- lifetime ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background work: culling idle kernels."""
        self._tasks.spawn(self._cull_forever(), "culling idle kernels")

    async def start_providers(self) -> None:
        """Start the providers' background work; one that fails to start is left out."""
        for provider in list(self.providers):
            try:
                await provider.start()
            except Exception:
                logger.exception("Kernel provider %r did not start: left out", provider.name)
                self.providers.remove(provider)

    async def stop(self, timeout: float, let_go: Collection[str] = ()) -> None:
        """Stop the background work, then every kernel (see stop_all), then the providers."""
        await self._tasks.cancel_all()
        for provider in self.providers:
            await self._quietly(provider.stop(), f"stop provider {provider.name!r}")
        await self.stop_all(timeout, let_go)
        for provider in self.providers:
            await self._quietly(provider.close(), f"close provider {provider.name!r}")

    @staticmethod
    async def _quietly(step: Any, what: str) -> None:
        try:
            await step
        except Exception:
            logger.exception("Could not %s", what)

    # --- kernelspecs ---------------------------------------------------------------------

    async def kernel_types(self) -> dict[str, tuple[KernelType, KernelProvider]]:
        """Every kernel type of the providers, by name: the first provider has a name."""
        found: dict[str, tuple[KernelType, KernelProvider]] = {}
        listings = await asyncio.gather(
            *(provider.kernelspecs() for provider in self.providers), return_exceptions=True
        )
        for provider, listing in zip(self.providers, listings, strict=True):
            if isinstance(listing, BaseException):
                logger.error(
                    "Kernel provider %r could not list its kernels",
                    provider.name,
                    exc_info=listing,
                )
                continue
            for name, kernel_type in listing.items():
                if name in found or not valid_kernel_name(name):
                    self._clash(name, provider, found)
                    continue
                found[name] = (kernel_type, provider)
        return found

    def _clash(
        self, name: str, provider: KernelProvider, found: dict[str, tuple[KernelType, Any]]
    ) -> None:
        if (name, provider.name) in self._name_clashes:
            return
        self._name_clashes.add((name, provider.name))
        if name in found:
            logger.warning(
                "Kernel type %r of provider %r is hidden by provider %r's",
                name,
                provider.name,
                found[name][1].name,
            )
        else:
            logger.warning("Kernel type %r of provider %r: not a usable name", name, provider.name)

    async def kernelspecs(self) -> dict[str, KernelType]:
        return {name: kernel_type for name, (kernel_type, _) in (await self.kernel_types()).items()}

    async def kernelspec(self, name: str) -> KernelType:
        types = await self.kernel_types()
        found = types.get(name) or types.get(name.lower())
        if found is None:
            raise self._not_listed(name)
        return found[0]

    async def kernelspec_resource(self, name: str, file_name: str) -> KernelResource:
        types = await self.kernel_types()
        found = types.get(name) or types.get(name.lower())
        if found is None:
            raise self._not_listed(name)
        kernel_type, provider = found
        return await provider.resource(kernel_type, file_name)

    def default_kernel(self, names: Sequence[str]) -> str:
        """The kernel type started when a request names none."""
        if self.config.default_kernel in names or not names:
            return self.config.default_kernel
        for provider in self.providers:
            default = provider.default_kernel()
            if default is not None and default in names:
                return default
        return names[0]

    async def _provider_for(self, name: str) -> tuple[str, KernelProvider]:
        """The provider of kernel type `name` (and the name as it lists it): the first that
        lists it (later ones are not asked: a local kernel never waits for a gateway)."""
        for provider in list(self.providers):
            try:
                types = await provider.kernelspecs()
            except Exception:
                logger.exception("Kernel provider %r could not list its kernels", provider.name)
                continue
            for candidate in (name, name.lower()):
                if candidate in types and valid_kernel_name(candidate):
                    return candidate, provider
        for provider in self.providers:
            if provider.claims(name):
                return name, provider
        raise self._not_listed(name)

    def _not_listed(self, name: str) -> KernelsError:
        """Why no provider lists `name`: a provider's own reason (a broken kernelspec), or 404."""
        for provider in self.providers:
            why = provider.unusable(name)
            if why is not None:
                return why
        return KernelspecNotFound(name)

    # --- kernels -------------------------------------------------------------------------

    def entry(self, kernel_id: str) -> KernelEntry:
        try:
            return self.kernels[kernel_id]
        except KeyError:
            raise KernelNotFound(kernel_id) from None

    def kernel_info(self, kernel_id: str) -> KernelInfo:
        entry = self.entry(kernel_id)
        server = entry.server
        activity = server.activity
        return KernelInfo(
            id=kernel_id,
            name=entry.name or server.kernel_name,
            last_activity=activity.last_activity,
            execution_state=activity.execution_state,
            connections=server.connections,
            reason=activity.reason,
        )

    def kernel_infos(self) -> list[KernelInfo]:
        infos = []
        for kernel_id in self.kernels:
            try:
                infos.append(self.kernel_info(kernel_id))
            except KernelNotFound:
                continue  # removed while we were listing
        return infos

    async def refresh(self) -> None:
        """Have the providers bring their kernels' state up to date (before a listing)."""
        await run_together(
            [(f"Kernel provider {p.name!r}: refresh", p.refresh()) for p in self.providers]
        )

    async def start_kernel(
        self,
        name: str | None = None,
        path: str | None = None,
        kernel_id: str | None = None,
        *,
        session_name: str | None = None,
        username: str = "",
    ) -> KernelInfo:
        """Start a kernel of type `name` (by default the default one) for the file at `path`
        (relative to the root: it runs in its folder), under `kernel_id` if given."""
        kernel_id = kernel_id or str(uuid.uuid4())
        if kernel_id in self.kernels:
            raise Conflict(f"Kernel {kernel_id} already exists")
        if not name:
            name = self.default_kernel(list(await self.kernelspecs()))
        name, provider = await self._provider_for(name)
        request = KernelRequest(
            kernel_id=kernel_id,
            kernel_name=name,
            cwd=str(kernel_cwd(self.root_dir, path)),
            session_name=session_name,
            username=username,
        )
        server = await provider.launch(request)
        # A provider may give the kernel an id of its own (a gateway's).
        kernel_id = server.kernel_id or kernel_id
        self.kernels[kernel_id] = KernelEntry(server, name, provider=provider, owned=True)
        self.changed()
        return self.kernel_info(kernel_id)

    def adopt(self, kernel_id: str, entry: KernelEntry) -> None:
        """Serve a kernel that runs elsewhere (it will never be signalled or killed)."""
        self.kernels[kernel_id] = entry
        self.changed()

    async def shutdown_kernel(self, kernel_id: str, notice: str | None = None) -> None:
        """Shut a kernel down and forget it and its sessions; `notice` is told to clients."""
        entry = self.entry(kernel_id)
        # Where it runs first (a gateway's DELETE, a shutdown_request to a process that is
        # not ours): if that fails, it stays served.
        await entry.server.terminate()
        self._forget(kernel_id)
        await entry.server.stop(notice)

    async def detach_kernel(self, kernel_id: str, notice: str) -> None:
        """Stop serving a kernel that runs elsewhere, leaving it running: its sessions are
        closed and its clients told `notice`."""
        entry = self._forget(kernel_id)
        if entry is not None:
            await entry.server.stop(notice)

    def _forget(self, kernel_id: str) -> KernelEntry | None:
        """Stop listing a kernel and the sessions that use it."""
        for session in [s for s in self.sessions.values() if s.kernel_id == kernel_id]:
            del self.sessions[session.id]
        entry = self.kernels.pop(kernel_id, None)
        self.changed()
        return entry

    async def restart_kernel(self, kernel_id: str) -> KernelInfo:
        server = self.entry(kernel_id).server
        try:
            await server.restart()
        except KernelsError:
            raise
        except Exception as error:
            raise KernelFailed(f"Kernel {kernel_id} did not restart: {error}") from error
        finally:
            self.changed()  # a new process
        return self.kernel_info(kernel_id)

    async def interrupt_kernel(self, kernel_id: str) -> None:
        await self.entry(kernel_id).server.interrupt()

    async def stop_all(self, timeout: float, let_go: Collection[str] = ()) -> None:
        """Shut every kernel we started down, in parallel, within `timeout` seconds; let go
        of the others, which keep running, and of those in `let_go` (kernels.persist: they
        outlive the server, which takes them back at its next start)."""
        stops = []
        for kernel_id, entry in list(self.kernels.items()):
            if kernel_id in let_go and isinstance(entry.server, KernelServer):
                self.kernels.pop(kernel_id)
                stops.append((f"Leaving kernel {kernel_id} running", entry.server.let_go(_LET_GO)))
            elif entry.owned:
                stops.append(
                    (f"Shutting kernel {kernel_id} down", self._shutdown_or_let_go(kernel_id))
                )
            else:
                self.kernels.pop(kernel_id)
                stops.append((f"Letting go of kernel {kernel_id}", entry.server.stop()))
        if not stops:
            return
        try:
            await asyncio.wait_for(run_together(stops), timeout=timeout)
        except asyncio.TimeoutError:
            logger.error("Kernels did not all stop within %s s", timeout)

    async def _shutdown_or_let_go(self, kernel_id: str) -> None:
        try:
            await self.shutdown_kernel(kernel_id)
        except KernelsError as error:
            # Where it runs did not answer (a gateway that is down): at least stop serving it.
            logger.warning("Kernel %s could not be shut down: %s", kernel_id, error.message)
            entry = self._forget(kernel_id)
            if entry is not None:
                await entry.server.stop()

    # --- culling -------------------------------------------------------------------------

    async def _cull_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.cull_interval)
            await self.cull_idle_kernels()

    def _cull_timeout(self, server: ServedKernel) -> float:
        metadata = server.kernelspec.metadata if server.kernelspec else {}
        override = metadata.get("cull_idle_timeout")
        if isinstance(override, (int, float)) and not isinstance(override, bool):
            return float(override)
        return self.config.cull_idle_timeout

    async def cull_idle_kernels(self) -> None:
        """Shut down the kernels we started that have been idle too long, telling clients why."""
        now = utc_now()
        for kernel_id, entry in list(self.kernels.items()):
            if not entry.owned:
                continue
            if entry.provider is not None and not entry.provider.local_culling:
                continue  # culled where it runs (a gateway culls its own kernels)
            server = entry.server
            timeout = self._cull_timeout(server)
            if timeout <= 0:
                continue
            state = server.activity.execution_state
            if state in ("starting", "restarting"):
                continue  # not idle: it has not answered yet (a dead start ends as `dead`)
            idle = (now - server.activity.last_activity).total_seconds()
            if state != "dead" and (
                idle < timeout
                or (state == "busy" and not self.config.cull_busy)
                or (server.connections and not self.config.cull_connected)
            ):
                continue
            notice = (
                f"Kernel shut down by the server after {idle:.0f} s without activity "
                f"(cull_idle_timeout is {timeout:g} s)."
            )
            logger.info("Culling kernel %s (%s): %s", kernel_id, state, notice)
            try:
                await self.shutdown_kernel(kernel_id, notice)
            except KernelNotFound:
                continue

    # --- sessions ------------------------------------------------------------------------

    def session(self, session_id: str) -> SessionRecord:
        record = self.sessions.get(session_id)
        if record is None:
            raise SessionNotFound(session_id)
        if record.kernel_id not in self.kernels:
            # Its kernel went away without us (e.g. removed from the registry by code).
            del self.sessions[session_id]
            self.changed()
            raise SessionNotFound(session_id)
        return record

    def session_info(self, session_id: str) -> SessionInfo:
        record = self.session(session_id)
        return SessionInfo(
            id=record.id,
            path=record.path,
            name=record.name,
            type=record.type,
            kernel=self.kernel_info(record.kernel_id),
        )

    def session_infos(self) -> list[SessionInfo]:
        infos = []
        for session_id in list(self.sessions):
            try:
                infos.append(self.session_info(session_id))
            except (SessionNotFound, KernelNotFound):
                continue
        return infos

    @asynccontextmanager
    async def _path_lock(self, path: str) -> AsyncIterator[None]:
        """One session creation at a time per path, so that two tabs get one session."""
        lock = self._path_locks.setdefault(path, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._path_locks.get(path) is lock:
                del self._path_locks[path]

    async def create_session(
        self,
        path: str,
        type: str,
        name: str | None = None,
        *,
        kernel_id: str | None = None,
        kernel_name: str | None = None,
        username: str = "",
    ) -> SessionInfo:
        """The session of `path`: the one there is, or a new one with the kernel `kernel_id`
        if it runs, else a new kernel of type `kernel_name` (under `kernel_id` if given)."""
        async with self._path_lock(path):
            for record in list(self.sessions.values()):
                if record.path == path and record.kernel_id in self.kernels:
                    return self.session_info(record.id)
            record = SessionRecord(
                id=str(uuid.uuid4()),
                path=path,
                name=name or "",
                type=type,
                kernel_id=await self._kernel_for(path, kernel_id, kernel_name, username),
            )
            self.sessions[record.id] = record
            self.changed()
            return self.session_info(record.id)

    async def _kernel_for(
        self, path: str, kernel_id: str | None, kernel_name: str | None, username: str
    ) -> str:
        """The id of kernel `kernel_id` if it runs, else of a new kernel for `path`."""
        if kernel_id is not None and kernel_id in self.kernels:
            return kernel_id
        started = await self.start_kernel(
            kernel_name,
            path,
            kernel_id,
            session_name=str((self.root_dir / path.lstrip("/")).resolve()),
            username=username,
        )
        return started.id

    async def update_session(
        self,
        session_id: str,
        *,
        path: str | None = None,
        type: str | None = None,
        name: str | None = None,
        kernel_id: str | None = None,
        kernel_name: str | None = None,
        username: str = "",
    ) -> SessionInfo:
        """Change what is given of a session: a kernel by id (running) or by type (new)."""
        record = self.session(session_id)
        old_kernel = new_kernel = record.kernel_id
        if kernel_id is not None and (kernel_id or kernel_name):
            self.entry(kernel_id)  # raises KernelNotFound
            new_kernel = kernel_id
        elif kernel_id is None and kernel_name:
            new_kernel = await self._kernel_for(path or record.path, None, kernel_name, username)
        # Read again: the session may have changed while a new kernel started.
        record = replace(
            self.session(session_id),
            kernel_id=new_kernel,
            path=record.path if path is None else path,
            name=record.name if name is None else name,
            type=record.type if type is None else type,
        )
        self.sessions[session_id] = record
        self.changed()
        if record.kernel_id != old_kernel:
            await self._release(old_kernel)
        return self.session_info(record.id)

    async def delete_session(self, session_id: str) -> None:
        record = self.session(session_id)
        del self.sessions[session_id]
        self.changed()
        await self._release(record.kernel_id)

    async def _release(self, kernel_id: str) -> None:
        """Shut a kernel down once no session uses it, if we started it."""
        if any(s.kernel_id == kernel_id for s in self.sessions.values()):
            return
        entry = self.kernels.get(kernel_id)
        if entry is not None and entry.owned:
            await self.shutdown_kernel(kernel_id)
