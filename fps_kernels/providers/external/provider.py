"""The `external` provider: kernels started elsewhere, served from their connection files.

Active when `allow_external_kernels` is on: it watches `external_connection_dir` (see
`watcher.py`). It offers no kernel type to start: its kernels come and go with their files.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import KernelspecNotFound
from ...kernel_server.base import ServedKernel
from ...launchers import ConnectionFileLauncher, KernelRequest
from ..base import KernelProvider, KernelType, ProviderContext
from .watcher import ExternalKernels, default_directory


class ExternalProvider(KernelProvider):
    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        config = context.config
        folder = Path(config.external_connection_dir or default_directory())
        self.watcher = ExternalKernels(
            folder, context.host, ConnectionFileLauncher(config), provider=self
        )

    async def start(self) -> None:
        await self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()

    async def kernelspecs(self) -> dict[str, KernelType]:
        return {}

    async def launch(self, request: KernelRequest) -> ServedKernel:
        raise KernelspecNotFound(request.kernel_name)
