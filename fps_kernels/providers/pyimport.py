"""The `pyimport` provider: the server's own ipykernel, with no kernelspec installed.

It offers one kernel type, `pyimport-python3`: `python -m ipykernel_launcher` with the
interpreter running jupyverse, run as a local subprocess like a kernelspec's kernel. It is
there when ipykernel can be imported by the server.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

from ..errors import KernelspecNotFound
from ..kernel_driver.kernelspec import KernelSpec
from ..kernel_server.base import ServedKernel
from ..launchers import KernelRequest, LocalLauncher
from .base import KernelProvider, KernelType, ProviderContext

logger = logging.getLogger(__name__)

KERNEL_NAME = "pyimport-python3"


def _ipykernel_dir() -> Path | None:
    try:
        found = importlib.util.find_spec("ipykernel")
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def own_kernelspec(name: str = KERNEL_NAME) -> KernelSpec | None:
    """The kernelspec of the server's own ipykernel, if it has one."""
    package = _ipykernel_dir()
    if package is None:
        return None
    resources = package / "resources"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return KernelSpec(
        name=name,
        resource_dir=resources if resources.is_dir() else package,
        argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        display_name=f"Python {version} (jupyverse's ipykernel)",
        language="python",
        metadata={"debugger": True, "fps_kernels": {"provider": "pyimport"}},
    )


class PyImportProvider(KernelProvider):
    def __init__(self, context: ProviderContext) -> None:
        super().__init__(context)
        self._launcher = LocalLauncher(context.config)
        self._spec = own_kernelspec()
        if self._spec is None:
            logger.warning("pyimport provider: ipykernel cannot be imported, no kernel offered")

    async def kernelspecs(self) -> dict[str, KernelType]:
        if self._spec is None:
            return {}
        return {KERNEL_NAME: KernelType.from_kernelspec(self._spec)}

    async def launch(self, request: KernelRequest) -> ServedKernel:
        if self._spec is None or request.kernel_name.lower() != KERNEL_NAME:
            raise KernelspecNotFound(request.kernel_name)
        return await self._launcher.launch_spec(self._spec, request)
