"""The `spec` provider: kernelspecs on the Jupyter data path, run as local subprocesses.

Their names are the kernelspecs' own (`python3`), as notebooks' metadata and JupyterLab
expect.
"""

from __future__ import annotations

from ..errors import KernelsError, KernelspecBroken, KernelspecNotFound
from ..kernel_driver.kernelspec import find_kernelspecs, scan_kernelspecs
from ..kernel_server.base import ServedKernel
from ..launchers import KernelRequest, LocalLauncher
from .base import KernelProvider, KernelType, ProviderContext


class SpecProvider(KernelProvider):
    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        self._launcher = LocalLauncher(context.config)

    async def kernelspecs(self) -> dict[str, KernelType]:
        return {name: KernelType.from_kernelspec(spec) for name, spec in find_kernelspecs().items()}

    def unusable(self, kernel_name: str) -> KernelsError | None:
        broken = scan_kernelspecs().broken.get(kernel_name.lower())
        if broken is None:
            return None
        return KernelspecBroken(kernel_name, str(broken.path), broken.problem)

    async def launch(self, request: KernelRequest) -> ServedKernel:
        spec = find_kernelspecs().get(request.kernel_name.lower())
        if spec is None:
            raise self.unusable(request.kernel_name) or KernelspecNotFound(request.kernel_name)
        return await self._launcher.launch_spec(spec, request)
