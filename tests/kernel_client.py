"""A WebSocket client of the kernel channels, speaking v1 or the legacy protocol."""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

V1 = "v1.kernel.websocket.jupyter.org"


@dataclass
class Msg:
    channel: str
    header: dict[str, Any]
    parent_header: dict[str, Any]
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[bytes] = field(default_factory=list)

    @property
    def msg_type(self) -> str:
        return str(self.header["msg_type"])

    @property
    def parent_id(self) -> str | None:
        return self.parent_header.get("msg_id")


def make_msg(
    msg_type: str, content: dict[str, Any], session: str, channel: str = "shell"
) -> dict[str, Any]:
    return {
        "channel": channel,
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": session,
            "username": "test",
            "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
            "version": "5.4",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
    }


def encode_v1(msg: dict[str, Any], buffers: list[bytes] = ()) -> bytes:  # type: ignore[assignment]
    return pack_v1(
        [msg["channel"].encode()]
        + [json.dumps(msg[k]).encode() for k in ("header", "parent_header", "metadata", "content")]
        + list(buffers)
    )


def pack_v1(pieces: list[bytes]) -> bytes:
    """A v1 frame of its pieces (channel, header, parent_header, metadata, content, buffers)."""
    count = len(pieces) + 1
    offsets = [8 * (count + 1)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return struct.pack(f"<{count + 1}Q", count, *offsets) + b"".join(pieces)


def decode_v1(frame: bytes) -> Msg:
    (count,) = struct.unpack_from("<Q", frame)
    offsets = struct.unpack_from(f"<{count}Q", frame, 8)
    pieces = [frame[offsets[i] : offsets[i + 1]] for i in range(count - 1)]
    channel = pieces[0].decode()
    header, parent, metadata, content = (json.loads(p) for p in pieces[1:5])
    return Msg(channel, header, parent, metadata, content, list(pieces[5:]))


def encode_legacy_binary(msg: dict[str, Any], buffers: list[bytes]) -> bytes:
    body = json.dumps(msg).encode()
    nbufs = len(buffers) + 1
    offsets = [4 * (nbufs + 1)]
    offsets.append(offsets[0] + len(body))
    for buffer in buffers[:-1]:
        offsets.append(offsets[-1] + len(buffer))
    return struct.pack(f">{nbufs + 1}I", nbufs, *offsets) + body + b"".join(buffers)


def decode_legacy(frame: bytes | str) -> Msg:
    if isinstance(frame, str):
        data = json.loads(frame)
        buffers: list[bytes] = []
    else:
        (nbufs,) = struct.unpack_from(">I", frame)
        offsets = list(struct.unpack_from(f">{nbufs}I", frame, 4)) + [len(frame)]
        data = json.loads(frame[offsets[0] : offsets[1]])
        buffers = [frame[offsets[i] : offsets[i + 1]] for i in range(1, nbufs)]
    return Msg(
        data["channel"],
        data["header"],
        data["parent_header"],
        data["metadata"],
        data["content"],
        buffers,
    )


class KernelClient:
    def __init__(self, ws: ClientConnection, session_id: str, protocol: str) -> None:
        self.ws = ws
        self.session_id = session_id
        self.protocol = protocol
        self.received: list[Msg] = []

    @classmethod
    async def connect(
        cls,
        ws_url: str,
        kernel_id: str,
        protocol: str = "v1",
        session_id: str | None = None,
        token: str | None = None,
        **kwargs: Any,
    ) -> KernelClient:
        session_id = session_id or uuid.uuid4().hex
        url = f"{ws_url}/api/kernels/{kernel_id}/channels?session_id={session_id}"
        if token:
            url += f"&token={token}"
        # a generous opening handshake: the server may be busy starting kernels
        kwargs.setdefault("open_timeout", 30)
        ws = await connect(
            url,
            subprotocols=[V1] if protocol == "v1" else None,  # type: ignore[list-item]
            max_size=None,
            **kwargs,
        )
        return cls(ws, session_id, protocol)

    async def send(self, msg: dict[str, Any], buffers: list[bytes] | None = None) -> None:
        if self.protocol == "v1":
            await self.ws.send(encode_v1(msg, buffers or []))
        elif buffers:
            await self.ws.send(encode_legacy_binary(msg, buffers))
        else:
            await self.ws.send(json.dumps(msg))

    async def request(self, msg_type: str, content: dict[str, Any], channel: str = "shell") -> str:
        msg = make_msg(msg_type, content, self.session_id, channel)
        await self.send(msg)
        return str(msg["header"]["msg_id"])

    async def execute(self, code: str, **content: Any) -> str:
        body = {"code": code, "silent": False, "store_history": True, "allow_stdin": False}
        body.update(content)
        return await self.request("execute_request", body)

    async def receive(self, timeout: float = 30) -> Msg:
        with anyio.fail_after(timeout):
            frame = await self.ws.recv()
        msg = decode_v1(frame) if self.protocol == "v1" else decode_legacy(frame)  # type: ignore[arg-type]
        self.received.append(msg)
        return msg

    async def until(self, predicate: Any, timeout: float = 30) -> list[Msg]:
        """Receive until a message matches; returns all received, the match last."""
        got: list[Msg] = []
        with anyio.fail_after(timeout):
            while True:
                msg = await self.receive(timeout)
                got.append(msg)
                if predicate(msg):
                    return got

    async def until_closed(self, timeout: float = 30) -> tuple[list[Msg], int | None]:
        """Receive until the server closes the connection: all received meanwhile, and the
        close code it sent (None without a close frame). A message late by `timeout` fails."""
        got: list[Msg] = []
        try:
            while True:
                got.append(await self.receive(timeout))
        except ConnectionClosed as closed:
            return got, closed.rcvd.code if closed.rcvd is not None else None

    async def until_idle(self, parent_id: str, timeout: float = 30) -> list[Msg]:
        return await self.until(
            lambda m: (
                m.msg_type == "status"
                and m.parent_id == parent_id
                and m.content.get("execution_state") == "idle"
            ),
            timeout,
        )

    async def run(self, code: str, timeout: float = 30) -> tuple[list[Msg], str]:
        """Execute code; the messages up to its idle status, and the stdout text."""
        msg_id = await self.execute(code)
        msgs = await self.until_idle(msg_id, timeout)
        stdout = "".join(
            m.content["text"]
            for m in msgs
            if m.msg_type == "stream" and m.parent_id == msg_id and m.content["name"] == "stdout"
        )
        return msgs, stdout

    async def close(self) -> None:
        await self.ws.close()


@asynccontextmanager
async def connected(
    ws_url: str, kernel_id: str, *args: Any, **kwargs: Any
) -> AsyncIterator[KernelClient]:
    """A client of the kernel's channels (KernelClient.connect's arguments), closed after."""
    client = await KernelClient.connect(ws_url, kernel_id, *args, **kwargs)
    try:
        yield client
    finally:
        await client.close()


async def run_once(ws_url: str, kernel_id: str, code: str, timeout: float = 30) -> str:
    """Connects, executes `code` and disconnects: the stdout of the run."""
    async with connected(ws_url, kernel_id) as client:
        _msgs, stdout = await client.run(code, timeout)
    return stdout
