"""A Y-document client of fps-yjs's collaboration rooms, connected the way JupyterLab connects.

JupyterLab asks `PUT /api/collaboration/session/{path}` for the file's id, then opens the
WebSocket `/api/collaboration/room/{format}:{type}:{file_id}` and syncs a Y document over it
(pycrdt-websocket's WebsocketProvider here).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
from pycrdt import Array, Doc, Map
from pycrdt_websocket import WebsocketProvider
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .conftest import JupyverseServer


class _Websocket:
    """A websockets client connection, as pycrdt-websocket's Websocket protocol wants it."""

    def __init__(self, ws: ClientConnection, path: str) -> None:
        self._ws = ws
        self._path = path

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> _Websocket:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.recv()
        except ConnectionClosed:
            raise StopAsyncIteration() from None

    async def send(self, message: bytes) -> None:
        await self._ws.send(message)

    async def recv(self) -> bytes:
        message = await self._ws.recv()
        return message if isinstance(message, bytes) else message.encode()


@asynccontextmanager
async def room(server: JupyverseServer, room_id: str) -> AsyncIterator[Doc]:
    """A Y document kept in sync with the room `room_id` while in the context."""
    doc = Doc()
    url = f"{server.ws_url}/api/collaboration/room/{room_id}"
    async with AsyncExitStack() as stack:
        ws = await stack.enter_async_context(connect(url, max_size=None))
        await stack.enter_async_context(WebsocketProvider(doc, _Websocket(ws, room_id)))
        yield doc


def document_id(client: httpx.Client, path: str) -> str:
    response = client.put(
        f"/api/collaboration/session/{path}", json={"format": "json", "type": "notebook"}
    )
    assert response.status_code in (200, 201), response.text
    return f"json:notebook:{response.json()['fileId']}"


class Notebook:
    """The client's view of a shared notebook."""

    def __init__(self, doc: Doc) -> None:
        self.doc = doc
        self.cells = doc.get("cells", type=Array)
        self._subscriptions: list[Any] = []

    def cell(self, cell_id: str) -> Map:
        for ycell in self.cells:
            if ycell.get("id") == cell_id:
                return ycell
        raise AssertionError(f"no cell {cell_id} in {self.cell_ids()}")

    def cell_ids(self) -> list[str]:
        return [str(ycell.get("id")) for ycell in self.cells]

    def json(self, cell_id: str) -> dict[str, Any]:
        return json.loads(str(self.cell(cell_id)))

    def outputs(self, cell_id: str) -> list[Any]:
        return list(self.json(cell_id)["outputs"])

    def status(self, cell_id: str) -> str | None:
        return self.cell(cell_id).get("execution_status")

    def state(self, cell_id: str) -> str | None:
        """JupyterLab 4.6's `execution_state` (what draws `[*]`); None when absent."""
        return self.cell(cell_id).get("execution_state")

    def watch_state(self, cell_id: str) -> list[str | None]:
        """Every execution_state the cell takes from now on, None for a removal."""
        seen: list[str | None] = []

        def on_change(event: Any) -> None:
            change = event.keys.get("execution_state")
            if change is not None:
                seen.append(change.get("newValue"))

        self._subscriptions.append(self.cell(cell_id).observe(on_change))
        return seen

    def is_done(self, cell_id: str) -> bool:
        return self.status(cell_id) == "idle"

    def watch_status(self, cell_id: str) -> list[str]:
        """Every execution_status the cell takes from now on (the list grows)."""
        seen: list[str] = []

        def on_change(event: Any) -> None:
            change = event.keys.get("execution_status")
            if change is not None and "newValue" in change:
                seen.append(change["newValue"])

        self._subscriptions.append(self.cell(cell_id).observe(on_change))
        return seen


async def until(predicate: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    """Poll `predicate` until it is truthy; its value, or a failure after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await anyio.sleep(0.05)
