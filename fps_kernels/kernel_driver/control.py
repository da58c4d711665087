"""One-off requests on a kernel's control channel, through a socket of their own."""

from __future__ import annotations

import asyncio
import logging

import zmq

from .channel import KernelChannel, Reply
from .connection import ConnectionInfo

logger = logging.getLogger(__name__)


async def request_shutdown(info: ConnectionInfo, timeout: float) -> bool:
    """Ask a kernel to shut down (a `shutdown_request` on control), never signalling it.

    Returns True once the kernel replied, False if it did not within `timeout` seconds.
    """
    channel = KernelChannel(info, Reply, channels=("control",), name=info.url("control"))
    channel.open()
    try:
        await channel.request("control", "shutdown_request", {"restart": False}, timeout)
    except (asyncio.TimeoutError, zmq.ZMQError) as error:
        logger.info("No shutdown_reply from the kernel at %s: %r", info.url("control"), error)
        return False
    finally:
        await channel.close()
    return True
