"""A glance at the kernel frames a gateway sends, for execution state and activity only.

Pure code. Frames are forwarded unchanged; this reads the little that REST shows: the
channel, the msg_type, the parent's msg_type and id, and a status's execution_state. Only
small JSON pieces are parsed (never buffers, never large contents).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..kernel_server.framing import FrameError, split_legacy_binary, split_v1

#: Larger legacy JSON frames are not parsed: they are outputs, never status messages.
MAX_PARSED_BYTES = 64 * 1024


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
    """A v1 frame (channel, header, parent, metadata, content, buffers)."""
    try:
        channel, pieces = split_v1(frame)
    except FrameError:
        return None
    if channel != "iopub":
        return Glance(channel, "")
    header = _object(bytes(pieces[0]))
    parent = _object(bytes(pieces[1]))
    return _glance(channel, header, parent, lambda: _object(bytes(pieces[3])))


def peek_legacy(frame: bytes | str) -> Glance | None:
    """A legacy frame: JSON text, or (with buffers) the binary layout."""
    if isinstance(frame, str):
        if len(frame) > MAX_PARSED_BYTES:
            return OUTPUT
        message = _object(frame)
    else:
        try:
            body, _buffers = split_legacy_binary(frame)
        except FrameError:
            return None
        if len(body) > MAX_PARSED_BYTES:
            return OUTPUT
        message = _object(bytes(body))
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


def header_of(frame: bytes | str, v1: bool) -> dict[str, Any]:
    """The header of a client's message ({} if it has none): the parent of a notice about it.
    Parses the whole of a legacy frame: for rare frames only (one refused by the gateway)."""
    if v1:
        if not isinstance(frame, bytes):
            return {}
        try:
            _channel, pieces = split_v1(frame)
        except FrameError:
            return {}
        return _object(bytes(pieces[0]))
    if isinstance(frame, str):
        message = _object(frame)
    else:
        try:
            body, _buffers = split_legacy_binary(frame)
        except FrameError:
            return {}
        message = _object(bytes(body))
    header = message.get("header")
    return header if isinstance(header, dict) else {}
