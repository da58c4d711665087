"""What the WebSocket transport under starlette allows, adjusted for kernel traffic."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from starlette.websockets import WebSocket
from websockets.frames import Opcode

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


class _SmallMessagesOnly:
    """Wraps a permessage-deflate extension so that only small messages are compressed.

    Compressing a large binary buffer (an image, an array) costs far more than sending it
    (zlib runs at tens of MiB/s on incompressible bytes), while small JSON messages are where
    compression pays. A message sent uncompressed (RSV1 unset) is allowed by RFC 7692 and
    leaves the compression context untouched; incoming messages are decoded as before.
    """

    def __init__(self, inner: Any, threshold: int) -> None:
        self._inner = inner
        self._threshold = threshold

    def encode(self, frame: Any) -> Any:
        if frame.fin and len(frame.data) > self._threshold and not frame.rsv1:
            # A whole data message (uvicorn never fragments): send it as it is.
            if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                return frame
        return self._inner.encode(frame)

    def decode(self, frame: Any, *, max_size: int | None = None) -> Any:
        return self._inner.decode(frame, max_size=max_size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def compress_small_messages_only(websocket: WebSocket, threshold: int) -> bool:
    """Keep permessage-deflate (when the client offered it) for messages up to `threshold`."""
    protocol = getattr(getattr(websocket, "_receive", None), "__self__", None)
    conn = getattr(protocol, "conn", None)
    extensions = getattr(conn, "extensions", None)
    if not isinstance(extensions, list):
        return False
    conn.extensions = [  # type: ignore[union-attr]
        _SmallMessagesOnly(ext, threshold)
        if getattr(ext, "name", "") == "permessage-deflate"
        else ext
        for ext in extensions
    ]
    return True


def write_never_waits(websocket: WebSocket) -> Callable[[], bool] | None:
    """A probe telling whether a send on `websocket` would complete without waiting, or None
    where that cannot be known.

    uvicorn's sans-I/O websockets protocol (jupyverse's default) awaits nothing in a send but
    its `writable` event, before writing anything: while that event is set, a send completes
    at once, and one that waits has written nothing yet.
    """
    protocol = getattr(getattr(websocket, "_receive", None), "__self__", None)
    if type(protocol).__name__ != "WebSocketsSansIOProtocol":
        return None
    writable = getattr(protocol, "writable", None)
    if writable is None or not hasattr(writable, "is_set"):
        return None
    return writable.is_set  # type: ignore[no-any-return]
