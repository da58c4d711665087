"""KernelsComponent: wires the config and resources of the kernels plugin into jupyverse."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from asphalt.core import Component, Context, context_teardown
from fastapi import FastAPI
from jupyverse_api.app import App
from jupyverse_api.auth import Auth
from jupyverse_api.frontend import FrontendConfig
from jupyverse_api.kernels import Kernels, KernelsConfig

from .access import cors_origins
from .config import KernelsPluginConfig
from .kernel_driver.ownership import remove_stale_connection_files
from .kernel_driver.paths import runtime_dir
from .kernel_server.server import KernelServer, kernels
from .persistence import KernelPersistence
from .providers import load_providers
from .registry import Registry
from .routes import KernelsRouter

logger = logging.getLogger(__name__)


class KernelsComponent(Component):
    def __init__(self, **kwargs: Any) -> None:
        self.kernels_config = KernelsPluginConfig(**kwargs)

    @context_teardown
    async def start(self, ctx: Context) -> AsyncGenerator[None, BaseException | None]:
        config = self.kernels_config
        ctx.add_resource(config, types=[KernelsPluginConfig, KernelsConfig])
        app = await ctx.request_resource(App)
        auth = await ctx.request_resource(Auth)  # type: ignore[type-abstract]
        frontend_config = await ctx.request_resource(FrontendConfig)
        yjs = None
        if config.require_yjs:
            from jupyverse_api.yjs import Yjs

            yjs = await ctx.request_resource(Yjs)  # type: ignore[type-abstract]

        registry = Registry(config, kernels, root_dir=Path.cwd())
        registry.providers = load_providers(config, registry, registry.root_dir)
        execution = None
        if yjs is not None:
            from .execution import ServerSideExecution

            execution = ServerSideExecution(
                registry,
                yjs,
                ready_timeout=config.startup_timeout,
                pace_saves=config.wait_for_saves,
            )
        # jupyverse's own --allow-origin (a CORS middleware of its app) lets those in too.
        origins = cors_origins(await ctx.request_resource(FastAPI))
        router = KernelsRouter(
            app, config, auth, frontend_config, registry, yjs, execution, extra_origins=origins
        )
        ctx.add_resource(router, types=Kernels)
        # Before the providers start: kernels taken back keep their ids.
        persistence = KernelPersistence(registry, config)
        if execution is not None:
            persistence.running_cells = execution.running_cells
        await persistence.start()
        # Left by a server of ours that was killed (its kernels exited on their own), but
        # for those of the kernels just taken back.
        remove_stale_connection_files(runtime_dir(), keep=persistence.kept_connection_files())
        registry.start()
        await registry.start_providers()
        if execution is not None:
            execution.resume(persistence.resumed, tuple(persistence.gone))

        yield

        let_go = persistence.freeze()
        servers = {kernel_id: registry.kernels[kernel_id].server for kernel_id in let_go}
        await registry.stop(timeout=3 * config.shutdown_wait + 10, let_go=let_go)
        if execution is not None:
            # Their cells go on in the kernels: the next server resumes them, from where
            # the keepers took over.
            caught_up = {
                kernel_id: server.last_iopub_id
                for kernel_id, server in servers.items()
                if isinstance(server, KernelServer)
            }
            persistence.last_running(await execution.let_go(let_go, caught_up))
            await execution.close()
        await persistence.close()
        logger.info("Kernels plugin stopped")
