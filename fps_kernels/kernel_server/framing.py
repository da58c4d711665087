"""WebSocket framing of kernel messages: the v1 subprotocol and the legacy JSON protocol.

Pure code: no I/O. See the `v1.kernel.websocket.jupyter.org` and legacy formats in the
Jupyter Server documentation.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
_U64 = struct.Struct("<Q")
_U32 = struct.Struct(">I")


class FrameError(ValueError):
    """A WebSocket frame that is not a well-formed kernel message."""


@dataclass(slots=True)
class ClientMessage:
    """A message from a client: the channel, its four JSON parts as bytes, and its buffers."""

    channel: str
    parts: list[bytes]
    buffers: list[bytes | memoryview] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)


# --- v1 ---------------------------------------------------------------------------------


def encode_v1(channel: str, parts: Sequence[bytes], buffers: Sequence[bytes] = ()) -> bytes:
    """One binary frame: u64 LE count, u64 LE offsets, channel, the parts, the buffers."""
    channel_bytes = channel.encode()
    pieces = [channel_bytes, *parts, *buffers]
    count = len(pieces) + 1
    offsets = [8 * (count + 1)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    table = struct.pack(f"<{count + 1}Q", count, *offsets)
    return b"".join([table, *pieces])


def split_v1(frame: bytes) -> tuple[str, list[memoryview]]:
    """A v1 frame's channel and pieces (header, parent, metadata, content, buffers...), as
    views of the frame, trusting none of its offsets."""
    size = len(frame)
    if size < 8:
        raise FrameError("v1 frame shorter than its offset count")
    (count,) = _U64.unpack_from(frame, 0)
    # channel + 4 parts at least, and a table that fits in the frame
    if count < 6 or 8 * (count + 1) > size:
        raise FrameError(f"v1 frame has an impossible offset count {count}")
    offsets = struct.unpack_from(f"<{count}Q", frame, 8)
    _check_offsets(offsets, 8 * (count + 1), size, "v1")
    if offsets[-1] != size:
        raise FrameError("v1 offsets do not end at the end of the frame")
    view = memoryview(frame)
    try:
        channel = bytes(view[offsets[0] : offsets[1]]).decode()
    except UnicodeDecodeError:
        raise FrameError("v1 channel is not UTF-8") from None
    return channel, [view[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]


def decode_v1(frame: bytes) -> ClientMessage:
    """Read a v1 frame from a client."""
    channel, pieces = split_v1(frame)
    parts = [bytes(piece) for piece in pieces[:4]]
    # Buffers stay views of the frame: ZMQ sends them without another copy.
    buffers: list[bytes | memoryview] = list(pieces[4:])
    return ClientMessage(channel=channel, parts=parts, buffers=buffers, header=_header(parts[0]))


# --- legacy -----------------------------------------------------------------------------


def _legacy_json(
    channel: str, parts: Sequence[bytes], msg_id: str, msg_type: str, buffers_key: bool
) -> bytes:
    # Spliced from the kernel's own JSON bytes: no parsing and re-encoding of the content.
    header, parent, metadata, content = (bytes(p) for p in parts)
    return b'{"header":%b,"parent_header":%b,"metadata":%b,"content":%b,%b"channel":%b,' % (
        header,
        parent,
        metadata,
        content,
        b'"buffers":[],' if buffers_key else b"",
        json.dumps(channel).encode(),
    ) + b'"msg_id":%b,"msg_type":%b}' % (json.dumps(msg_id).encode(), json.dumps(msg_type).encode())


def encode_legacy_text(channel: str, parts: Sequence[bytes], msg_id: str, msg_type: str) -> str:
    """The legacy JSON message, for messages without buffers."""
    return _legacy_json(channel, parts, msg_id, msg_type, True).decode("utf-8", errors="replace")


def encode_legacy_binary(
    channel: str, parts: Sequence[bytes], buffers: Sequence[bytes], msg_id: str, msg_type: str
) -> bytes:
    """The legacy frame for messages with buffers: u32 BE count and offsets, JSON, buffers."""
    body = _legacy_json(channel, parts, msg_id, msg_type, False)
    nbufs = len(buffers) + 1
    offsets = [4 * (nbufs + 1)]
    offsets.append(offsets[0] + len(body))
    for buffer in buffers[:-1]:
        offsets.append(offsets[-1] + len(buffer))
    table = struct.pack(f">{nbufs + 1}I", nbufs, *offsets)
    return b"".join([table, body, *buffers])


def decode_legacy_text(text: str) -> ClientMessage:
    try:
        message = json.loads(text)
    except json.JSONDecodeError as error:
        raise FrameError(f"invalid JSON: {error}") from None
    return _from_legacy_dict(message, [])


def split_legacy_binary(frame: bytes) -> tuple[memoryview, list[memoryview]]:
    """A legacy binary frame's JSON message and buffers, as views of the frame."""
    size = len(frame)
    if size < 8:
        raise FrameError("legacy binary frame too short")
    (nbufs,) = _U32.unpack_from(frame, 0)
    if nbufs < 1 or 4 * (nbufs + 1) > size:
        raise FrameError(f"legacy binary frame has an impossible buffer count {nbufs}")
    offsets = list(struct.unpack_from(f">{nbufs}I", frame, 4)) + [size]
    _check_offsets(offsets, 4 * (nbufs + 1), size, "legacy binary")
    view = memoryview(frame)
    return view[offsets[0] : offsets[1]], [
        view[offsets[i] : offsets[i + 1]] for i in range(1, nbufs)
    ]


def decode_legacy_binary(frame: bytes) -> ClientMessage:
    body, pieces = split_legacy_binary(frame)
    try:
        message = json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FrameError(f"invalid JSON: {error}") from None
    buffers: list[bytes | memoryview] = list(pieces)
    return _from_legacy_dict(message, buffers)


def _check_offsets(offsets: Sequence[int], table_end: int, size: int, what: str) -> None:
    """Offsets that start after the table, never go back, and stay within the frame."""
    previous = table_end
    for offset in offsets:
        if offset < previous or offset > size:
            raise FrameError(f"{what} offsets are not increasing within the frame")
        previous = offset


def _from_legacy_dict(message: Any, buffers: list[bytes | memoryview]) -> ClientMessage:
    if not isinstance(message, dict):
        raise FrameError("a message must be a JSON object")
    header = message.get("header")
    if not isinstance(header, dict) or not isinstance(header.get("msg_type"), str):
        raise FrameError("a message needs a header with a msg_type")
    pieces = []
    for key in ("parent_header", "metadata", "content"):
        value = message.get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise FrameError(f"'{key}' must be an object")
        pieces.append(value)
    channel = message.get("channel")
    if channel is None:
        channel = "shell"
    if not isinstance(channel, str):
        raise FrameError("'channel' must be a string")
    parts = [_pack(header), *(_pack(piece) for piece in pieces)]
    return ClientMessage(channel=channel, parts=parts, buffers=buffers, header=header)


def _pack(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _header(data: bytes) -> dict[str, Any]:
    try:
        header = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FrameError(f"header is not valid JSON: {error}") from None
    if not isinstance(header, dict) or not isinstance(header.get("msg_type"), str):
        raise FrameError("header must be an object with a msg_type")
    return header
