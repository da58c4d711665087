"""KernelChannel: the ZMQ sockets to one kernel, and what travels on them.

The one place for opening a kernel's sockets (CurveZMQ, identities, reconnect pace), signing
what we send, checking what arrives (signature, then the replay guard), our own requests and
their replies, and the kernel_info handshake that says the kernel is there. The bridge
(KernelServer), the executor (KernelDriver) and one-off control requests all use it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Generic, Protocol, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from .connection import ConnectionInfo
from .signing import ReplayGuard, SignatureError, Signer
from .tasks import BackgroundTasks
from .wire import (
    WireError,
    join_frames,
    make_message_parts,
    new_session_id,
    split_frames,
    unpack_object,
)

logger = logging.getLogger(__name__)

ALL_CHANNELS = ("iopub", "shell", "control", "stdin")
#: DEALERs whose handshake is watched: a kernel's ROUTER silently drops what it sends to an
#: identity not connected yet (an input_request on stdin, for one).
LINKED_CHANNELS = ("control", "stdin")
_INFO_RETRY = 0.5
# pyzmq's own threshold (zmq.COPY_THRESHOLD): smaller frames are copied even with copy=False.
_ZERO_COPY_FROM = 65536


def watch_link(sock: zmq.asyncio.Socket) -> zmq.asyncio.Socket:
    """A PAIR socket that receives `sock`'s connection events (handshake done, disconnected).

    Its queue has no bound: libzmq's I/O thread sends the events with a blocking send, so a
    reader that falls behind must never make it wait. A unique address: pyzmq's default
    names it after the socket's fd, which a socket closed a moment ago (reaped in the
    background) may still hold.
    """
    address = f"inproc://fps-kernels-monitor-{uuid.uuid4().hex}"
    sock.monitor(address, zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    monitor = sock.context.socket(zmq.PAIR)
    monitor.setsockopt(zmq.RCVHWM, 0)
    monitor.connect(address)
    return monitor


class HandshakeError(RuntimeError):
    """The kernel did not show it is there (see the subclasses)."""


class NoAnswer(HandshakeError):
    """No kernel_info_reply, or no iopub message, before the deadline."""


class LinkFailed(HandshakeError):
    """A watched DEALER (control or stdin) did not connect before the deadline."""

    def __init__(self, channel: str) -> None:
        super().__init__(f"no connection on {channel}")
        self.channel = channel


class ProcessExited(HandshakeError):
    """The kernel's process exited during the handshake."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"the kernel exited ({returncode})")
        self.returncode = returncode


class Received(Protocol):
    """What a channel's message factory builds: anything that knows its parent's msg_id."""

    @property
    def parent_msg_id(self) -> str | None: ...


class Reply:
    """A message read no further than its parent's msg_id (what one-off requests need)."""

    __slots__ = ("channel", "parts", "buffers")

    def __init__(self, channel: str, parts: list[bytes], buffers: list[Any]) -> None:
        self.channel = channel
        self.parts = parts
        self.buffers = buffers

    @property
    def parent_msg_id(self) -> str | None:
        msg_id = unpack_object(self.parts[1]).get("msg_id")
        return msg_id if isinstance(msg_id, str) else None


M = TypeVar("M", bound=Received)
#: Builds a message from its verified parts and buffers; None drops it (it was malformed).
MessageFactory = Callable[[str, list[bytes], list[Any]], "M | None"]
#: Takes every verified message; may be a coroutine function (then awaited in order).
Handler = Callable[[str, M], "Awaitable[None] | None"]


def open_socket(
    info: ConnectionInfo, channel: str, identity: bytes | None = None, connect: bool = True
) -> zmq.asyncio.Socket:
    """A connected socket to `channel` of the kernel: SUB for iopub, else a DEALER (not
    connected yet with `connect=False`: the caller connects it to `info.url(channel)`)."""
    sock = zmq.asyncio.Context.instance().socket(zmq.SUB if channel == "iopub" else zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # The kernel binds its ports after we connect: retry fast, so that a (re)started kernel
    # is reached within milliseconds, not ZMQ's default 100 ms.
    sock.setsockopt(zmq.RECONNECT_IVL, 10)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 50)
    if channel == "iopub":
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        # We read iopub as fast as it comes; never let ZMQ drop silently.
        sock.setsockopt(zmq.RCVHWM, 0)
    else:
        sock.setsockopt(zmq.IDENTITY, identity or uuid.uuid4().hex.encode())
    if info.encrypted:
        # The kernel holds the same key pair: we are its client, its public key the server's.
        sock.curve_secretkey = info.curve_secretkey.encode()  # type: ignore[union-attr]
        sock.curve_publickey = info.curve_publickey.encode()  # type: ignore[union-attr]
        sock.curve_serverkey = info.curve_publickey.encode()  # type: ignore[union-attr]
    if connect:
        sock.connect(info.url(channel))
    return sock


