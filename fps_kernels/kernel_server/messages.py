"""A message from the kernel on its way to clients, serialised at most once per protocol."""

from __future__ import annotations

from typing import Any

from ..kernel_driver.wire import make_message_parts, unpack_object
from .framing import encode_legacy_binary, encode_legacy_text, encode_v1


class KernelMessage:
    """The kernel's frames as received, with the header and parent header parsed on demand.

    Every client shares one instance, so the v1 and legacy frames are built once however
    many clients receive it.
    """

    __slots__ = ("channel", "parts", "buffers", "_header", "_parent", "_v1", "_legacy", "_size")

    def __init__(self, channel: str, parts: list[bytes], buffers: list[bytes]) -> None:
        self.channel = channel
        self.parts = parts
        self.buffers = buffers
        self._header: dict[str, Any] | None = None
        self._parent: dict[str, Any] | None = None
        self._v1: bytes | None = None
        self._legacy: bytes | str | None = None
        self._size = -1

    @property
    def header(self) -> dict[str, Any]:
        if self._header is None:
            self._header = unpack_object(self.parts[0])
        return self._header

    @property
    def parent_header(self) -> dict[str, Any]:
        if self._parent is None:
            self._parent = unpack_object(self.parts[1])
        return self._parent

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def parent_msg_id(self) -> str | None:
        msg_id = self.parent_header.get("msg_id")
        return msg_id if isinstance(msg_id, str) else None

    @property
    def parent_msg_type(self) -> str | None:
        msg_type = self.parent_header.get("msg_type")
        return msg_type if isinstance(msg_type, str) else None

    def content(self) -> dict[str, Any]:
        return unpack_object(self.parts[3])

    def v1_frame(self) -> bytes:
        if self._v1 is None:
            self._v1 = encode_v1(self.channel, self.parts, self.buffers)
        return self._v1

    def legacy_frame(self) -> bytes | str:
        if self._legacy is None:
            msg_id = str(self.header.get("msg_id", ""))
            if self.buffers:
                self._legacy = encode_legacy_binary(
                    self.channel, self.parts, self.buffers, msg_id, self.msg_type
                )
            else:
                self._legacy = encode_legacy_text(self.channel, self.parts, msg_id, self.msg_type)
        return self._legacy

    def size(self) -> int:
        if self._size < 0:
            self._size = sum(len(p) for p in self.parts) + sum(len(b) for b in self.buffers)
        return self._size


def server_message(
    channel: str,
    msg_type: str,
    content: dict[str, Any],
    session: str,
    parent_header: dict[str, Any] | None = None,
) -> KernelMessage:
    """A message the server itself tells clients (a status or a stderr notice)."""
    _msg_id, parts = make_message_parts(msg_type, content, session, parent_header)
    return KernelMessage(channel, parts, [])


def notice(text: str, session: str, parent: dict[str, Any] | None = None) -> KernelMessage:
    """What the server tells the users of a kernel: a stderr line `[fps_kernels] text` on
    iopub, in the cell of `parent` if given."""
    return server_message(
        "iopub", "stream", {"name": "stderr", "text": f"[fps_kernels] {text}\n"}, session, parent
    )


def status(state: str, session: str, parent: dict[str, Any] | None = None) -> KernelMessage:
    """An execution state the server announces itself."""
    return server_message("iopub", "status", {"execution_state": state}, session, parent)
