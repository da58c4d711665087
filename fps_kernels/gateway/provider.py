"""The `gateway` provider: kernels in a Jupyter Kernel Gateway or Enterprise Gateway.

Its kernel types are the gateway's kernelspecs: in `merged` mode (next to local kernels) as
`gw-<name>` with " (gateway)" after the display name; in `exclusive` mode (the gateway's
kernels only, local kernelspecs off) under their own names. Kernels keep the gateway's ids.
Starting one POSTs to the gateway with the `KERNEL_*` variables the options say, among them
`KERNEL_USERNAME` (the jupyverse user), `KERNEL_ID` (the id Enterprise Gateway then uses, so
that a launch that timed out can be deleted) and `KERNEL_LAUNCH_TIMEOUT`. Kernels already
running on the gateway when the server starts are adopted (listed, and left running when
the server stops). The gateway culls its own kernels; kernels it no longer has are
forgotten, their sessions closed and their clients told.

The gateway never holds the server up: what listings need of it (kernelspecs, its kernels'
state) is asked in the background (see `look.py`), the server's start and each
listing wait at most ANSWER_WAIT for it and otherwise answer from what is known (the last
kernelspecs, also kept on disk for the next start), with a `reason` on its kernels.
"""

from __future__ import annotations

import asyncio
import fnmatch
import getpass
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

import httpx

from ..errors import GatewayError, GatewayTimeout, KernelspecNotFound, NotFound
from ..kernel_driver.paths import runtime_dir
from ..kernel_driver.tasks import BackgroundTasks
from ..kernel_server.base import ServedKernel
from ..kernel_server.registry import KernelEntry
from ..launchers import KernelRequest
from ..providers.base import (
    KernelProvider,
    KernelResource,
    KernelType,
    ProviderContext,
    valid_kernel_name,
)
from .client import GatewayClient, GatewayRefused, json_object
from .config import GatewayConfig
from .kernel import GONE_NOTICE, LAUNCH_PAD, GatewayKernel
from .look import Look
from .remembered import RememberedSpecs

logger = logging.getLogger(__name__)

#: Seconds a kernelspec listing is reused, and a kernel listing (REST) is reused.
SPECS_MAX_AGE = 2.0
KERNELS_MAX_AGE = 1.0
#: Seconds the server's start and a listing wait for the gateway (counted from the start of
#: the look at it) before going on with what is known.
ANSWER_WAIT = 1.0
#: Seconds the provider's last tasks (deleting kernels launched late) may hold the server's stop.
CLOSE_WAIT = 10.0
_LATE_DELETE = "deleting a kernel whose launch was given up"


