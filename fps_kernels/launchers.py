"""The ways a kernel comes to be served: launched here, or attached to where it runs."""

from __future__ import annotations

from dataclasses import dataclass

from .config import KernelsPluginConfig
from .errors import KernelFailed, KernelspecNotFound
from .kernel_driver.connection import InvalidConnectionFile
from .kernel_driver.kernelspec import KernelSpec, find_kernelspecs
from .kernel_server.server import KernelServer, KernelStartError, kernels


@dataclass(frozen=True)
class KernelRequest:
    kernel_id: str
    kernel_name: str = ""
    cwd: str = ""
    session_name: str | None = None
    connection_file: str = ""
    #: The jupyverse user asking (empty without authentication).
    username: str = ""


class LocalLauncher:
    """Kernels from kernelspecs on the Jupyter path, run as local subprocesses."""

    def __init__(self, config: KernelsPluginConfig) -> None:
        self._config = config

    def kernelspecs(self) -> dict[str, KernelSpec]:
        return find_kernelspecs()

    async def launch(self, request: KernelRequest) -> KernelServer:
        spec = self.kernelspecs().get(request.kernel_name.lower())
        if spec is None:
            raise KernelspecNotFound(request.kernel_name)
        return await self.launch_spec(spec, request)

    async def launch_spec(self, spec: KernelSpec, request: KernelRequest) -> KernelServer:
        """Start a kernel of `spec` as a local subprocess, returning once the process runs
        (as jupyter_server does): it finishes starting in the background."""
        try:
            server = KernelServer.launching(
                spec,
                kernel_id=request.kernel_id,
                kernel_name=request.kernel_name,
                cwd=request.cwd,
                session_name=request.session_name,
                settings=self._config.server_settings(),
                ports=kernels.ports,
            )
            await server.start(wait_ready=False)
        except KernelStartError as error:
            raise KernelFailed(str(error)) from None
        return server


class ConnectionFileLauncher:
    """Kernels that run elsewhere and are reached through their connection file."""

    def __init__(self, config: KernelsPluginConfig) -> None:
        self._config = config

    def prepare(self, request: KernelRequest) -> KernelServer:
        """The server for the kernel, not started yet (KernelFailed for a bad file)."""
        try:
            return KernelServer.attaching(
                request.connection_file,
                kernel_id=request.kernel_id,
                kernel_name=request.kernel_name,
                settings=self._config.server_settings(),
            )
        except (InvalidConnectionFile, ValueError) as error:
            raise KernelFailed(str(error)) from None

    async def launch(self, request: KernelRequest) -> KernelServer:
        server = self.prepare(request)
        try:
            await server.start(launch_kernel=False)
        except KernelStartError as error:
            raise KernelFailed(str(error)) from None
        return server
