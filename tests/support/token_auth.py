"""A real Auth backend for the tests: a bearer token, and users with limited permissions.

`Authorization: token <t>` or `?token=<t>`; the token "reader" only has read permissions.
"""

from __future__ import annotations

from typing import Any

from asphalt.core import Component, Context
from fastapi import HTTPException, Request, WebSocket
from jupyverse_api.auth import Auth, User

_PERMISSIONS: dict[str, dict[str, list[str]]] = {
    "secret": {
        "kernels": ["read", "write", "execute"],
        "kernelspecs": ["read"],
        "sessions": ["read", "write"],
        "status": ["read"],
        "contents": ["read", "write"],
        "yjs": ["read", "write"],
    },
    "reader": {"kernels": ["read"], "kernelspecs": ["read"], "sessions": ["read"]},
}


def _token(headers: Any, query: Any) -> str:
    header = headers.get("authorization", "")
    if header.lower().startswith("token "):
        return str(header[6:].strip())
    return str(query.get("token", ""))


def _allowed(granted: dict[str, list[str]], wanted: dict[str, list[str]] | None) -> bool:
    return all(
        action in granted.get(resource, [])
        for resource, actions in (wanted or {}).items()
        for action in actions
    )


class TokenAuth(Auth):
    def current_user(self, permissions: dict[str, list[str]] | None = None) -> Any:
        async def dependency(request: Request) -> User:
            granted = _PERMISSIONS.get(_token(request.headers, request.query_params))
            if granted is None or not _allowed(granted, permissions):
                raise HTTPException(status_code=403, detail="Forbidden")
            return User(username="tester")

        return dependency

    def websocket_auth(self, permissions: dict[str, list[str]] | None = None) -> Any:
        async def dependency(
            websocket: WebSocket,
        ) -> tuple[WebSocket, dict[str, list[str]]] | None:
            granted = _PERMISSIONS.get(_token(websocket.headers, websocket.query_params))
            if granted is None:
                await websocket.close(code=1008)
                return None
            return websocket, granted

        return dependency

    async def update_user(self) -> Any:
        async def update(data: dict[str, Any]) -> User:
            return User(**data)

        return update


class TokenAuthComponent(Component):
    async def start(self, ctx: Context) -> None:
        ctx.add_resource(TokenAuth(), types=Auth)
