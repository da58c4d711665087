"""Kernel providers: the plug-ins that offer kernel types and start kernels.

A provider is a `KernelProvider` subclass registered under the entry-point group
`fps_kernels.providers`. Built in: `spec` (kernelspecs, local subprocesses), `pyimport` (the
server's own ipykernel), `external` (connection files), `gateway` (a Jupyter Kernel Gateway or
Enterprise Gateway). The option `providers` says which are on, in order of precedence for
kernel type names; `"*"` stands for every installed provider that is not built in.
"""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from .base import KernelHost, KernelProvider, ProviderContext

if TYPE_CHECKING:
    from ..config import KernelsPluginConfig

logger = logging.getLogger(__name__)

GROUP = "fps_kernels.providers"
OTHERS = "*"
#: The built-in providers, also found without their entry points (a source checkout).
BUILTIN = {
    "spec": "fps_kernels.providers.spec:SpecProvider",
    "pyimport": "fps_kernels.providers.pyimport:PyImportProvider",
    "external": "fps_kernels.providers.external.provider:ExternalProvider",
    "gateway": "fps_kernels.gateway.provider:GatewayProvider",
}
_LOCAL_SPECS = ("spec", "pyimport")


def installed_providers() -> dict[str, EntryPoint]:
    """Every provider's entry point by name (the built-ins included)."""
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=GROUP):
        found.setdefault(entry.name, entry)
    for name, value in BUILTIN.items():
        found.setdefault(name, EntryPoint(name=name, value=value, group=GROUP))
    return found


def enabled_providers(config: KernelsPluginConfig, installed: list[str]) -> list[str]:
    """The names of the providers to use, in order, from the `providers` option."""
    names: list[str] = []
    for name in config.providers:
        if name == OTHERS:
            names += sorted(n for n in installed if n not in BUILTIN and n not in config.providers)
        else:
            names.append(name)
    names = list(dict.fromkeys(names))
    if "external" in names and not config.allow_external_kernels:
        names.remove("external")
    elif config.allow_external_kernels and "external" not in names:
        logger.warning("allow_external_kernels is on but 'external' is not in providers")
    if "gateway" in names and not config.gateway.url:
        if "providers" in config.model_fields_set and "gateway" in config.providers:
            logger.warning("The gateway provider is on, but kernels.gateway.url is not set")
        names.remove("gateway")
    if "gateway" in names and config.gateway.mode == "exclusive":
        for local in _LOCAL_SPECS:
            if local in names:
                logger.info("Gateway in exclusive mode: no %r kernel types", local)
                names.remove(local)
    return names


def load_providers(
    config: KernelsPluginConfig, host: KernelHost, root_dir: Path
) -> list[KernelProvider]:
    """One instance of each enabled provider. A provider that cannot be loaded is left out
    with a log line; bad options (ValueError) stop the server with their message."""
    installed = installed_providers()
    providers: list[KernelProvider] = []
    for name in enabled_providers(config, list(installed)):
        entry = installed.get(name)
        if entry is None:
            logger.error("No kernel provider %r is installed (entry points %s)", name, GROUP)
            continue
        try:
            kind = entry.load()
        except Exception:
            logger.exception("Kernel provider %r (%s) cannot be loaded", name, entry.value)
            continue
        if not isinstance(kind, type) or not issubclass(kind, KernelProvider):
            logger.error("Kernel provider %r (%s) is not a KernelProvider", name, entry.value)
            continue
        context = ProviderContext(
            name=name,
            config=config,
            host=host,
            options=dict(config.provider_options.get(name, {})),
            root_dir=root_dir,
        )
        try:
            providers.append(kind(context))
        except ValueError as error:
            raise ValueError(f"Kernel provider {name!r}: {error}") from error
        except Exception:
            logger.exception("Kernel provider %r could not be made", name)
            continue
        logger.info("Kernel provider %r (%s)", name, entry.value)
    return providers
