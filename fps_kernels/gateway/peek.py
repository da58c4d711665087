"""A glance at the kernel frames a gateway sends, for execution state and activity only.

Pure code. Frames are forwarded unchanged; this reads the little that REST shows: the
channel, the msg_type, the parent's msg_type and id, and a status's execution_state. Only
small JSON pieces are parsed (never buffers, never large contents).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

#: Larger legacy JSON frames are not parsed: they are outputs, never status messages.
MAX_PARSED_BYTES = 64 * 1024
_U64 = struct.Struct("<Q")
_U32 = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Glance:
    """What a frame says about the kernel's activity."""

    channel: str
    msg_type: str
    parent_msg_type: str | None = None
    parent_header: dict[str, Any] = field(default_factory=dict)
    #: content.execution_state of a status message.
    state: str | None = None


#: A frame too large to parse: kernel output, which counts as activity.
OUTPUT = Glance("iopub", "display_data")


def _object(data: bytes | str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _glance(channel: str, header: dict[str, Any], parent: dict[str, Any], content: Any) -> Glance:
    msg_type = header.get("msg_type")
    parent_type = parent.get("msg_type")
    state = None
    if msg_type == "status":
        body = content() if callable(content) else content
        value = body.get("execution_state") if isinstance(body, dict) else None
        state = value if isinstance(value, str) else None
    return Glance(
        channel,
        msg_type if isinstance(msg_type, str) else "",
        parent_type if isinstance(parent_type, str) else None,
        parent,
        state,
    )


def peek_v1(frame: bytes) -> Glance | None:
    """A v1 frame: u64 count, u64 offsets, then channel, header, parent, metadata, content."""
    size = len(frame)
    if size < 8:
        return None
    (count,) = _U64.unpack_from(frame, 0)
    if count < 6 or 8 * (count + 1) > size:
        return None
    offsets = struct.unpack_from("<6Q", frame, 8)
    if any(b < a for a, b in zip(offsets[:-1], offsets[1:], strict=True)) or offsets[-1] > size:
        return None
    try:
        channel = frame[offsets[0] : offsets[1]].decode()
    except UnicodeDecodeError:
        return None
    if channel != "iopub":
        return Glance(channel, "")
    header = _object(frame[offsets[1] : offsets[2]])
    parent = _object(frame[offsets[2] : offsets[3]])
    return _glance(channel, header, parent, lambda: _object(frame[offsets[4] : offsets[5]]))


def peek_legacy(frame: bytes | str) -> Glance | None:
    """A legacy frame: JSON text, or (with buffers) u32 count, u32 offsets, JSON, buffers."""
    if isinstance(frame, str):
        if len(frame) > MAX_PARSED_BYTES:
            return OUTPUT
        message = _object(frame)
    else:
        if len(frame) < 8:
            return None
        (nbufs,) = _U32.unpack_from(frame, 0)
        if nbufs < 1 or 4 * (nbufs + 1) > len(frame):
            return None
        start, end = _U32.unpack_from(frame, 4)[0], len(frame)
        if nbufs > 1:
            end = _U32.unpack_from(frame, 8)[0]
        if end - start > MAX_PARSED_BYTES:
            return OUTPUT
        message = _object(frame[start:end])
    if not message:
        return None
    channel = message.get("channel")
    if channel != "iopub":
        return Glance(channel if isinstance(channel, str) else "", "")
    header = message.get("header")
    parent = message.get("parent_header")
    return _glance(
        "iopub",
        header if isinstance(header, dict) else {},
        parent if isinstance(parent, dict) else {},
        message.get("content"),
    )


def peek(frame: bytes | str, v1: bool) -> Glance | None:
    """A frame of either protocol (v1 frames are binary)."""
    if v1:
        return peek_v1(frame) if isinstance(frame, bytes) else None
    return peek_legacy(frame)
