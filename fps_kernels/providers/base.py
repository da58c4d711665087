"""The interface of kernel providers: the kinds of kernel they offer, and how they start them.

A provider is a class registered under the entry-point group `fps_kernels.providers`; the
registry makes one instance of each enabled provider at start (see `providers/__init__.py`).
It lists kernel types (a name, a kernelspec model and its resource files) and starts or
attaches kernels behind `ServedKernel`, the interface the registry and the routes use.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import KernelsError, NotFound
from ..kernel_driver.kernelspec import KernelSpec
from ..kernel_server.base import ServedKernel
from ..kernel_server.registry import KernelEntry
from ..launchers import KernelRequest

if TYPE_CHECKING:
    from ..config import KernelsPluginConfig

__all__ = [
    "KernelHost",
    "KernelProvider",
    "KernelRequest",
    "KernelResource",
    "KernelType",
    "ProviderContext",
    "ServedKernel",
    "valid_kernel_name",
]

#: A kernel type name: safe in a URL path segment (no "/"), as kernelspec names are.
_VALID_NAME = re.compile(r"^[\w.\-]+$")


def valid_kernel_name(name: str) -> bool:
    return bool(_VALID_NAME.match(name))


@dataclass(frozen=True)
class KernelType:
    """A kind of kernel a provider can start: what `GET /api/kernelspecs` lists."""

    name: str
    #: The kernelspec model (kernel.json's fields: display_name, language, argv, metadata…).
    spec: dict[str, Any]
    #: Resource name (e.g. "logo-64x64") → file name, served at /kernelspecs/{name}/{file}.
    resources: dict[str, str] = field(default_factory=dict)
    #: The local kernelspec it comes from, if any.
    kernelspec: KernelSpec | None = None

    @classmethod
    def from_kernelspec(cls, spec: KernelSpec, name: str | None = None) -> KernelType:
        return cls(
            name=name or spec.name,
            spec=spec.to_dict(),
            resources={Path(file).stem: file for file in spec.resource_files()},
            kernelspec=spec,
        )


@dataclass(frozen=True)
class KernelResource:
    """A file of a kernel type: a local file, or bytes fetched from elsewhere."""

    path: Path | None = None
    content: bytes = b""
    media_type: str = "application/octet-stream"


def local_resource(spec: KernelSpec, file_name: str) -> KernelResource:
    """A file of the kernelspec's own directory; anything else is NotFound."""
    base = spec.resource_dir.resolve()
    if not file_name or any(c in file_name for c in "/\\\0") or file_name in (".", ".."):
        raise NotFound(f"No file {file_name!r} in kernelspec {spec.name}")
    candidate = (base / file_name).resolve()
    if candidate.parent != base or not candidate.is_file():
        raise NotFound(f"No file {file_name!r} in kernelspec {spec.name}")
    return KernelResource(path=candidate)


class KernelHost(Protocol):
    """What a provider may do with the registry: serve kernels it found running elsewhere,
    and stop serving kernels that went away."""

    @property
    def kernels(self) -> Mapping[str, KernelEntry]: ...

    def adopt(self, kernel_id: str, entry: KernelEntry) -> None:
        """Serve a kernel that runs elsewhere (its entry names its provider)."""
        ...

    async def detach_kernel(self, kernel_id: str, notice: str) -> None: ...


@dataclass(frozen=True)
class ProviderContext:
    """What a provider is given when it is made."""

    #: Its entry-point name, e.g. "spec" or "gateway".
    name: str
    config: KernelsPluginConfig
    host: KernelHost
    #: `kernels.provider_options[name]`: options of a third-party provider, to validate.
    options: dict[str, Any] = field(default_factory=dict)
    root_dir: Path = field(default_factory=Path.cwd)


class KernelProvider(ABC):
    """A source of kernels: lists kernel types, and starts or attaches kernels of them.

    Lifetime: `start()` once the server runs (background work: adoption, polling), `stop()`
    before the kernels are stopped (stop finding new ones), `close()` after (release what
    `start()` opened).
    """

    #: Whether the registry culls this provider's idle kernels (`cull_idle_timeout`). False
    #: for kernels whose culling belongs to where they run (a gateway culls its own).
    local_culling: bool = True

    def __init__(self, context: ProviderContext) -> None:
        self.context = context
        self.name = context.name

    async def start(self) -> None:
        """Start background work."""
        return None

    async def stop(self) -> None:
        """Stop background work; kernels are still served."""
        return None

    async def close(self) -> None:
        """Release what is left, once every kernel is stopped."""
        return None

    @abstractmethod
    async def kernelspecs(self) -> dict[str, KernelType]:
        """The kernel types it offers now, by name."""

    def claims(self, kernel_name: str) -> bool:
        """Whether `kernel_name` is in this provider's namespace even when it is not listed
        (e.g. a gateway that cannot be reached): launching it then tells why it is not."""
        return False

    def default_kernel(self) -> str | None:
        """The kernel type to start when a request names none, if the provider has a say."""
        return None

    def unusable(self, kernel_name: str) -> KernelsError | None:
        """Why `kernel_name`, which it does not list, is one of its own that cannot be used
        (e.g. a broken kernelspec), or None: asked before answering 404."""
        return None

    async def resource(self, kernel_type: KernelType, file_name: str) -> KernelResource:
        """A resource file (logo, kernel.js) of one of its kernel types."""
        if kernel_type.kernelspec is None:
            raise NotFound(f"No file {file_name!r} in kernelspec {kernel_type.name}")
        return local_resource(kernel_type.kernelspec, file_name)

    @abstractmethod
    async def launch(self, request: KernelRequest) -> ServedKernel:
        """Start (or attach to) a kernel of `request.kernel_name`, returning once it can be
        served (it may still be `starting`: its clients' messages then wait for it); raises
        a KernelsError (e.g. KernelFailed) saying why it cannot."""

    async def refresh(self) -> None:
        """Bring its kernels' state up to date before they are listed (REST)."""
        return None
