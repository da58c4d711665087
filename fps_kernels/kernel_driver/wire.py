"""The ZMQ wire format of the Jupyter messaging protocol.

A message on a kernel socket is the multipart
``[identities..., b"<IDS|MSG>", signature, header, parent_header, metadata, content, buffers...]``.
Pure code: no I/O.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .signing import Signer

DELIMITER = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.4"


class WireError(ValueError):
    """Frames that do not make a Jupyter message."""


@dataclass(slots=True)
class WireMessage:
    """A message as it travels: its four JSON parts kept as bytes, plus raw buffers."""

    signature: bytes
    parts: list[bytes]  # header, parent_header, metadata, content: JSON bytes as received
    buffers: list[bytes] = field(default_factory=list)
    identities: list[bytes] = field(default_factory=list)


def split_frames(frames: Sequence[bytes]) -> WireMessage:
    """Cut a received multipart message into its pieces, without parsing any JSON."""
    try:
        index = frames.index(DELIMITER)
    except ValueError:
        raise WireError("no <IDS|MSG> delimiter") from None
    # Indexed, not sliced into a rest first: this runs for every message a kernel sends.
    parts_at = index + 2
    if len(frames) < parts_at + 4:
        got = len(frames) - index - 1
        raise WireError(f"a message needs a signature and 4 parts, got {got} frames")
    return WireMessage(
        bytes(frames[index + 1]),
        [bytes(part) for part in frames[parts_at : parts_at + 4]],
        list(frames[parts_at + 4 :]),
        list(frames[:index]),
    )


def join_frames(
    parts: Sequence[bytes], buffers: Sequence[bytes | memoryview], signer: Signer
) -> list[bytes | memoryview]:
    """The frames to send for a message (no identities: we only talk through DEALER sockets)."""
    return [DELIMITER, signer.sign(parts), *parts, *buffers]


def utc_now_iso() -> str:
    """The protocol's date format: ISO 8601 in UTC with a Z, to the microsecond."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pack(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def unpack(data: bytes) -> Any:
    return json.loads(data)


def unpack_object(data: bytes) -> dict[str, Any]:
    """A JSON object part, or {} for anything else (a bad part is the reader's to judge)."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def new_msg_id() -> str:
    return uuid.uuid4().hex


def make_header(msg_type: str, session: str, username: str = "fps_kernels") -> dict[str, Any]:
    return {
        "msg_id": new_msg_id(),
        "msg_type": msg_type,
        "username": username,
        "session": session,
        "date": utc_now_iso(),
        "version": PROTOCOL_VERSION,
    }


def make_message_parts(
    msg_type: str,
    content: dict[str, Any],
    session: str,
    parent_header: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    msg_id: str | None = None,
) -> tuple[str, list[bytes]]:
    """A new message's msg_id (a new one unless given) and its four packed parts."""
    header = make_header(msg_type, session)
    if msg_id is not None:
        header["msg_id"] = msg_id
    parts = [pack(header), pack(parent_header or {}), pack(metadata or {}), pack(content)]
    return header["msg_id"], parts


def new_session_id() -> str:
    return f"{uuid.uuid4().hex[:12]}-{os.getpid()}"
