"""Who may talk to the kernels at all: the Origin and Host checks of every request.

A browser page of another origin carries the user's cookies, and a page served under a
rebound DNS name reaches a server on 127.0.0.1 with its own name in `Host`: either could run
code in a kernel. The rules are the reference server's (check_origin, check_host), with
token-authenticated requests checked too.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import HTTPException, WebSocketException
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import HTTPConnection

from .kernel_server.close_codes import CloseCode

logger = logging.getLogger(__name__)

# Methods that change nothing: a foreign page cannot read their answers (no CORS headers),
# so their Origin is not checked (their Host still is: a rebound name can read them).
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_HOST_PORT = re.compile(r"^(.*?)(:\d+)?$")


def _normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


@dataclass
class AccessRules:
    """The operator's choices: origins let in besides the server's own, and whether Host
    names other than local ones are served on a loopback address."""

    allow_origin: Iterable[str] = ()
    allow_origin_pat: str = ""
    allow_remote_access: bool = False
    local_hostnames: Iterable[str] = ("localhost",)
    _origins: frozenset[str] = field(init=False)
    _pattern: re.Pattern[str] | None = field(init=False)
    _hostnames: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        self._origins = frozenset(_normalize_origin(origin) for origin in self.allow_origin)
        self._pattern = re.compile(self.allow_origin_pat) if self.allow_origin_pat else None
        self._hostnames = frozenset(name.lower() for name in self.local_hostnames)

    def origin_refusal(self, origin: str | None, host: str | None) -> str | None:
        """Why a request with this Origin may not change anything, or None when it may."""
        if origin is None or host is None:
            # Not a browser (scripts, JupyterLab's server-side clients): nothing to forge.
            return None
        normalized = _normalize_origin(origin)
        if "*" in self._origins or normalized in self._origins:
            return None
        if urlsplit(normalized).netloc == host.strip().lower():
            return None
        if self._pattern is not None and self._pattern.match(normalized):
            return None
        return (
            f"Cross-origin request refused: Origin {origin!r} is not this server ({host!r}); "
            "an operator can allow it with kernels.allow_origin"
        )

    def host_refusal(self, host: str | None, server_address: str | None) -> str | None:
        """Why a request naming `host` may not be served on `server_address`, or None."""
        if self.allow_remote_access or host is None or not _is_loopback(server_address):
            return None
        name = _HOST_PORT.match(host.strip().lower())
        hostname = name.group(1) if name else host
        if hostname.startswith("[") and hostname.endswith("]"):
            hostname = hostname[1:-1]
        if hostname in self._hostnames or _is_loopback(hostname):
            return None
        return (
            f"Request refused: Host {host!r} is not a local name of this server, which "
            "listens on a loopback address (DNS rebinding?); an operator can allow it with "
            "kernels.allow_remote_access or kernels.local_hostnames"
        )


def _is_loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


class AccessGuard:
    """A FastAPI dependency of every kernels route, HTTP and WebSocket alike."""

    def __init__(self, rules: AccessRules) -> None:
        self.rules = rules

    async def __call__(self, connection: HTTPConnection) -> None:
        headers = connection.headers
        host = headers.get("host")
        server = connection.scope.get("server")
        refusal = self.rules.host_refusal(host, server[0] if server else None)
        is_websocket = connection.scope["type"] == "websocket"
        if refusal is None and (is_websocket or connection.scope["method"] not in _SAFE_METHODS):
            refusal = self.rules.origin_refusal(headers.get("origin"), host)
        if refusal is None:
            return
        client = connection.client
        logger.warning(
            "403 %s %s from %s: %s",
            "WebSocket" if is_websocket else connection.scope["method"],
            connection.url.path,
            client.host if client else "?",
            refusal,
        )
        if is_websocket:
            # Closing before the upgrade is accepted: the browser gets an HTTP 403.
            raise WebSocketException(code=CloseCode.POLICY_VIOLATION, reason=refusal)
        raise HTTPException(status_code=403, detail=refusal)


def cors_origins(app: Starlette) -> list[str]:
    """The origins jupyverse lets in (its `--allow-origin`, a CORSMiddleware of the app)."""
    origins: list[str] = []
    for middleware in app.user_middleware:
        if middleware.cls is CORSMiddleware:
            origins.extend(middleware.kwargs.get("allow_origins", ()))  # type: ignore[arg-type]
    return origins
