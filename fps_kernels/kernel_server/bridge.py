"""ClientBridge: the WebSocket side of a served kernel.

It accepts the clients' WebSockets, keeps every client's mailbox (which outlives its socket
for offline_buffer_seconds), decodes what clients send, filters it and sends it to the
kernel, remembering who asked what: the replies on shell, control and stdin go back to the
connection whose request caused them, never to a client named by ids in a message (which any
client can write).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import zmq
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..kernel_driver.channel import KernelChannel
from ..kernel_driver.tasks import BackgroundTasks
from .close_codes import CloseCode
from .framing import (
    V1_SUBPROTOCOL,
    ClientMessage,
    FrameError,
    decode_legacy_binary,
    decode_legacy_text,
    decode_v1,
)
from .mailbox import ClientMailbox, Protocol
from .messages import KernelMessage
from .readiness import ReadinessState
from .settings import ServerSettings
from .transport import allow_large_messages, compress_small_messages_only

logger = logging.getLogger(__name__)

CLIENT_CHANNELS = ("shell", "control", "stdin")
_ROUTES_KEPT = 8192
# Larger messages go uncompressed even when the client offered permessage-deflate.
_COMPRESS_UP_TO = 1024 * 1024


class ClientBridge:
    """The clients of one kernel, and the way between their WebSockets and its channel."""

    def __init__(
        self,
        kernel_id: str,
        settings: ServerSettings,
        channel: KernelChannel[KernelMessage],
        readiness: ReadinessState,
    ) -> None:
        self.kernel_id = kernel_id
        self.settings = settings
        self.channel = channel
        self.readiness = readiness
        # Message filters on what clients send: blocked and allowed are exclusive.
        self.blocked_messages: list[str] = []
        self.allowed_messages: list[str] | None = None
        self.clients: dict[str, ClientMailbox] = {}
        self._routes: OrderedDict[str, str] = OrderedDict()  # request msg_id → client session
        # Clients of a kernel taken back after a server restart: the replies to their
        # requests sent before it have no route, and go by the request's session instead.
        self._clients_before: frozenset[str] = frozenset()
        #: Called when the set of mailboxes changes (a new client, a forgotten one).
        self.on_change: Callable[[], None] | None = None
        self._tasks = BackgroundTasks(f"Kernel {kernel_id}")

    @property
    def connections(self) -> int:
        return sum(1 for client in self.clients.values() if client.online)

    # --- to the clients --------------------------------------------------------------------

    def broadcast(self, message: KernelMessage) -> None:
        for client in tuple(self.clients.values()):
            client.send(message)

    def reply(self, channel: str, parent_id: str, message: KernelMessage) -> None:
        """Give a reply to the connection that sent its request (if it is still known)."""
        if channel == "stdin":
            session_id = self._routes.get(parent_id)
        else:
            session_id = self._routes.pop(parent_id, None)
        if session_id is None and self._clients_before:
            session = message.parent_header.get("session")
            if session in self._clients_before:
                session_id = session
        if session_id is not None:
            requester = self.clients.get(session_id)
            if requester is not None:
                requester.send(message)

    def expect(self, session_ids: Iterable[str]) -> None:
        """Mailboxes for the clients a server had before its restart, offline (they expire as
        any offline mailbox), so that a client back with its session_id gets what the kernel
        said meanwhile, and the replies to its requests sent before."""
        loop = asyncio.get_running_loop()
        expected = []
        for session_id in session_ids:
            if session_id in self.clients:
                continue
            client = ClientMailbox(
                session_id, self.settings.max_client_queue_bytes, self.channel.session
            )
            client.expiry = loop.call_later(
                self.settings.offline_buffer_seconds, self._forget, client
            )
            self.clients[session_id] = client
            expected.append(session_id)
        self._clients_before = self._clients_before | frozenset(expected)

    def changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                logger.exception("Kernel %s: the clients_changed hook failed", self.kernel_id)

    async def close_clients(self, code: int, reason: str) -> None:
        clients = list(self.clients.values())
        self.clients.clear()
        results = await asyncio.gather(
            *(client.close(code, reason) for client in clients), return_exceptions=True
        )
        for client, result in zip(clients, results, strict=True):
            if isinstance(result, Exception):
                logger.warning(
                    "Kernel %s: closing client %s failed",
                    self.kernel_id,
                    client.session_id,
                    exc_info=result,
                )
        await self._tasks.cancel_all()

    # --- from the clients ------------------------------------------------------------------

    async def serve(self, websocket: WebSocket, session_id: str) -> None:
        """Accept `websocket` and bridge it to the kernel until either side goes away."""
        offered = websocket.scope.get("subprotocols") or []
        protocol: Protocol = "v1" if V1_SUBPROTOCOL in offered else "legacy"
        client = self.clients.get(session_id)
        if client is None:
            client = ClientMailbox(
                session_id, self.settings.max_client_queue_bytes, self.channel.session
            )
            self.clients[session_id] = client
            self.changed()
        elif client.online:
            logger.info("Kernel %s: replacing stale connection %s", self.kernel_id, session_id)
            await client.replace(
                CloseCode.NORMAL, "Replaced by a newer connection with the same session_id"
            )
        elif client.queued_bytes:
            logger.info(
                "Kernel %s: client %s is back, replaying %d bytes it missed",
                self.kernel_id,
                session_id,
                client.queued_bytes,
            )
        await websocket.accept(subprotocol=V1_SUBPROTOCOL if protocol == "v1" else None)
        allow_large_messages(websocket, self.settings.max_message_bytes)
        compress_small_messages_only(websocket, _COMPRESS_UP_TO)
        client.attach(websocket, protocol)
        writer = self._tasks.spawn(client.run(websocket), f"the writer of client {session_id}")
        logger.info(
            "Kernel %s: client %s connected (%s protocol)", self.kernel_id, session_id, protocol
        )
        try:
            await self._receive_from(websocket, client, protocol)
        finally:
            client.detach(websocket)
            writer.cancel()
            if not client.online and self.clients.get(session_id) is client:
                client.expiry = asyncio.get_running_loop().call_later(
                    self.settings.offline_buffer_seconds, self._forget, client
                )
            logger.info("Kernel %s: client %s disconnected", self.kernel_id, session_id)

    def _forget(self, client: ClientMailbox) -> None:
        """Drop the mailbox of a client that did not come back in time."""
        if self.clients.get(client.session_id) is client and not client.online:
            del self.clients[client.session_id]
            self.changed()
            if client.queued_bytes:
                logger.info(
                    "Kernel %s: discarded %d bytes buffered for client %s, which did not return",
                    self.kernel_id,
                    client.queued_bytes,
                    client.session_id,
                )

    async def _receive_from(
        self, websocket: WebSocket, client: ClientMailbox, protocol: Protocol
    ) -> None:
        receive = websocket.receive
        while client.websocket is websocket:
            try:
                event = await receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if event["type"] == "websocket.disconnect":
                if event.get("code") == CloseCode.MESSAGE_TOO_BIG:
                    logger.warning(
                        "Kernel %s: client %s sent a message over %d bytes (max_message_bytes)",
                        self.kernel_id,
                        client.session_id,
                        self.settings.max_message_bytes,
                    )
                return
            try:
                message = _decode(protocol, event)
            except FrameError as error:
                logger.warning(
                    "Kernel %s: ignored a malformed frame from client %s: %s",
                    self.kernel_id,
                    client.session_id,
                    error,
                )
                continue
            except Exception:
                # A kind of bad frame framing does not know yet: still one client's frame,
                # not a reason to end its connection.
                logger.exception(
                    "Kernel %s: ignored a frame from client %s that could not be decoded",
                    self.kernel_id,
                    client.session_id,
                )
                continue
            await self._forward(client, message)

    async def _forward(self, client: ClientMailbox, message: ClientMessage) -> None:
        channel = message.channel
        msg_type = message.header.get("msg_type", "")
        if channel not in CLIENT_CHANNELS:
            logger.warning(
                "Kernel %s: client %s may not send on channel %r (%s dropped)",
                self.kernel_id,
                client.session_id,
                channel,
                msg_type,
            )
            return
        if (self.blocked_messages and msg_type in self.blocked_messages) or (
            self.allowed_messages is not None and msg_type not in self.allowed_messages
        ):
            logger.info("Kernel %s: filtered out a %s from a client", self.kernel_id, msg_type)
            return
        if not self.readiness.accepting:
            try:
                await asyncio.wait_for(
                    self.readiness.wait_accepting(), self.settings.startup_timeout
                )
            except asyncio.TimeoutError:
                logger.warning(
                    "Kernel %s: dropped a %s (kernel not ready)", self.kernel_id, msg_type
                )
                return
            if not self.channel.is_open:
                logger.info("Kernel %s: dropped a %s (no longer served)", self.kernel_id, msg_type)
                return
        if msg_type.endswith("_request") and not self._route(client, message, msg_type):
            return
        try:
            await self.channel.send_parts(channel, message.parts, message.buffers)
        except zmq.ZMQError as error:
            logger.warning("Kernel %s: could not send a %s: %s", self.kernel_id, msg_type, error)

    def _route(self, client: ClientMailbox, message: ClientMessage, msg_type: str) -> bool:
        """Remember who asked, so that the reply goes to that connection only. A request
        reusing the msg_id of a pending request of someone else's (every client sees msg_ids
        on iopub) would steal its reply: it is dropped instead."""
        msg_id = message.header.get("msg_id")
        if not isinstance(msg_id, str):
            return True
        owner = self._routes.get(msg_id)
        if (owner is not None and owner != client.session_id) or self.channel.is_ours(msg_id):
            logger.warning(
                "Kernel %s: dropped a %s from client %s: its msg_id %s is taken by a pending "
                "request of another client",
                self.kernel_id,
                msg_type,
                client.session_id,
                msg_id,
            )
            return False
        self._routes[msg_id] = client.session_id
        if len(self._routes) > _ROUTES_KEPT:
            self._routes.popitem(last=False)
        return True


def _decode(protocol: Protocol, event: Mapping[str, Any]) -> ClientMessage:
    data = event.get("bytes")
    text = event.get("text")
    if protocol == "v1":
        if data is None:
            raise FrameError("text frame on a v1 connection (v1 frames are binary)")
        return decode_v1(data)
    if data is not None:
        return decode_legacy_binary(data)
    if text is None:
        raise FrameError("empty frame")
    return decode_legacy_text(text)
