"""The WebSocket close codes the kernel channels use, in one place."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    #: The kernel was shut down, or the connection replaced by a newer one.
    NORMAL = 1000
    #: The server stops and the kernel goes on (kernels.persist): come back to it later.
    GOING_AWAY = 1001
    #: A connection refused by the Origin/Host checks.
    POLICY_VIOLATION = 1008
    #: A message over max_message_bytes (ours or a gateway's).
    MESSAGE_TOO_BIG = 1009
    #: The kernel's gateway went away.
    INTERNAL_ERROR = 1011
    #: No kernel of that id (4000 + the last digit of HTTP 404).
    KERNEL_NOT_FOUND = 4004
