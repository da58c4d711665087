"""The keeper's socket protocol, shared by the keeper and the server (keeper_client).

A packet is a count of frames, then each frame as its length and its bytes (4-byte
big-endian integers). The server sends [ATTACH, json], [DETACH, json] or [SHUTDOWN], the json
holding "last_msg_id" (the last iopub message it delivered, or "") and optionally "identity"
(hex) and, in a DETACH, "unsent" (iopub msg_ids it took but could not deliver: the keeper
resumes at the oldest it has) and "queued" (a count of packets [channel, session_id, *signed
frames] that follow the DETACH: shell/control/stdin messages the server received but could
not hand to an offline client, each with that client's session_id as a routing frame before
<IDS|MSG>). The keeper answers an ATTACH with [BACKLOG, json {count, dropped, found}] and
`count` packets [channel, *raw ZMQ frames], oldest first, those a DETACH queued for a client
included with their routing frame (`client_of`), whatever the ATTACH's last_msg_id; the
others with [OK]; [ERROR, text] when it refuses. Frames stay raw: the server checks their
signatures when it takes them in.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Sequence

DELIMITER = b"<IDS|MSG>"
MAX_PACKET_BYTES = 1 << 31
_LEN = struct.Struct(">I")


class PacketError(ValueError):
    """Bytes on the socket that are not a packet."""


def encode_packet(frames: Sequence[bytes]) -> bytes:
    return _LEN.pack(len(frames)) + b"".join(_LEN.pack(len(f)) + bytes(f) for f in frames)


async def read_packet(reader: asyncio.StreamReader, limit: int = MAX_PACKET_BYTES) -> list[bytes]:
    (count,) = _LEN.unpack(await reader.readexactly(4))
    frames: list[bytes] = []
    total = 0
    for _ in range(count):
        (size,) = _LEN.unpack(await reader.readexactly(4))
        total += size + 4
        if total > limit:
            raise PacketError(f"a packet over {limit} bytes")
        frames.append(await reader.readexactly(size))
    return frames


def msg_id_of(frames: Sequence[bytes]) -> str | None:
    """The header's msg_id of a raw message, None if it has none."""
    try:
        header = json.loads(frames[list(frames).index(DELIMITER) + 2])
    except (ValueError, IndexError):
        return None
    msg_id = header.get("msg_id") if isinstance(header, dict) else None
    return msg_id if isinstance(msg_id, str) else None


#: The channels a message handed to the keeper for a client may come from.
CLIENT_CHANNELS = frozenset({"shell", "control", "stdin"})


def for_client(session_id: str, frames: Sequence[bytes]) -> list[bytes]:
    """A message of a DEALER channel (no routing frame of its own) tagged for the client
    `session_id`: its session_id as a routing frame before <IDS|MSG>."""
    return [session_id.encode(), *frames]


def client_of(channel: str, frames: Sequence[bytes]) -> str | None:
    """The session_id a message was queued for (`for_client`), None for a message as the
    kernel sent it (an iopub message's frame before <IDS|MSG> is its topic, not a client)."""
    if channel not in CLIENT_CHANNELS or len(frames) < 2 or frames[1] != DELIMITER:
        return None
    try:
        return bytes(frames[0]).decode()
    except UnicodeDecodeError:
        return None