class GatewayProvider(KernelProvider):
    local_culling = False

    def __init__(
        self,
        context: ProviderContext,
        transport: httpx.AsyncBaseTransport | None = None,
        state_dir: Path | None = None,
    ) -> None:
        super().__init__(context)
        self.config: GatewayConfig = context.config.gateway
        if not self.config.url:
            raise ValueError("the gateway provider needs kernels.gateway.url")
        self.client = GatewayClient(self.config, transport)
        self._merged = self.config.mode == "merged"
        self._types: dict[str, KernelType] = {}
        self._remote_names: dict[str, str] = {}  # our kernel type name → the gateway's
        self._remote_default: str | None = None
        self._remembered = RememberedSpecs(state_dir or runtime_dir(), self.config.url)
        self._specs = Look("Kernelspecs of the gateway", self._fetch_kernelspecs)
        self._state = Look("Kernels of the gateway", self._look_at_kernels)
        self._kernels: dict[str, GatewayKernel] = {}
        self._list_kernels = True  # False once the gateway refused GET /api/kernels
        self._adopted = False
        self._tasks = BackgroundTasks("Gateway provider")
        self._poller: asyncio.Task[None] | None = None
        remembered = self._remembered.load()
        if remembered is not None:
            self._take_kernelspecs(remembered)

    # --- lifetime --------------------------------------------------------------------------

    async def start(self) -> None:
        logger.info(
            "Kernel gateway at %s (%s mode, kernelspecs named %s<name>)",
            self.config.url,
            self.config.mode,
            self.config.name_prefix if self._merged else "",
        )
        self._poller = asyncio.create_task(self._poll_forever())
        done = await asyncio.gather(
            self._specs.fresh(0, ANSWER_WAIT), self._state.fresh(0, ANSWER_WAIT)
        )
        if not all(done):
            logger.warning(
                "The kernel gateway at %s did not answer within %g s: going on without it "
                "(%d kernelspecs it gave before); its kernels are adopted once it answers",
                self.config.url,
                ANSWER_WAIT,
                len(self._types),
            )

    async def stop(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)

    async def close(self) -> None:
        await self._specs.close()
        await self._state.close()
        # Late launches being cleaned up: give them a moment, they delete kernels.
        await self._tasks.wait(timeout=min(self.config.request_timeout, CLOSE_WAIT))
        await self._tasks.cancel_all()
        await self.client.close()

    # --- names -----------------------------------------------------------------------------

    def local_name(self, remote: str) -> str:
        return f"{self.config.name_prefix}{remote}" if self._merged else remote

    def claims(self, kernel_name: str) -> bool:
        if not self._merged:
            return True
        return bool(self.config.name_prefix) and kernel_name.startswith(self.config.name_prefix)

    def default_kernel(self) -> str | None:
        if self._merged or self._remote_default is None:
            return None
        return self.local_name(self._remote_default)

    # --- kernelspecs -----------------------------------------------------------------------

    async def kernelspecs(self) -> dict[str, KernelType]:
        """The gateway's kernel types; the last known ones when it does not answer soon."""
        await self._specs.fresh(SPECS_MAX_AGE, ANSWER_WAIT)
        return dict(self._types)

    async def _fetch_kernelspecs(self) -> None:
        data = await self.client.get_json("/api/kernelspecs")
        if not self._take_kernelspecs(data):
            raise GatewayRefused(
                f"The kernel gateway at {self.config.url} gave no kernelspecs", 502
            )
        self._remembered.save(data)

    def _take_kernelspecs(self, data: Any) -> bool:
        """Serve the kernelspecs of a GET /api/kernelspecs answer; False if it has none."""
        specs = data.get("kernelspecs") if isinstance(data, dict) else None
        if not isinstance(specs, dict):
            return False
        default = data.get("default")
        self._remote_default = default if isinstance(default, str) else None
        types: dict[str, KernelType] = {}
        remote_names: dict[str, str] = {}
        for remote, model in specs.items():
            kernel_type = self._kernel_type(str(remote), model)
            if kernel_type is not None:
                types[kernel_type.name] = kernel_type
                remote_names[kernel_type.name] = str(remote)
        self._types, self._remote_names = types, remote_names
        return True

    def _not_answering(self, after: float = ANSWER_WAIT) -> GatewayTimeout | None:
        """The gateway seen not to answer: a look at it lasting longer than `after`."""
        waited = max(self._specs.running_for(), self._state.running_for())
        if waited <= after:
            return None
        return GatewayTimeout(
            f"The kernel gateway at {self.config.url} does not answer (nothing for {waited:.0f} s)"
        )

    def _kernel_type(self, remote: str, model: Any) -> KernelType | None:
        name = self.local_name(remote)
        if not isinstance(model, dict) or not isinstance(model.get("spec"), dict):
            logger.warning("Skipping the gateway's kernelspec %r: no spec", remote)
            return None
        if not valid_kernel_name(name):
            logger.warning("Skipping the gateway's kernelspec %r: not a usable name", remote)
            return None
        spec = dict(model["spec"])
        metadata = dict(spec.get("metadata") or {})
        metadata["fps_kernels"] = {"provider": self.name, "gateway_name": remote}
        spec["metadata"] = metadata
        if self._merged:
            display = spec.get("display_name") or remote
            spec["display_name"] = f"{display}{self.config.display_name_suffix}"
        resources: dict[str, str] = {}
        for key, url in (model.get("resources") or {}).items():
            file_name = str(url).rstrip("/").rsplit("/", 1)[-1]
            if file_name and valid_kernel_name(file_name):
                resources[str(key)] = file_name
        return KernelType(name=name, spec=spec, resources=resources)

    async def _remote_name(self, kernel_name: str) -> str:
        """The gateway's name for one of our kernel types, asking the gateway if need be."""
        remote = self._remote_names.get(kernel_name)
        if remote is None:
            done = await self._specs.fresh(0, self.config.request_timeout)
            if not done:
                raise self._not_answering(after=0) or GatewayTimeout(
                    f"The kernel gateway at {self.config.url} does not answer"
                )
            if self._specs.error is not None:
                raise self._specs.error  # the gateway's errors tell why
            remote = self._remote_names.get(kernel_name)
        if remote is None:
            raise KernelspecNotFound(kernel_name)
        return remote

    async def resource(self, kernel_type: KernelType, file_name: str) -> KernelResource:
        remote = self._remote_names.get(kernel_type.name)
        if remote is None or file_name not in kernel_type.resources.values():
            raise NotFound(f"No file {file_name!r} in kernelspec {kernel_type.name}")
        hung = self._not_answering()
        if hung is not None:
            raise hung  # a logo is not worth a request that hangs
        content, media_type = await self.client.resource(remote, file_name)
        return KernelResource(content=content, media_type=media_type)

    # --- starting kernels ------------------------------------------------------------------

    def kernel_env(self, request: KernelRequest) -> dict[str, str]:
        """The environment asked for a new kernel."""
        env = {
            key: value
            for key, value in os.environ.items()
            if any(fnmatch.fnmatchcase(key, pattern) for pattern in self.config.pass_env)
        }
        env.update(self.config.env)
        username = request.username or env.get("KERNEL_USERNAME") or _os_user()
        env["KERNEL_USERNAME"] = username
        env["KERNEL_LAUNCH_TIMEOUT"] = f"{self.config.launch_timeout:g}"
        if _is_uuid4(request.kernel_id):
            env["KERNEL_ID"] = request.kernel_id
        if self.config.send_working_dir and request.cwd:
            env["KERNEL_WORKING_DIR"] = request.cwd
        return env

    async def launch(self, request: KernelRequest) -> ServedKernel:
        remote = await self._remote_name(request.kernel_name)
        env = self.kernel_env(request)
        body = {"name": remote, "env": env}
        timeout = self.config.launch_timeout + LAUNCH_PAD
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # The POST goes on past the timeout, so that a kernel started late can be deleted.
        post = asyncio.create_task(
            self.client.request("POST", "/api/kernels", json=body, timeout=2 * timeout)
        )
        try:
            done, _ = await asyncio.wait({post}, timeout=timeout)
        except asyncio.CancelledError:
            self._tasks.spawn(self._delete_late_kernel(post, request.kernel_id), _LATE_DELETE)
            raise
        if not done:
            self._tasks.spawn(self._delete_late_kernel(post, request.kernel_id), _LATE_DELETE)
            raise self._launch_timeout(remote, timeout)
        model = json_object(post.result())
        kernel_id = model.get("id")
        if not isinstance(kernel_id, str) or not kernel_id:
            raise GatewayRefused(
                f"The kernel gateway at {self.config.url} started a kernel without an id", 502
            )
        logger.info(
            "Gateway kernel %s (%s) started for %s",
            kernel_id,
            remote,
            env["KERNEL_USERNAME"],
        )
        kernel = self._kernel(kernel_id, request.kernel_name, remote)
        kernel.update(model)
        try:
            await asyncio.wait_for(kernel.wait_ready(), max(deadline - loop.time(), 0.1))
        except (asyncio.TimeoutError, GatewayError, asyncio.CancelledError) as error:
            # Not usable: leave nothing behind on the gateway.
            self._closed(kernel)
            self._tasks.spawn(self._delete_kernel(kernel_id), _LATE_DELETE)
            if isinstance(error, asyncio.TimeoutError):
                raise self._launch_timeout(remote, timeout) from error
            raise
        return kernel

    def _launch_timeout(self, remote: str, timeout: float) -> GatewayTimeout:
        return GatewayTimeout(
            f"The kernel gateway at {self.config.url} did not start a {remote} kernel within "
            f"{timeout:g} s (kernels.gateway.launch_timeout); it is deleted if it comes later"
        )

    async def _delete_late_kernel(self, post: asyncio.Task[httpx.Response], asked: str) -> None:
        """A launch that timed out or was given up: delete the kernel if it comes anyway."""
        try:
            model = json_object(await post)
        except GatewayError as error:
            logger.info("A gateway launch given up did not start a kernel: %s", error.message)
            model = {}
        kernel_id = model.get("id")
        # Enterprise Gateway may have made the kernel under the id we asked (KERNEL_ID).
        targets = [kernel_id] if isinstance(kernel_id, str) and kernel_id else []
        if _is_uuid4(asked) and asked not in targets:
            targets.append(asked)
        for target in targets:
            await self._delete_kernel(target)

    async def _delete_kernel(self, kernel_id: str) -> None:
        """Delete a kernel whose launch was given up (one that is not there is fine)."""
        try:
            await self.client.request("DELETE", f"/api/kernels/{kernel_id}")
            logger.warning("Deleted gateway kernel %s, whose launch was given up", kernel_id)
        except GatewayRefused as error:
            if error.status != 404:
                logger.warning("Could not delete gateway kernel %s: %s", kernel_id, error.message)
        except GatewayError as error:
            logger.warning("Could not delete gateway kernel %s: %s", kernel_id, error.message)

    def _kernel(self, kernel_id: str, kernel_name: str, remote: str) -> GatewayKernel:
        kernel = GatewayKernel(
            kernel_id,
            kernel_name,
            remote,
            self.client,
            self.config,
            max_message_bytes=self.context.config.max_message_bytes,
            on_gone=self._gone,
            on_closed=self._closed,
            not_answering=self._not_answering,
        )
        self._kernels[kernel_id] = kernel
        return kernel

    def _closed(self, kernel: GatewayKernel) -> None:
        if self._kernels.get(kernel.kernel_id) is kernel:
            del self._kernels[kernel.kernel_id]

    def _gone(self, kernel: GatewayKernel, notice: str) -> None:
        self._tasks.spawn(
            self.context.host.detach_kernel(kernel.kernel_id, notice), "forgetting a gone kernel"
        )

    # --- the gateway's kernels -------------------------------------------------------------

    async def _running(self) -> dict[str, dict[str, Any]] | None:
        """The gateway's kernel models by id; None when it does not list them."""
        if not self._list_kernels:
            return None
        try:
            data = await self.client.get_json("/api/kernels")
        except GatewayRefused as error:
            if error.status != 403:
                raise
            logger.info(
                "The gateway does not list its kernels (start it with "
                "--JupyterWebsocketPersonality.list_kernels=True, or EG_LIST_KERNELS=True): "
                "asking for each kernel instead"
            )
            self._list_kernels = False
            return None
        models = data if isinstance(data, list) else []
        return {m["id"]: m for m in models if isinstance(m, dict) and isinstance(m.get("id"), str)}

    async def _adopt_running(self) -> None:
        """Serve the kernels already running on the gateway (they are not ours to stop)."""
        running = await self._running()
        if running:
            await self._specs.fresh(SPECS_MAX_AGE, math.inf)
        self._adopted = True
        host = self.context.host
        for kernel_id, model in (running or {}).items():
            if kernel_id in host.kernels or kernel_id in self._kernels:
                continue
            remote = str(model.get("name") or "")
            kernel = self._kernel(kernel_id, self.local_name(remote), remote)
            kernel.update(model)
            host.adopt(
                kernel_id, KernelEntry(server=kernel, name=kernel.kernel_name, provider=self)
            )
            logger.info("Adopted gateway kernel %s (%s)", kernel_id, remote)

    async def refresh(self, max_age: float = KERNELS_MAX_AGE) -> None:
        """Take the gateway's state of our kernels (forgetting those it no longer has), if it
        answers within ANSWER_WAIT; otherwise their `reason` says it does not answer."""
        if self._adopted and not self._kernels:
            return
        if not await self._state.fresh(max_age, ANSWER_WAIT):
            hung = self._not_answering(after=0)
            if hung is not None:
                self._gateway_problem(hung)

    async def _look_at_kernels(self) -> None:
        try:
            if not self._adopted:
                await self._adopt_running()
            if not self._kernels:
                return
            models = await self._models(list(self._kernels))
        except GatewayError as error:
            self._gateway_problem(error)
            raise
        for kernel_id, kernel in list(self._kernels.items()):
            model = models.get(kernel_id)
            if model is None:
                kernel.gone(GONE_NOTICE)
            else:
                kernel.update(model)

    def _gateway_problem(self, error: GatewayError) -> None:
        for kernel in self._kernels.values():
            kernel.gateway_unreachable(f"Kernel gateway problem: {error.message}")

    async def _models(self, kernel_ids: list[str]) -> dict[str, dict[str, Any]]:
        running = await self._running()
        if running is not None:
            return running
        models = {}
        for kernel_id in kernel_ids:
            try:
                models[kernel_id] = json_object(
                    await self.client.request("GET", f"/api/kernels/{kernel_id}")
                )
            except GatewayRefused as error:
                if error.status != 404:
                    raise
        return models

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval)
            if not self._adopted or self._kernels:
                await self._state.fresh(0, math.inf)


def _is_uuid4(value: str) -> bool:
    try:
        return uuid.UUID(value).version == 4
    except ValueError:
        return False


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "jupyverse"
