"""One client's WebSocket: its protocol, its bounded send queue and the task that drains it."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Literal

from starlette.websockets import WebSocket, WebSocketDisconnect

from .messages import KernelMessage, server_message

logger = logging.getLogger(__name__)

Protocol = Literal["v1", "legacy"]


class ClientConnection:
    """Queues what the kernel says for one client, so that a slow client never slows others.

    `send` never waits: frames are queued up to `max_queue_bytes`, and past that they are
    dropped and counted, and the client is told how many it missed.
    """

    def __init__(
        self,
        websocket: WebSocket,
        session_id: str,
        protocol: Protocol,
        max_queue_bytes: int,
        notice_session: str,
    ) -> None:
        self.websocket = websocket
        self.session_id = session_id
        self.protocol = protocol
        self.max_queue_bytes = max_queue_bytes
        self._notice_session = notice_session
        self._queue: deque[bytes | str] = deque()
        self._queued_bytes = 0
        self._dropped = 0
        self._ready = asyncio.Event()
        self._closed = False
        self._close_with: tuple[int, str] | None = None
        self._done = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, message: KernelMessage) -> None:
        if self._closed:
            return
        frame = message.v1_frame() if self.protocol == "v1" else message.legacy_frame()
        size = len(frame)
        if self._queue and self._queued_bytes + size > self.max_queue_bytes:
            self._dropped += 1
            return
        self._queue.append(frame)
        self._queued_bytes += size
        self._ready.set()

    async def run(self) -> None:
        """Drain the queue into the WebSocket until the socket goes away or is closed."""
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._queue:
                    frame = self._queue.popleft()
                    self._queued_bytes -= len(frame)
                    await self._write(frame)
                    if self._dropped and not self._queue:
                        self._notify_dropped()
                if self._close_with is not None:
                    code, reason = self._close_with
                    await self.websocket.close(code=code, reason=reason)
                    return
        except (WebSocketDisconnect, OSError, RuntimeError) as error:
            # The socket closed under us; the receive side notices and cleans up.
            logger.debug("Stopped writing to client %s: %r", self.session_id, error)
        finally:
            self._closed = True
            self._done.set()

    async def _write(self, frame: bytes | str) -> None:
        if isinstance(frame, str):
            await self.websocket.send_text(frame)
        else:
            await self.websocket.send_bytes(frame)

    def _notify_dropped(self) -> None:
        count, self._dropped = self._dropped, 0
        text = (
            f"[fps_kernels] {count} message(s) from the kernel were dropped because this client "
            f"could not keep up (more than {self.max_queue_bytes} bytes were waiting).\n"
        )
        notice = server_message(
            "iopub", "stream", {"name": "stderr", "text": text}, self._notice_session
        )
        logger.warning("Client %s: %s", self.session_id, text.strip())
        frame = notice.v1_frame() if self.protocol == "v1" else notice.legacy_frame()
        self._queue.append(frame)
        self._queued_bytes += len(frame)

    async def close(self, code: int = 1000, reason: str = "", flush_timeout: float = 2.0) -> None:
        """Send what is queued, then close the socket with `code`."""
        if self._closed or self._close_with is not None:
            return
        self._close_with = (code, reason)
        self._ready.set()
        try:
            await asyncio.wait_for(self._done.wait(), flush_timeout)
        except asyncio.TimeoutError:
            logger.info("Client %s did not take its last messages in time", self.session_id)
            self._closed = True
