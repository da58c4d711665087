"""Uses upstream's Python API from inside the server: kernels added to the public registry.

One kernel is added while the app starts, another a moment after it has started.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from asphalt.core import Component, Context, context_teardown

from fps_kernels.kernel_driver.kernelspec import find_kernelspec
from fps_kernels.kernel_server.server import KernelServer, kernels


class LegacyApiComponent(Component):
    def __init__(self, **kwargs: Any) -> None:
        pass

    @context_teardown
    async def start(self, ctx: Context) -> AsyncGenerator[None, BaseException | None]:
        spec = find_kernelspec("python3")
        assert spec is not None
        before = KernelServer(kernelspec_path=str(spec.resource_dir / "kernel.json"))
        await before.start()
        kernels["legacy-before"] = {"server": before}

        async def add_later() -> None:
            await asyncio.sleep(1)
            # Attach to the first kernel's connection file, as code adopting a kernel would.
            after = KernelServer(
                connection_file=before.connection_file_path, write_connection_file=False
            )
            await after.start(launch_kernel=False)
            kernels["legacy-after"] = {"server": after, "name": "python3"}

        task = asyncio.create_task(add_later())
        yield
        task.cancel()
