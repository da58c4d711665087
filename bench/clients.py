"""Kernel clients with one interface: over the jupyverse WebSocket (v1 or legacy), direct ZMQ
through jupyter_client, or raw ZMQ (the kernel's frames read as lightly as a WebSocket client
reads the server's).

The workloads only need four operations: send a request, read the next iopub message, wait
for the reply to a request, close. Timeouts are applied by the callers around whole
operations, so that the per-message paths stay free of timer bookkeeping.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import zmq
import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

V1_SUBPROTOCOL = Subprotocol("v1.kernel.websocket.jupyter.org")
Buffer = bytes | memoryview
WsProtocol = Literal["v1", "legacy"]


@dataclass(slots=True)
class Msg:
    """A kernel message as a client sees it."""

    channel: str
    header: dict[str, Any]
    parent_header: dict[str, Any]
    content: dict[str, Any]
    buffers: list[Buffer] = field(default_factory=list)

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def parent_id(self) -> str | None:
        value = self.parent_header.get("msg_id")
        return value if isinstance(value, str) else None


def new_header(msg_type: str, session: str) -> dict[str, Any]:
    return {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "session": session,
        "username": "bench",
        "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "version": "5.4",
    }


# --- WebSocket framing (client side) -----------------------------------------------------


def v1_encode(channel: str, parts: Sequence[bytes], buffers: Sequence[Buffer]) -> bytes:
    """u64 LE count, u64 LE offsets, then channel, header, parent, metadata, content, buffers."""
    pieces: list[Buffer] = [channel.encode(), *parts, *buffers]
    count = len(pieces) + 1
    offsets = [8 * (count + 1)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return b"".join([struct.pack(f"<{count + 1}Q", count, *offsets), *pieces])


def v1_decode(frame: bytes) -> Msg:
    (count,) = struct.unpack_from("<Q", frame)
    offsets = struct.unpack_from(f"<{count}Q", frame, 8)
    # memoryview slices: a 32 MiB buffer is not copied again just to be hashed
    view = memoryview(frame)
    pieces = [view[offsets[i] : offsets[i + 1]] for i in range(count - 1)]
    header, parent, _metadata, content = (json.loads(bytes(p)) for p in pieces[1:5])
    return Msg(bytes(pieces[0]).decode(), header, parent, content, list(pieces[5:]))


def legacy_encode_binary(message: dict[str, Any], buffers: Sequence[Buffer]) -> bytes:
    """u32 BE count and offsets, the JSON message, then the buffers."""
    body = json.dumps(message).encode()
    count = len(buffers) + 1
    offsets = [4 * (count + 1), 4 * (count + 1) + len(body)]
    for buffer in buffers[:-1]:
        offsets.append(offsets[-1] + len(buffer))
    return b"".join([struct.pack(f">{count + 1}I", count, *offsets), body, *buffers])


def legacy_decode(frame: bytes | str) -> Msg:
    if isinstance(frame, str):
        data = json.loads(frame)
        buffers: list[Buffer] = []
    else:
        (count,) = struct.unpack_from(">I", frame)
        offsets = [*struct.unpack_from(f">{count}I", frame, 4), len(frame)]
        view = memoryview(frame)
        data = json.loads(bytes(view[offsets[0] : offsets[1]]))
        buffers = [view[offsets[i] : offsets[i + 1]] for i in range(1, count)]
    return Msg(data["channel"], data["header"], data["parent_header"], data["content"], buffers)


# --- the clients -------------------------------------------------------------------------


class KernelConn:
    """What the workloads use: requests out, iopub and replies in."""

    async def send(
        self, channel: str, msg_type: str, content: dict[str, Any], buffers: Sequence[Buffer] = ()
    ) -> str:
        raise NotImplementedError

    async def next_iopub(self) -> Msg:
        raise NotImplementedError

    async def reply_to(self, msg_id: str) -> Msg:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class WsConn(KernelConn):
    """One WebSocket to /api/kernels/{id}/channels; demultiplexes iopub from replies."""

    def __init__(self, ws: ClientConnection, session: str, protocol: WsProtocol) -> None:
        self.ws = ws
        self.session = session
        self.protocol = protocol
        self._iopub: deque[Msg] = deque()
        self._replies: dict[str, Msg] = {}

    @classmethod
    async def open(
        cls,
        ws_base: str,
        kernel_id: str,
        protocol: WsProtocol,
        deflate: bool,
        session: str | None = None,
    ) -> WsConn:
        session = session or uuid.uuid4().hex
        ws = await connect(
            f"{ws_base}/api/kernels/{kernel_id}/channels?session_id={session}",
            subprotocols=[V1_SUBPROTOCOL] if protocol == "v1" else None,
            compression="deflate" if deflate else None,
            max_size=None,
            open_timeout=30,
            close_timeout=5,
            # keepalive pings would only add noise to the measurements
            ping_interval=None,
        )
        if protocol == "v1" and ws.subprotocol != V1_SUBPROTOCOL:
            await ws.close()
            raise RuntimeError(f"server did not accept the v1 subprotocol ({ws.subprotocol!r})")
        return cls(ws, session, protocol)

    async def send(
        self, channel: str, msg_type: str, content: dict[str, Any], buffers: Sequence[Buffer] = ()
    ) -> str:
        header = new_header(msg_type, self.session)
        if self.protocol == "v1":
            parts = [json.dumps(p).encode() for p in (header, {}, {}, content)]
            await self.ws.send(v1_encode(channel, parts, buffers))
        else:
            message = {
                "channel": channel,
                "header": header,
                "parent_header": {},
                "metadata": {},
                "content": content,
            }
            if buffers:
                await self.ws.send(legacy_encode_binary(message, buffers))
            else:
                await self.ws.send(json.dumps(message))
        return str(header["msg_id"])

    async def _read(self) -> None:
        frame = await self.ws.recv()
        msg = v1_decode(frame) if self.protocol == "v1" else legacy_decode(frame)  # type: ignore[arg-type]
        if msg.channel == "iopub":
            self._iopub.append(msg)
        elif msg.parent_id is not None:
            self._replies[msg.parent_id] = msg

    async def next_iopub(self) -> Msg:
        while not self._iopub:
            await self._read()
        return self._iopub.popleft()

    async def reply_to(self, msg_id: str) -> Msg:
        while msg_id not in self._replies:
            await self._read()
        return self._replies.pop(msg_id)

    async def close(self) -> None:
        await self.ws.close()


class DirectConn(KernelConn):
    """A jupyter_client AsyncKernelClient: its own ZMQ sockets straight to the kernel."""

    def __init__(self, client: AsyncKernelClient) -> None:
        self.client = client
        self._replies: dict[str, Msg] = {}

    @classmethod
    def open(cls, client: AsyncKernelClient) -> DirectConn:
        # no heartbeat channel: nothing in the WebSocket ways pays for one either
        client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        return cls(client)

    async def send(
        self, channel: str, msg_type: str, content: dict[str, Any], buffers: Sequence[Buffer] = ()
    ) -> str:
        if channel != "shell":
            raise ValueError(f"the direct client only sends on shell, not {channel}")
        session = self.client.session
        msg = session.msg(msg_type, content)
        session.send(self.client.shell_channel.socket, msg, buffers=list(buffers))
        return str(msg["header"]["msg_id"])

    @staticmethod
    def _to_msg(channel: str, raw: dict[str, Any]) -> Msg:
        return Msg(
            channel, raw["header"], raw["parent_header"], raw["content"], raw.get("buffers") or []
        )

    async def next_iopub(self) -> Msg:
        return self._to_msg("iopub", await self.client.iopub_channel.get_msg(timeout=None))

    async def reply_to(self, msg_id: str) -> Msg:
        while msg_id not in self._replies:
            msg = self._to_msg("shell", await self.client.shell_channel.get_msg(timeout=None))
            if msg.parent_id is not None:
                self._replies[msg.parent_id] = msg
        return self._replies.pop(msg_id)

    async def close(self) -> None:
        self.client.stop_channels()


DELIMITER = b"<IDS|MSG>"


class RawConn(KernelConn):
    """ZMQ straight to the kernel with the least a client must do: sign what it sends, check
    the signature of what arrives, split the frames and parse the JSON parts a WebSocket
    client parses too (header, parent header, content; never metadata). The physical limit
    of a client that parses what it reads as the WebSocket ways do."""

    def __init__(self, info: dict[str, Any]) -> None:
        context = zmq.asyncio.Context.instance()
        self.session = uuid.uuid4().hex
        key = info["key"]
        self._key = key if isinstance(key, bytes) else str(key).encode()
        scheme = str(info.get("signature_scheme", "hmac-sha256"))
        self._digest = getattr(hashlib, scheme.removeprefix("hmac-"))
        base = f"{info.get('transport', 'tcp')}://{info['ip']}:"
        self.shell = context.socket(zmq.DEALER)
        self.shell.setsockopt(zmq.LINGER, 0)
        self.shell.connect(base + str(info["shell_port"]))
        self.iopub = context.socket(zmq.SUB)
        self.iopub.setsockopt(zmq.LINGER, 0)
        self.iopub.setsockopt(zmq.RCVHWM, 0)
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")
        self.iopub.connect(base + str(info["iopub_port"]))
        self._replies: dict[str, Msg] = {}

    def _sign(self, parts: Sequence[bytes]) -> bytes:
        if not self._key:
            return b""
        mac = hmac.new(self._key, digestmod=self._digest)
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode()

    def _parse(self, channel: str, frames: list[bytes]) -> Msg:
        index = frames.index(DELIMITER)
        signature, *parts = frames[index + 1 : index + 6]
        if not hmac.compare_digest(signature, self._sign(parts)):
            raise RuntimeError("a kernel message with a wrong signature")
        header, parent, _metadata, content = parts
        return Msg(
            channel,
            json.loads(header),
            json.loads(parent),
            json.loads(content),
            list(frames[index + 6 :]),
        )

    async def send(
        self, channel: str, msg_type: str, content: dict[str, Any], buffers: Sequence[Buffer] = ()
    ) -> str:
        if channel != "shell":
            raise ValueError(f"the raw ZMQ client only sends on shell, not {channel}")
        header = new_header(msg_type, self.session)
        parts = [json.dumps(p).encode() for p in (header, {}, {}, content)]
        await self.shell.send_multipart([DELIMITER, self._sign(parts), *parts, *buffers])
        return str(header["msg_id"])

    async def next_iopub(self) -> Msg:
        return self._parse("iopub", await self.iopub.recv_multipart())

    async def reply_to(self, msg_id: str) -> Msg:
        while msg_id not in self._replies:
            msg = self._parse("shell", await self.shell.recv_multipart())
            if msg.parent_id is not None:
                self._replies[msg.parent_id] = msg
        return self._replies.pop(msg_id)

    async def close(self) -> None:
        self.shell.close(linger=0)
        self.iopub.close(linger=0)
