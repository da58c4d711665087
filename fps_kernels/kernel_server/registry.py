"""The registry of kernels served at /api/kernels/{id}/channels.

It is the one object of upstream's Python API that lives at module level
(`fps_kernels.kernel_server.server.kernels`): code may add a kernel to it before or after
the app starts, as `kernels[kernel_id] = {"server": kernel_server}`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..kernel_driver.connection import PortAllocator

if TYPE_CHECKING:
    from .base import ServedKernel

_ENTRY_KEYS = ("server", "name", "driver")


class KernelOrigin(Protocol):
    """What an entry knows of the provider its kernel came from (a
    `providers.base.KernelProvider`, a layer above this one)."""

    name: str
    #: Whether the registry culls its idle kernels (False: they are culled where they run).
    local_culling: bool


@dataclass
class KernelEntry:
    """A served kernel. Reads like upstream's dict entries too (`entry["server"]`)."""

    server: ServedKernel  # a KernelServer, or a kernel of another provider (a gateway's)
    name: str = ""
    # The server-side executor writing into Y documents, created on first use.
    driver: Any = None
    #: The provider it came from; None for a kernel that code put in `kernels`.
    provider: KernelOrigin | None = None
    #: Started by the registry, which so may shut it down (when its last session goes, when
    #: idle, at the server's stop); kernels it only attached to are let go, left running.
    owned: bool = False

    def __getitem__(self, key: str) -> Any:
        if key not in _ENTRY_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in _ENTRY_KEYS:
            raise KeyError(key)
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in _ENTRY_KEYS

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in _ENTRY_KEYS else default


class KernelRegistry(MutableMapping[str, KernelEntry]):
    """Kernel id → KernelEntry, plus the ports held by the kernels this process starts."""

    def __init__(self) -> None:
        self._entries: dict[str, KernelEntry] = {}
        self.ports = PortAllocator()

    def __getitem__(self, kernel_id: str) -> KernelEntry:
        return self._entries[kernel_id]

    def __setitem__(self, kernel_id: str, value: KernelEntry | Mapping[str, Any]) -> None:
        if not isinstance(value, KernelEntry):
            if "server" not in value:
                raise ValueError("a kernel entry needs a 'server'")
            server = value["server"]
            value = KernelEntry(
                server=server,
                name=str(value.get("name") or getattr(server, "kernel_name", "") or ""),
                driver=value.get("driver"),
            )
        self._entries[kernel_id] = value

    def __delitem__(self, kernel_id: str) -> None:
        del self._entries[kernel_id]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
