"""ClientMailbox: one client's mailbox of kernel messages, and the socket that drains it.

A client is known by its session_id. Its mailbox outlives its WebSocket: when the socket
drops, what the kernel says to the client keeps being queued (bounded in bytes and time), and a
new socket with the same session_id receives it, in order, before anything live.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..kernel_driver.wire import pack
from .close_codes import CloseCode
from .messages import KernelMessage, notice
from .transport import write_never_waits

logger = logging.getLogger(__name__)

Protocol = Literal["v1", "legacy"]

# Small and needed to finish a cell: never dropped, whatever the bound.
_KEPT_TYPES = frozenset({"status", "execute_reply", "input_request", "kernel_info_reply"})


class StreamRun:
    """Consecutive stream messages of one parent and name, merged while the client is behind."""

    __slots__ = ("first", "name", "texts", "size", "sealed")

    def __init__(self, first: KernelMessage, name: str, text: str) -> None:
        self.first = first
        self.name = name
        self.texts = [text]
        self.size = first.size()
        self.sealed = False

    def add(self, text: str) -> int:
        self.texts.append(text)
        added = len(text.encode())
        self.size += added
        return added

    def render(self) -> KernelMessage:
        if len(self.texts) == 1:
            return self.first
        header, parent, metadata, _content = self.first.parts
        content = pack({"name": self.name, "text": "".join(self.texts)})
        return KernelMessage(self.first.channel, [header, parent, metadata, content], [])


class DropNotice:
    """Stands where output was dropped; tells the client how much when its turn comes."""

    __slots__ = ("count", "parent_header")
    size = 256

    def __init__(self, parent_header: dict[str, Any]) -> None:
        self.count = 0
        self.parent_header = parent_header


_Item = KernelMessage | StreamRun | DropNotice


class ClientMailbox:
    """The mailbox of one client (session_id), and its current WebSocket if it has one."""

    def __init__(self, session_id: str, max_queue_bytes: int, notice_session: str) -> None:
        self.session_id = session_id
        self.max_queue_bytes = max_queue_bytes
        self._notice_session = notice_session
        self.websocket: WebSocket | None = None
        self.protocol: Protocol = "v1"
        self._queue: deque[_Item] = deque()
        self._queued_bytes = 0
        # The head of the queue while a socket writes it: it leaves the queue only once the
        # write returned, and nothing is merged into it meanwhile (what was written is final).
        self._in_flight: _Item | None = None
        # One writer at a time: a replaced socket's writer may still be in a write.
        self._writing = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._close_with: tuple[int, str] | None = None
        self._done = asyncio.Event()
        self._done.set()
        self.expiry: asyncio.TimerHandle | None = None
        # Whether a write to the socket would complete at once (None: not known), and
        # whether one was made in this turn of the event loop (see _write).
        self._writable: Callable[[], bool] | None = None
        self._wrote_this_turn = False

    @property
    def online(self) -> bool:
        return self.websocket is not None

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def first_unsent_iopub(self) -> str | None:
        """The msg_id of the oldest iopub message still queued (not written to a socket)."""
        for item in self._queue:
            message = item.first if isinstance(item, StreamRun) else item
            if isinstance(message, KernelMessage) and message.channel == "iopub":
                msg_id = message.header.get("msg_id")
                if isinstance(msg_id, str):
                    return msg_id
        return None

    def unsent_replies(self) -> list[KernelMessage]:
        """The messages of shell, control and stdin still queued (not written to a socket),
        oldest first: what a kernel's keeper keeps for the client over a server restart."""
        return [m for m in self._queue if isinstance(m, KernelMessage) and m.channel != "iopub"]

    # --- filling the mailbox (never waits) -------------------------------------------------

    def send(self, message: KernelMessage) -> None:
        if not self._queue:
            if not self._write_now(message):
                self._append(message, message.size())
            return
        msg_type = message.msg_type
        if msg_type == "stream" and self._merge(message):
            return
        size = message.size()
        if self._queued_bytes + size > self.max_queue_bytes and msg_type not in _KEPT_TYPES:
            self._drop(message)
            return
        self._append(message, size)

    def _append(self, item: _Item, size: int) -> None:
        self._queue.append(item)
        self._queued_bytes += size
        self._ready.set()

    def _merge(self, message: KernelMessage) -> bool:
        """Fold a stream message into the last queued one of the same parent and name."""
        last = self._queue[-1]
        if isinstance(last, DropNotice) or last is self._in_flight:
            return False
        base = last.first if isinstance(last, StreamRun) else last
        if base.msg_type != "stream" or (isinstance(last, StreamRun) and last.sealed):
            return False
        if base.parent_msg_id != message.parent_msg_id:
            return False
        content = _stream_content(message)
        if content is None:
            return False
        name, text = content
        if isinstance(last, StreamRun):
            if last.name != name:
                return False
            run = last
        else:
            first = _stream_content(last)
            if first is None or first[0] != name:
                return False
            run = StreamRun(last, name, first[1])
            self._queue[-1] = run
        added = len(text.encode())
        if self._queued_bytes + added > self.max_queue_bytes:
            self._drop(message)
            return True
        self._queued_bytes += run.add(text)
        return True

    def _drop(self, message: KernelMessage) -> None:
        last = self._queue[-1]
        if not isinstance(last, DropNotice) or last is self._in_flight:
            last = DropNotice(message.parent_header)
            self._append(last, last.size)
        last.count += 1

    def _write_now(self, message: KernelMessage) -> bool:
        """Write to the socket here and now, without the writer task's turn, when the
        mailbox is empty and the write cannot wait; False when it must be queued instead."""
        websocket = self.websocket
        if (
            websocket is None
            or self._writable is None
            or self._wrote_this_turn
            or self._close_with is not None
            or self._writing.locked()
            or not self._writable()
        ):
            return False
        write = self._write(websocket, message)
        try:
            write.send(None)
        except StopIteration:
            return True
        except Exception as error:
            # As when the writer's write fails: the message waits for the next socket, and
            # the receive side notices and cleans up.
            if isinstance(error, (WebSocketDisconnect, OSError, RuntimeError)):
                logger.debug("Stopped writing to client %s: %r", self.session_id, error)
            else:
                logger.exception("Stopped writing to client %s", self.session_id)
            self.websocket = None
            self._ready.set()
            return False
        # It waits after all, so it wrote nothing: the writer sends the message.
        write.close()
        return False

    # --- draining it into a socket ---------------------------------------------------------

    def attach(self, websocket: WebSocket, protocol: Protocol) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.websocket = websocket
        self.protocol = protocol
        self._writable = write_never_waits(websocket)
        self._close_with = None
        self._done = asyncio.Event()
        self._ready.set()

    def detach(self, websocket: WebSocket) -> None:
        if self.websocket is websocket:
            self.websocket = None
            self._ready.set()

    async def run(self, websocket: WebSocket) -> None:
        """Drain the mailbox into `websocket` until it goes away, is replaced or closed."""
        done = self._done
        self._writer = asyncio.current_task()
        try:
            while self.websocket is websocket:
                await self._ready.wait()
                self._ready.clear()
                while self._queue and self.websocket is websocket:
                    async with self._writing:
                        if self.websocket is websocket and self._queue:
                            await self._write_head(websocket)
                    # A write to a connection the peer reset goes nowhere, silently, until
                    # asyncio runs connection_lost on a later turn of the loop; uvicorn's send
                    # returns without yielding meanwhile. Yield, so that the next write raises
                    # (and its message stays queued) instead of draining the mailbox away.
                    await asyncio.sleep(0)
                if self._close_with is not None and self.websocket is websocket:
                    code, reason = self._close_with
                    await websocket.close(code=code, reason=reason)
                    return
        except (WebSocketDisconnect, OSError, RuntimeError) as error:
            # The socket closed under us; the receive side notices and cleans up.
            logger.debug("Stopped writing to client %s: %r", self.session_id, error)
        finally:
            if self.websocket is websocket:
                self.websocket = None
            if self._writer is asyncio.current_task():
                self._writer = None
            done.set()

    async def _write_head(self, websocket: WebSocket) -> None:
        """Write the oldest item; it leaves the mailbox only if the write went through.

        A write that fails or is cancelled (the socket died, or was detached meanwhile)
        leaves it first in line for the next socket of this client: uvicorn either hands a
        frame whole to the transport or raises before writing any of it.
        """
        item = self._queue[0]
        self._in_flight = item
        try:
            if isinstance(item, KernelMessage):
                message = item
            elif isinstance(item, StreamRun):
                message = item.render()
            else:
                message = self._drop_notice(item)
            await self._write(websocket, message)
        finally:
            self._in_flight = None
        self._queue.popleft()
        self._queued_bytes -= item.size() if isinstance(item, KernelMessage) else item.size
        if isinstance(item, DropNotice):
            logger.warning("Client %s: %s", self.session_id, _content_text(message))

    async def _write(self, websocket: WebSocket, message: KernelMessage) -> None:
        if not self._wrote_this_turn:
            # A write to a connection the peer reset goes nowhere, silently, until asyncio
            # runs connection_lost on a later turn of the loop: no two writes in one turn.
            self._wrote_this_turn = True
            asyncio.get_running_loop().call_soon(self._next_turn)
        if self.protocol == "v1":
            await websocket.send_bytes(message.v1_frame())
            return
        frame = message.legacy_frame()
        if isinstance(frame, str):
            await websocket.send_text(frame)
        else:
            await websocket.send_bytes(frame)

    def _next_turn(self) -> None:
        self._wrote_this_turn = False

    def _drop_notice(self, dropped: DropNotice) -> KernelMessage:
        return notice(
            f"{dropped.count} output message(s) were dropped for this client: it could not "
            f"keep up, and more than {self.max_queue_bytes} bytes were waiting for it.",
            self._notice_session,
            dropped.parent_header,
        )

    async def close(
        self, code: int = CloseCode.NORMAL, reason: str = "", flush_timeout: float = 2.0
    ) -> None:
        """Send what is queued, then close the socket with `code`."""
        if self.expiry is not None:
            self.expiry.cancel()
        if self.websocket is None:
            return
        self._close_with = (code, reason)
        self._ready.set()
        try:
            await asyncio.wait_for(self._done.wait(), flush_timeout)
        except asyncio.TimeoutError:
            logger.info("Client %s did not take its last messages in time", self.session_id)
            self.websocket = None

    async def replace(self, code: int, reason: str) -> None:
        """Close the current socket (a newer one takes over this mailbox)."""
        websocket = self.websocket
        if websocket is None:
            return
        self.websocket = None
        self._ready.set()
        if self._writer is not None:
            # It may wait on a stalled socket with a message in hand: that message stays
            # queued for the new socket.
            self._writer.cancel()
        try:
            # A dropped peer whose socket the server has not seen die yet can keep the close
            # waiting for a drain that never comes: the newer socket does not wait on it.
            await asyncio.wait_for(websocket.close(code=code, reason=reason), 2.0)
        except (WebSocketDisconnect, OSError, RuntimeError, asyncio.TimeoutError) as error:
            logger.debug("Stale socket of client %s was already gone: %r", self.session_id, error)


def _content_text(message: KernelMessage) -> str:
    content = _stream_content(message)
    return content[1].strip() if content else ""


def _stream_content(message: KernelMessage) -> tuple[str, str] | None:
    try:
        content = json.loads(message.parts[3])
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    name, text = content.get("name"), content.get("text")
    if not isinstance(name, str) or not isinstance(text, str):
        return None
    return name, text
