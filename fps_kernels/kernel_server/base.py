"""What the registry and the routes use of a served kernel, wherever the kernel runs.

`KernelServer` (a kernel reached over ZMQ) satisfies it, and so does the gateway provider's
`GatewayKernel` (a kernel in a Jupyter Kernel Gateway or Enterprise Gateway, reached over
HTTP and a WebSocket). A third-party provider may serve kernels of its own kind with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .activity import KernelActivity

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from ..kernel_driver.kernelspec import KernelSpec


@runtime_checkable
class ServedKernel(Protocol):
    """One kernel served at /api/kernels/{kernel_id}."""

    kernel_id: str
    kernel_name: str
    #: The local kernelspec it was started from; None for kernels that run elsewhere.
    kernelspec: KernelSpec | None
    #: Execution state, last activity and the reason of the last state change.
    activity: KernelActivity

    @property
    def connections(self) -> int:
        """The WebSocket clients connected to it through this server."""
        ...

    @property
    def owns_process(self) -> bool:
        """Whether this server launched the kernel's process (and so may signal it)."""
        ...

    async def serve(
        self,
        websocket: WebSocket,
        session_id: str,
        permissions: dict[str, list[str]] | None = None,
    ) -> None:
        """Accept `websocket` and bridge it to the kernel until either side goes away."""
        ...

    async def interrupt(self) -> None:
        """Interrupt what the kernel runs (as its kernelspec's interrupt_mode says, or where
        it runs)."""
        ...

    async def restart(self) -> None:
        """Restart the kernel under the same id; KernelsError subclasses say why it cannot."""
        ...

    async def terminate(self) -> None:
        """Shut the kernel down where it runs, before it stops being served (a DELETE): a
        gateway's DELETE, a shutdown_request to a kernel whose process is not ours. Nothing
        for a process this server launched: `stop()` shuts it down."""
        ...

    async def stop(self, notice: str | None = None) -> None:
        """Stop serving it (shutting it down if this server launched it); tell clients
        `notice` if given, then close their sockets."""
        ...
