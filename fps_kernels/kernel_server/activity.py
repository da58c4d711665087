"""Execution state and last activity of a kernel, as seen on its iopub channel.

Pure code: the reference server's rules, fed one iopub message at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal

logger = logging.getLogger(__name__)

ExecutionState = Literal["starting", "idle", "busy", "restarting", "dead"]
#: Called with the new state and its reason whenever the server sets the state itself.
StateListener = Callable[[ExecutionState, str], None]
_STATES = ("starting", "idle", "busy", "restarting", "dead")

# Requests whose replies and statuses say nothing about a user's activity.
UNTRACKED_MESSAGE_TYPES = frozenset(
    {
        "comm_info_request",
        "comm_info_reply",
        "kernel_info_request",
        "kernel_info_reply",
        "shutdown_request",
        "shutdown_reply",
        "interrupt_request",
        "interrupt_reply",
        "debug_request",
        "debug_reply",
        "stream",
        "display_data",
        "update_display_data",
        "execute_input",
        "execute_result",
        "error",
        "status",
        "clear_output",
        "debug_event",
        "input_request",
        "input_reply",
    }
)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def isoformat_z(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class KernelActivity:
    execution_state: ExecutionState = "starting"
    last_activity: datetime = field(default_factory=utc_now)
    reason: str = ""
    listeners: list[StateListener] = field(default_factory=list, repr=False, compare=False)

    def observe(
        self, msg_type: str, parent_msg_type: str | None, status: str | None = None
    ) -> None:
        """Account for one iopub message (`status` is content.execution_state of a status)."""
        parent_tracked = parent_msg_type is None or parent_msg_type not in UNTRACKED_MESSAGE_TYPES
        if (
            msg_type not in UNTRACKED_MESSAGE_TYPES
            or parent_tracked
            or self.execution_state == "busy"
        ):
            self.last_activity = utc_now()
        if msg_type != "status" or status not in _STATES:
            return
        if parent_tracked:
            self.execution_state = status  # type: ignore[assignment]
        elif self.execution_state in ("starting", "restarting") and status != "starting":
            # An untracked request answered means the kernel is up: not busy with user code.
            self.execution_state = "idle"

    def summary(self) -> dict[str, str]:
        """Upstream's `last_activity`: the date of the last activity and the state."""
        return {"date": isoformat_z(self.last_activity), "execution_state": self.execution_state}

    def set_state(self, state: ExecutionState, reason: str = "") -> None:
        self.execution_state = state
        self.reason = reason
        self.last_activity = utc_now()
        for listener in list(self.listeners):
            try:
                listener(state, reason)
            except Exception:
                logger.exception("A listener of the kernel state failed")
