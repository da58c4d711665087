"""WebSocket framing of kernel messages: the v1 subprotocol and the legacy JSON protocol.

Pure code: no I/O. See the `v1.kernel.websocket.jupyter.org` and legacy formats in the
Jupyter Server documentation.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
_U64 = struct.Struct("<Q")
_U32 = struct.Struct(">I")
# A JSON escape of a UTF-16 surrogate (D800-DFFF): only where one appears can a part hold a
# lone surrogate, which no UTF-8 encoder (ours or the kernel's) accepts.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


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
    """Read a v1 frame from a client. The parts other than the header are forwarded as
    they are, so they are checked for what would make the kernel choke (`check_json`)."""
    channel, pieces = split_v1(frame)
    parts = [bytes(piece) for piece in pieces[:4]]
    for name, part in zip(_PART_NAMES[1:], parts[1:], strict=True):
        check_json(part, name)
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
    return _from_legacy_dict(loads(text, "message"), [])


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
    buffers: list[bytes | memoryview] = list(pieces)
    return _from_legacy_dict(loads(bytes(body), "message"), buffers)


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
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:
        raise FrameError("a string holds a lone UTF-16 surrogate (\\uD800-\\uDFFF)") from None
    except (RecursionError, ValueError) as error:
        raise FrameError(f"cannot be encoded: {error}") from None


# --- JSON that cannot hurt --------------------------------------------------------------

_PART_NAMES = ("header", "parent_header", "metadata", "content")
# Deeper than any real message; well below what Python's parser (ours and a Python kernel's,
# whose stack is deeper when it parses) can take.
MAX_DEPTH = 500
# Python's default sys.get_int_max_str_digits(): a kernel parsing a longer integer fails.
_MAX_INT_DIGITS = 4300


def loads(data: str | bytes, what: str) -> Any:
    """Parse JSON from a client; every way it can hurt is a FrameError naming `what`: bad
    syntax or UTF-8, nesting deeper than MAX_DEPTH, integers over Python's digit limit,
    lone UTF-16 surrogates (which no UTF-8 encoder, ours or the kernel's, accepts)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise FrameError(f"{what} is JSON nested too deeply") from None
    except json.JSONDecodeError as error:
        raise FrameError(f"{what} is not valid JSON: {error}") from None
    except UnicodeDecodeError:
        raise FrameError(f"{what} is not UTF-8") from None
    except ValueError:
        # json raises a bare ValueError for integers over sys.get_int_max_str_digits().
        raise FrameError(f"{what} holds an integer with too many digits") from None
    if has_lone_surrogate(data, value):
        raise FrameError(f"{what} holds a lone UTF-16 surrogate (\\uD800-\\uDFFF)")
    if _brackets(data) > MAX_DEPTH and depth(value) > MAX_DEPTH:
        raise FrameError(f"{what} is JSON nested deeper than {MAX_DEPTH}")
    return value


def check_json(data: bytes, what: str) -> None:
    """Check JSON forwarded as it is (a v1 part) as `loads` would, but parse it only when
    it could hide a problem: longer than the longest allowed integer, a surrogate escape,
    or more brackets than MAX_DEPTH. Small messages, the hot path, cost a few scans."""
    if len(data) <= _MAX_INT_DIGITS and b"\\u" not in data and _brackets(data) <= MAX_DEPTH:
        return
    loads(data, what)


def _brackets(data: str | bytes) -> int:
    if isinstance(data, str):
        return data.count("[") + data.count("{")
    return data.count(b"[") + data.count(b"{")


def depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed JSON value (iteratively: no recursion)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in item)
    return deepest


def has_lone_surrogate(data: str | bytes, parsed: Any) -> bool:
    """Whether JSON text (and `parsed`, its value) holds a UTF-16 surrogate that is not
    part of a pair. Cheap when the text has no surrogate escape at all, nearly always."""
    if isinstance(data, str):
        if "\\u" not in data or _SURROGATE_ESCAPE.search(data) is None:
            return False
    elif b"\\u" not in data or _SURROGATE_ESCAPE_BYTES.search(data) is None:
        return False
    try:
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _header(data: bytes) -> dict[str, Any]:
    header = loads(data, "header")
    if not isinstance(header, dict) or not isinstance(header.get("msg_type"), str):
        raise FrameError("header must be an object with a msg_type")
    return header
