"""What the registry answers about kernels and sessions: typed records, which routes.py
turns into the JSON of the Jupyter Server REST API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from .kernel_server.activity import ExecutionState

# A session as the registry keeps it (a path, a notebook or a console, and its kernel) is the
# very entry the persistence record holds: one type, frozen, replaced on change.
from .persist.record import SessionRecord

__all__ = ["KernelInfo", "SessionInfo", "SessionRecord"]


@dataclass(frozen=True)
class KernelInfo:
    """A served kernel as it is now."""

    id: str
    #: Its kernel type (kernelspec) name.
    name: str
    last_activity: datetime
    execution_state: ExecutionState
    #: The WebSocket clients connected to it through this server.
    connections: int
    #: Why it is in that state, when the server knows (e.g. a gateway that does not answer).
    reason: str = ""


@dataclass(frozen=True)
class SessionInfo:
    """A session with its kernel as it is now."""

    id: str
    path: str
    name: str
    type: str
    kernel: KernelInfo
