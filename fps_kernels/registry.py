"""The kernels and sessions of this server, and what may be done with them."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
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
from .kernel_driver.control import request_shutdown
from .kernel_server.activity import isoformat_z, utc_now
from .kernel_server.base import ServedKernel
from .kernel_server.registry import KernelEntry, KernelRegistry
from .kernel_server.server import KernelServer
from .launchers import KernelRequest
from .models import CreateSession, KernelRef, StartKernel, UpdateSession
from .providers.base import KernelProvider, KernelResource, KernelType, valid_kernel_name

logger = logging.getLogger(__name__)


@dataclass
class SessionRecord:
    id: str
    path: str
    name: str
    type: str
    kernel_id: str


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
        # The provider of each kernel it started or adopted (kernels added to `kernels` by
        # code have none, and get the default treatment).
        self._kernel_providers: dict[str, KernelProvider] = {}
        self._name_clashes: set[tuple[str, str]] = set()
        self.sessions: dict[str, SessionRecord] = {}
        self._owned: set[str] = set()  # kernels this registry started, and so may shut down
        self._path_locks: dict[str, asyncio.Lock] = {}
        self._culler: asyncio.Task[None] | None = None

    # --- lifetime ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background work: culling idle kernels."""
        self._culler = asyncio.create_task(self._cull_forever())

    async def start_providers(self) -> None:
        """Start the providers' background work; one that fails to start is left out."""
        for provider in list(self.providers):
            try:
                await provider.start()
            except Exception:
                logger.exception("Kernel provider %r did not start: left out", provider.name)
                self.providers.remove(provider)

    async def stop(self, timeout: float) -> None:
        """Stop the background work, then every kernel (see stop_all), then the providers."""
        if self._culler is not None:
            self._culler.cancel()
            await asyncio.gather(self._culler, return_exceptions=True)
            self._culler = None
        for provider in self.providers:
            await self._quietly(provider.stop(), f"stop provider {provider.name!r}")
        await self.stop_all(timeout)
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

    def kernel_model(self, kernel_id: str) -> dict[str, Any]:
        entry = self.entry(kernel_id)
        server = entry.server
        activity = server.activity
        model: dict[str, Any] = {
            "id": kernel_id,
            "name": entry.name or server.kernel_name,
            "last_activity": isoformat_z(activity.last_activity),
            "execution_state": activity.execution_state,
            "connections": server.connections,
        }
        if activity.reason:
            model["reason"] = activity.reason
        return model

    def kernel_models(self) -> list[dict[str, Any]]:
        models = []
        for kernel_id in self.kernels:
            try:
                models.append(self.kernel_model(kernel_id))
            except KernelNotFound:
                continue  # removed while we were listing
        return models

    async def refresh(self) -> None:
        """Have the providers bring their kernels' state up to date (before a listing)."""
        results = await asyncio.gather(
            *(provider.refresh() for provider in self.providers), return_exceptions=True
        )
        for provider, result in zip(self.providers, results, strict=True):
            if isinstance(result, Exception):
                logger.error("Kernel provider %r: refresh failed", provider.name, exc_info=result)

    async def start_kernel(
        self,
        body: StartKernel,
        session_name: str | None = None,
        username: str = "",
    ) -> str:
        kernel_id = body.kernel_id or str(uuid.uuid4())
        if kernel_id in self.kernels:
            raise Conflict(f"Kernel {kernel_id} already exists")
        name = body.name
        if not name:
            name = self.default_kernel(list(await self.kernelspecs()))
        name, provider = await self._provider_for(name)
        cwd = kernel_cwd(self.root_dir, body.path)
        request = KernelRequest(
            kernel_id=kernel_id,
            kernel_name=name,
            cwd=str(cwd),
            session_name=session_name,
            username=username,
        )
        server = await provider.launch(request)
        # A provider may give the kernel an id of its own (a gateway's).
        kernel_id = server.kernel_id or kernel_id
        self.kernels[kernel_id] = KernelEntry(server=server, name=name)
        self._owned.add(kernel_id)
        self._kernel_providers[kernel_id] = provider
        return kernel_id

    def adopt(
        self, kernel_id: str, entry: KernelEntry, provider: KernelProvider | None = None
    ) -> None:
        """Serve a kernel that runs elsewhere (it will never be signalled or killed)."""
        self.kernels[kernel_id] = entry
        if provider is not None:
            self._kernel_providers[kernel_id] = provider

    async def shutdown_kernel(self, kernel_id: str, notice: str | None = None) -> None:
        """Shut a kernel down and forget it and its sessions; `notice` is told to clients."""
        entry = self.entry(kernel_id)
        provider = self._kernel_providers.get(kernel_id)
        if provider is not None:
            # Where it runs first (a gateway's DELETE): if that fails, it stays served.
            await provider.terminate(entry.server)
        for session in [s for s in self.sessions.values() if s.kernel_id == kernel_id]:
            del self.sessions[session.id]
        self.kernels.pop(kernel_id, None)
        self._owned.discard(kernel_id)
        self._kernel_providers.pop(kernel_id, None)
        if (
            provider is None
            and isinstance(entry.server, KernelServer)
            and not entry.server.owns_process
        ):
            # Not our process (an external kernel): ask it to stop, never signal it.
            await request_shutdown(entry.server.connection_info, self.config.shutdown_wait)
        await entry.server.stop(notice)

    async def detach_kernel(self, kernel_id: str, notice: str) -> None:
        """Stop serving a kernel that runs elsewhere, leaving it running: its sessions are
        closed and its clients told `notice`."""
        entry = self.kernels.get(kernel_id)
        if entry is None:
            return
        for session in [s for s in self.sessions.values() if s.kernel_id == kernel_id]:
            del self.sessions[session.id]
        self.kernels.pop(kernel_id, None)
        self._owned.discard(kernel_id)
        self._kernel_providers.pop(kernel_id, None)
        await entry.server.stop(notice)

    async def restart_kernel(self, kernel_id: str) -> None:
        server = self.entry(kernel_id).server
        provider = self._kernel_providers.get(kernel_id)
        try:
            if provider is not None:
                await provider.restart(server)
            else:
                await server.restart()
        except KernelsError:
            raise
        except Exception as error:
            raise KernelFailed(f"Kernel {kernel_id} did not restart: {error}") from None

    async def interrupt_kernel(self, kernel_id: str) -> None:
        server = self.entry(kernel_id).server
        provider = self._kernel_providers.get(kernel_id)
        if provider is not None:
            await provider.interrupt(server)
        else:
            server.interrupt()

    async def stop_all(self, timeout: float) -> None:
        """Shut every kernel we started down, in parallel, within `timeout` seconds."""
        owned = [kernel_id for kernel_id in self._owned if kernel_id in self.kernels]
        others = [kernel_id for kernel_id in self.kernels if kernel_id not in self._owned]
        stops = [self._shutdown_or_let_go(kernel_id) for kernel_id in owned]
        for kernel_id in others:
            # Kernels we only attached to keep running: just let go of them.
            entry = self.kernels.pop(kernel_id)
            self._kernel_providers.pop(kernel_id, None)
            stops.append(entry.server.stop())
        if not stops:
            return
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*stops, return_exceptions=True), timeout=timeout
            )
        except asyncio.TimeoutError:
            logger.error("Kernels did not all stop within %s s", timeout)
            return
        for result in results:
            if isinstance(result, BaseException):
                logger.error("A kernel did not stop cleanly", exc_info=result)

    async def _shutdown_or_let_go(self, kernel_id: str) -> None:
        try:
            await self.shutdown_kernel(kernel_id)
        except KernelsError as error:
            # Where it runs did not answer (a gateway that is down): at least stop serving it.
            logger.warning("Kernel %s could not be shut down: %s", kernel_id, error.message)
            entry = self.kernels.pop(kernel_id, None)
            self._kernel_providers.pop(kernel_id, None)
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
        for kernel_id in list(self._owned):
            entry = self.kernels.get(kernel_id)
            if entry is None:
                continue
            provider = self._kernel_providers.get(kernel_id)
            if provider is not None and not provider.local_culling:
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
            raise SessionNotFound(session_id)
        return record

    def session_model(self, record: SessionRecord) -> dict[str, Any]:
        model: dict[str, Any] = {
            "id": record.id,
            "path": record.path,
            "name": record.name,
            "type": record.type,
            "kernel": self.kernel_model(record.kernel_id),
        }
        if record.type == "notebook":
            model["notebook"] = {"path": record.path, "name": record.name}
        return model

    def session_models(self) -> list[dict[str, Any]]:
        models = []
        for session_id in list(self.sessions):
            try:
                models.append(self.session_model(self.session(session_id)))
            except (SessionNotFound, KernelNotFound):
                continue
        return models

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

    async def create_session(self, body: CreateSession, username: str = "") -> SessionRecord:
        async with self._path_lock(body.path):
            for record in list(self.sessions.values()):
                if record.path == body.path and record.kernel_id in self.kernels:
                    return record
            kernel_id = await self._kernel_for(body.kernel, body.path, body.name, username)
            record = SessionRecord(
                id=str(uuid.uuid4()),
                path=body.path,
                name=body.name or "",
                type=body.type,
                kernel_id=kernel_id,
            )
            self.sessions[record.id] = record
            return record

    async def _kernel_for(
        self, ref: KernelRef | None, path: str, name: str | None, username: str = ""
    ) -> str:
        """The id of the kernel `ref` asks for: a running one, or one started for `path`."""
        if ref is not None and ref.id is not None and ref.id in self.kernels:
            return ref.id
        start = StartKernel(
            name=ref.name if ref is not None else None,
            path=path,
            kernel_id=ref.id if ref is not None else None,
        )
        return await self.start_kernel(
            start, session_name=self._session_name(path), username=username
        )

    def _session_name(self, path: str) -> str:
        return str((self.root_dir / path.lstrip("/")).resolve())

    async def update_session(
        self, session_id: str, body: UpdateSession, username: str = ""
    ) -> SessionRecord:
        record = self.session(session_id)
        old_kernel = record.kernel_id
        if body.kernel is not None and (body.kernel.id or body.kernel.name):
            if body.kernel.id is not None:
                self.entry(body.kernel.id)  # raises KernelNotFound
                new_kernel = body.kernel.id
            else:
                new_kernel = await self._kernel_for(
                    KernelRef(name=body.kernel.name), body.path or record.path, body.name, username
                )
            record.kernel_id = new_kernel
        if body.path is not None:
            record.path = body.path
        if body.name is not None:
            record.name = body.name
        if body.type is not None:
            record.type = body.type
        if record.kernel_id != old_kernel:
            await self._release(old_kernel)
        return record

    async def delete_session(self, session_id: str) -> None:
        record = self.session(session_id)
        del self.sessions[session_id]
        await self._release(record.kernel_id)

    async def _release(self, kernel_id: str) -> None:
        """Shut a kernel down once no session uses it, if we started it."""
        if any(s.kernel_id == kernel_id for s in self.sessions.values()):
            return
        if kernel_id in self._owned and kernel_id in self.kernels:
            await self.shutdown_kernel(kernel_id)
