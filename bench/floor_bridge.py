"""The least a kernel WebSocket bridge can do on jupyverse's stack: the bench's `ws-floor` way.

    python bench/floor_bridge.py PORT CONNECTION_FILE

A Starlette WebSocket endpoint on uvicorn, started as asphalt-web starts jupyverse's (same
uvicorn Config, plain asyncio loop, so uvicorn's default websockets-sansio protocol), bridging
one v1 client to the kernel of CONNECTION_FILE through zmq.asyncio: it signs what the client
sends and checks the signature of what the kernel sends, and does nothing else (no JSON
parsed, no validation, no routing, no mailbox, no activity). Its round trip against raw-zmq
is the floor of any bridge on this platform: what the second process, uvicorn, websockets
and zmq.asyncio cost, with none of fps_kernels' work.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import struct
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
import zmq
import zmq.asyncio
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

DELIMITER = b"<IDS|MSG>"
V1 = "v1.kernel.websocket.jupyter.org"


class Kernel:
    def __init__(self, info: dict[str, Any]) -> None:
        self.key = str(info["key"]).encode()
        self.digest = getattr(hashlib, str(info.get("signature_scheme", "hmac-sha256"))[5:])
        self.url = f"{info.get('transport', 'tcp')}://{info['ip']}:"
        self.ports = {"shell": info["shell_port"], "iopub": info["iopub_port"]}

    def sign(self, parts: Sequence[bytes | memoryview]) -> bytes:
        mac = hmac.new(self.key, digestmod=self.digest)
        for part in parts:
            mac.update(part)
        return mac.hexdigest().encode()

    def socket(self, channel: str) -> zmq.asyncio.Socket:
        sock = zmq.asyncio.Context.instance().socket(zmq.SUB if channel == "iopub" else zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if channel == "iopub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.url + str(self.ports[channel]))
        return sock


def v1_frame(channel: bytes, pieces: Sequence[bytes]) -> bytes:
    count = len(pieces) + 2
    offsets = [8 * (count + 1), 8 * (count + 1) + len(channel)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return b"".join([struct.pack(f"<{count + 1}Q", count, *offsets), channel, *pieces])


async def to_client(
    kernel: Kernel, sock: zmq.asyncio.Socket, channel: bytes, ws: WebSocket
) -> None:
    while True:
        frames = await sock.recv_multipart()
        at = frames.index(DELIMITER)
        if hmac.compare_digest(frames[at + 1], kernel.sign(frames[at + 2 : at + 6])):
            await ws.send_bytes(v1_frame(channel, frames[at + 2 :]))


def make_app(kernel: Kernel) -> Starlette:
    async def channels(ws: WebSocket) -> None:
        await ws.accept(subprotocol=V1)
        shell, iopub = kernel.socket("shell"), kernel.socket("iopub")
        pumps = [
            asyncio.ensure_future(to_client(kernel, shell, b"shell", ws)),
            asyncio.ensure_future(to_client(kernel, iopub, b"iopub", ws)),
        ]
        try:
            while True:
                event = await ws.receive()
                if event["type"] == "websocket.disconnect":
                    return
                frame = memoryview(event["bytes"])
                (count,) = struct.unpack_from("<Q", frame)
                offsets = struct.unpack_from(f"<{count}Q", frame, 8)
                pieces = [frame[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]
                await shell.send_multipart([DELIMITER, kernel.sign(pieces[:4]), *pieces])
        finally:
            for pump in pumps:
                pump.cancel()
            shell.close(linger=0)
            iopub.close(linger=0)

    return Starlette(routes=[WebSocketRoute("/api/kernels/{kernel_id}/channels", channels)])


async def serve(port: int, connection_file: str) -> None:
    with open(connection_file) as file:
        kernel = Kernel(json.load(file))
    # What asphalt-web's start_server passes; the rest are uvicorn's defaults, as there.
    config = uvicorn.Config(
        app=make_app(kernel),
        host="127.0.0.1",
        port=port,
        use_colors=False,
        log_config=None,
        lifespan="off",
    )
    await uvicorn.Server(config).serve()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