class KernelChannel(Generic[M]):
    """The sockets of `channels` to one kernel, read all the time by tasks of their own.

    Every message that arrives is checked (signature, replay guard) and built by `build`;
    what it builds goes to the handler given to `open()`. shell and stdin share one ZMQ
    identity, `identity` (random unless given): the kernel sends input_request on stdin to
    the identity that sent the execute_request on shell.
    """

    def __init__(
        self,
        info: ConnectionInfo,
        build: MessageFactory[M],
        *,
        channels: Collection[str] = ALL_CHANNELS,
        name: str = "kernel",
        identity: bytes | None = None,
        session: str | None = None,
        linked: Collection[str] = LINKED_CHANNELS,
    ) -> None:
        self.info = info
        self.name = name
        self.channels = tuple(channels)
        self.identity = identity or uuid.uuid4().hex.encode()
        self.session = session or new_session_id()
        self.signer = Signer(info.key, info.signature_scheme)
        self._build = build
        self._replay_guard = ReplayGuard()
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self._linked = {c: asyncio.Event() for c in linked if c in self.channels}
        self._waiting: dict[str, asyncio.Future[M]] = {}  # our requests' msg_ids
        self._iopub_waiter: asyncio.Future[None] | None = None
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._tasks = BackgroundTasks(f"Kernel {name}")

    @property
    def is_open(self) -> bool:
        return bool(self.sockets)

    def open(self, handler: Handler[M] | None = None, later: Collection[str] = ()) -> None:
        """Connect the sockets and start reading them; `handler` gets what arrives (by
        default, only the replies to our own requests are taken). The channels in `later`
        are connected by `connect()` only."""
        for channel in self.channels:
            sock = open_socket(self.info, channel, self.identity, connect=False)
            if channel in self._linked:
                # Watched from before the connection: a running kernel answers at once.
                monitor = watch_link(sock)
                self._tasks.spawn(self._watch_link(channel, monitor), f"the {channel} monitor")
            if channel not in later:
                sock.connect(self.info.url(channel))
            self.sockets[channel] = sock
        for channel in self.channels:
            self._readers[channel] = self._tasks.spawn(
                self._read(channel, handler), f"the {channel} reader"
            )

    async def close(self) -> None:
        self._stop_monitors()  # before their readers end, see stop_monitors()
        await self._tasks.cancel_all()
        self.abort()

    def abort(self) -> None:
        """Close at once; the readers end on their own (a reader may be the caller)."""
        self._stop_monitors()
        self._tasks.cancel()
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()
        self._readers.clear()
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    def _stop_monitors(self) -> None:
        """libzmq's I/O thread writes a socket's events into its monitor with a blocking send:
        one that nobody reads any more (a reader cancelled, a full queue) blocks that thread,
        and with it every socket of the process's ZMQ context, for good. So a socket stops
        being monitored before its monitor's reader ends."""
        for channel in self._linked:
            sock = self.sockets.get(channel)
            if sock is not None and not sock.closed:
                sock.disable_monitor()

    def stop_reading(self, channel: str) -> None:
        """Take nothing more from `channel` (what is queued stays unread): what the kernel
        says there from now on is someone else's (a server letting go, its keeper)."""
        reader = self._readers.pop(channel, None)
        if reader is not None:
            reader.cancel()

    def connect(self, channels: Collection[str]) -> None:
        """Connect the sockets `open()` was told to connect later."""
        for channel in channels:
            self.sockets[channel].connect(self.info.url(channel))

    async def wait_linked(
        self, timeout: float, channels: Collection[str] | None = None
    ) -> list[str]:
        """Wait until the watched sockets (of `channels`, all by default) are connected;
        those that were not in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        late = []
        for channel, linked in self._linked.items():
            if channels is not None and channel not in channels:
                continue
            try:
                await asyncio.wait_for(linked.wait(), max(deadline - loop.time(), 0.01))
            except asyncio.TimeoutError:
                late.append(channel)
        return late

    def clear_replay_guard(self) -> None:
        """Forget the signatures seen: a restarted kernel may sign anew what it signed before."""
        self._replay_guard.clear()

    # --- receiving -------------------------------------------------------------------------

    async def _watch_link(self, channel: str, monitor: zmq.asyncio.Socket) -> None:
        linked = self._linked[channel]
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    linked.set()
                else:
                    linked.clear()
        finally:
            monitor.close(linger=0)

    async def _read(self, channel: str, handler: Handler[M] | None) -> None:
        recv = self.sockets[channel].recv_multipart
        iopub = channel == "iopub"
        while True:
            message = self.verify(channel, await recv())
            if message is None:
                continue
            if iopub and self._iopub_waiter is not None:
                if not self._iopub_waiter.done():
                    self._iopub_waiter.set_result(None)
            if handler is None:
                self.claim(message)
                continue
            result = handler(channel, message)
            if result is not None:
                await result

    def verify(self, channel: str, frames: Sequence[bytes]) -> M | None:
        """The message in `frames` if it is signed right and not replayed, else None (logged)."""
        try:
            wire = split_frames(frames)
            self.signer.check(wire.signature, wire.parts)
            self._replay_guard.check(wire.signature)
        except (WireError, SignatureError) as error:
            logger.warning("Kernel %s: dropped a %s message: %s", self.name, channel, error)
            return None
        return self._build(channel, wire.parts, wire.buffers)

    def claim(self, message: M) -> bool:
        """Whether `message` answers a request of ours (its waiter then has it)."""
        if not self._waiting:
            return False
        parent_id = message.parent_msg_id
        future = self._waiting.pop(parent_id, None) if parent_id is not None else None
        if future is None:
            return False
        if not future.done():
            future.set_result(message)
        return True

    def is_ours(self, msg_id: str) -> bool:
        return msg_id in self._waiting

    # --- sending ---------------------------------------------------------------------------

    def send_parts(
        self, channel: str, parts: Sequence[bytes], buffers: Sequence[bytes | memoryview] = ()
    ) -> Awaitable[Any]:
        """Sign and send a message's four parts and buffers; the awaitable of the ZMQ send."""
        # Zero-copy only pays for large frames: for small ones pyzmq copies anyway, after
        # building a Frame and its tracker for each.
        copy = not buffers and sum(map(len, parts)) < _ZERO_COPY_FROM
        return self.sockets[channel].send_multipart(
            join_frames(parts, buffers, self.signer), copy=copy
        )

    def compose(
        self,
        msg_type: str,
        content: dict[str, Any],
        *,
        metadata: dict[str, Any] | None = None,
        parent: dict[str, Any] | None = None,
        msg_id: str | None = None,
    ) -> tuple[str, list[bytes]]:
        """A new message of ours: its msg_id and its four parts."""
        return make_message_parts(msg_type, content, self.session, parent, metadata, msg_id)

    def post(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        reply: asyncio.Future[M] | None = None,
    ) -> str:
        """Send a message of ours without waiting; its reply, if `reply` is given, resolves it
        instead of reaching the handler. A failed send is logged."""
        msg_id, parts = self.compose(msg_type, content)
        if reply is not None:
            self._waiting[msg_id] = reply
        if channel in self.sockets:
            sent = asyncio.ensure_future(self.send_parts(channel, parts))
            sent.add_done_callback(self._log_send_failure)
        return msg_id

    def _log_send_failure(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is not None:
            logger.warning("Kernel %s: could not send a request: %s", self.name, future.exception())

    async def request(
        self, channel: str, msg_type: str, content: dict[str, Any], timeout: float
    ) -> M:
        """Send a message of ours and return its reply (asyncio.TimeoutError without one)."""
        reply: asyncio.Future[M] = asyncio.get_running_loop().create_future()
        msg_id, parts = self.compose(msg_type, content)
        self._waiting[msg_id] = reply

        async def exchange() -> M:
            # A DEALER's send waits while the kernel is not connected: under the deadline too.
            await self.send_parts(channel, parts)
            return await reply

        try:
            return await asyncio.wait_for(exchange(), timeout)
        finally:
            self._waiting.pop(msg_id, None)

    # --- the handshake ---------------------------------------------------------------------

    async def wait_kernel_info(self, timeout: float, exited: Awaitable[int] | None = None) -> M:
        """Ask kernel_info until the kernel answers on shell and an iopub message reaches us
        (a SUB socket misses what is published before its subscription reaches the kernel),
        then until the watched DEALERs are connected; the kernel_info_reply.

        NoAnswer, LinkFailed or ProcessExited (when `exited`, the process's wait, ends first).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        replied: asyncio.Future[M] = loop.create_future()
        iopub_seen: asyncio.Future[None] = loop.create_future()
        if "iopub" not in self.channels:
            iopub_seen.set_result(None)
        self._iopub_waiter = iopub_seen
        pending: list[str] = []
        process_exit = asyncio.ensure_future(exited) if exited is not None else None
        try:
            while not (replied.done() and iopub_seen.done()):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise NoAnswer(
                        f"no answer to kernel_info within {timeout:g} s ({len(pending)} asked; "
                        f"shell reply: {'yes' if replied.done() else 'no'}, iopub message: "
                        f"{'yes' if iopub_seen.done() else 'no'})"
                    )
                pending.append(self.post("shell", "kernel_info_request", {}, replied))
                waits: set[asyncio.Future[Any]] = {f for f in (replied, iopub_seen) if not f.done()}
                if process_exit is not None:
                    waits.add(process_exit)
                await asyncio.wait(
                    waits, timeout=min(_INFO_RETRY, remaining), return_when=asyncio.FIRST_COMPLETED
                )
                if process_exit is not None and process_exit.done():
                    raise ProcessExited(process_exit.result())
        finally:
            self._iopub_waiter = None
            for msg_id in pending:
                self._waiting.pop(msg_id, None)
            for future in (replied, process_exit):
                if future is not None and not future.done():
                    future.cancel()
        for channel, linked in self._linked.items():
            try:
                await asyncio.wait_for(linked.wait(), max(deadline - loop.time(), 0.1))
            except asyncio.TimeoutError:
                raise LinkFailed(channel) from None
        return replied.result()
