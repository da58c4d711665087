"""One-off requests on a kernel's control channel, through a socket of their own."""

from __future__ import annotations

import asyncio
import logging
import uuid

import zmq
import zmq.asyncio

from .connection import ConnectionInfo
from .signing import SignatureError, Signer
from .wire import WireError, join_frames, make_message_parts, new_session_id, split_frames, unpack

logger = logging.getLogger(__name__)


async def request_shutdown(info: ConnectionInfo, timeout: float) -> bool:
    """Ask a kernel to shut down (a `shutdown_request` on control), never signalling it.

    Returns True once the kernel replied, False if it did not within `timeout` seconds.
    """
    signer = Signer(info.key, info.signature_scheme)
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, uuid.uuid4().hex.encode())
    if info.curve_publickey and info.curve_secretkey:
        sock.curve_secretkey = info.curve_secretkey.encode()
        sock.curve_publickey = info.curve_publickey.encode()
        sock.curve_serverkey = info.curve_publickey.encode()
    sock.connect(info.url("control"))
    msg_id, parts = make_message_parts("shutdown_request", {"restart": False}, new_session_id())

    async def exchange() -> None:
        await sock.send_multipart(join_frames(parts, [], signer))
        while True:
            frames = await sock.recv_multipart()
            try:
                wire = split_frames(frames)
                signer.check(wire.signature, wire.parts)
                parent = unpack(wire.parts[1])
            except (WireError, SignatureError, ValueError) as error:
                logger.warning("Dropped a control message: %s", error)
                continue
            if isinstance(parent, dict) and parent.get("msg_id") == msg_id:
                return

    try:
        await asyncio.wait_for(exchange(), timeout)
    except (asyncio.TimeoutError, zmq.ZMQError) as error:
        logger.info("No shutdown_reply from the kernel at %s: %r", info.url("control"), error)
        return False
    finally:
        sock.close(linger=0)
    return True
