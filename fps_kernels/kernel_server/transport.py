"""What the WebSocket transport under starlette allows, adjusted for kernel traffic."""

from __future__ import annotations

import logging

from starlette.websockets import WebSocket

logger = logging.getLogger(__name__)


def allow_large_messages(websocket: WebSocket, max_bytes: int) -> bool:
    """Let this one connection receive messages up to `max_bytes`.

    jupyverse runs uvicorn with its default limit on incoming messages (16 MiB) and offers no
    way to change it, but kernel messages (widget state, comm buffers) can be larger. uvicorn's
    websockets-based protocols keep the limit on the connection object behind the ASGI
    `receive` callable, and read it for every frame, so raising it there affects this kernel
    socket only. With another server the limit stays what that server says.
    """
    receive = getattr(websocket, "_receive", None)
    protocol = getattr(receive, "__self__", None)
    for holder in (getattr(protocol, "conn", None), protocol):
        # websockets >= 14 (sans-I/O) calls it max_message_size; older versions max_size.
        for name in ("max_message_size", "max_size"):
            if holder is not None and isinstance(getattr(holder, name, None), int):
                setattr(holder, name, max_bytes)
                return True
    logger.debug("Cannot raise the WebSocket message size limit of %r", protocol)
    return False
