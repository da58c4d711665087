"""KernelDispatch: what a kernel says, on its way to the clients.

iopub goes to every client, and tells the kernel's activity; replies go to the connection
that asked. Output the kernel published but we never received (see gaps.py) is told in the
cell it belonged to: while a run of missing messages is being judged, the end of a cell (and
what follows) is held back, so that the notice lands in the cell before its idle status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .activity import ExecutionState, KernelActivity
from .bridge import ClientBridge
from .gaps import GapDetector, Loss
from .messages import KernelMessage, notice, status

logger = logging.getLogger(__name__)


class KernelDispatch:
    """Takes every verified message of one kernel and hands it on."""

    def __init__(
        self,
        kernel_id: str,
        bridge: ClientBridge,
        activity: KernelActivity,
        session: str,
        cell_ran: Callable[[], None],
    ) -> None:
        self.kernel_id = kernel_id
        self.bridge = bridge
        self.activity = activity
        self.session = session
        self._cell_ran = cell_ran
        #: Header of the execute_request being run, so that a notice about the kernel's
        #: death lands in that cell.
        self.running_cell: dict[str, Any] = {}
        self._gaps = GapDetector()
        self._held: list[KernelMessage] | None = None
        self._held_since = 0.0
        self._gap_timer: asyncio.TimerHandle | None = None
        # The last execute_reply, and the cells whose idle status came: when the kernel's
        # drop took a cell's idle status, the server ends the cell itself.
        self._last_reply: dict[str, Any] = {}
        self._idle_seen: deque[str] = deque(maxlen=64)
        #: The last iopub message handed to the clients (where a keeper takes over).
        self.last_delivered: KernelMessage | None = None
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None

    # --- telling the clients ---------------------------------------------------------------

    def tell(self, text: str, state: ExecutionState | None = None) -> None:
        """A stderr line in the running cell, then the new state if given (JupyterLab
        forgets a cell's requests on `restarting`, so the text first)."""
        parent, self.running_cell = self.running_cell, {}
        self.bridge.broadcast(notice(text, self.session, parent))
        if state is not None:
            self.announce(state)

    def announce(self, state: ExecutionState) -> None:
        self.bridge.broadcast(status(state, self.session))

    # --- from the kernel -------------------------------------------------------------------

    def dispatch(self, channel: str, message: KernelMessage) -> None:
        iopub = channel == "iopub"
        if self._gaps.observe(
            message.header.get("msg_id"), iopub, lambda: message.parent_header, time.monotonic()
        ):
            self._arm_gap_timer()
        if iopub:
            ends_cell = self._track(message)
            if self._held is None and ends_cell and self._gaps.pending():
                self._held = []
                self._held_since = time.monotonic()
                self._arm_gap_timer()
            if self._held is not None:
                self._held.append(message)
                return
            self.last_delivered = message
            self.bridge.broadcast(message)
            return
        if message.msg_type == "execute_reply":
            self._last_reply = message.parent_header
        if self._held is not None and not self._gaps.pending():
            # the late reply filled the gap: nothing was lost
            self._release_held()
        parent_id = message.parent_msg_id
        if parent_id is None or self.bridge.channel.claim(message):
            return
        self.bridge.reply(channel, parent_id, message)

    def saw(self, message: KernelMessage) -> None:
        """A kernel's message that reaches its client another way (a reply kept over a
        server restart, fps_kernels.persist): its number is not a gap."""
        if self._gaps.observe(
            message.header.get("msg_id"), False, lambda: message.parent_header, time.monotonic()
        ):
            self._arm_gap_timer()

    def _track(self, message: KernelMessage) -> bool:
        """Tell the activity what the kernel does; whether `message` ends a cell (its idle
        status)."""
        msg_type = message.msg_type
        if msg_type != "status":
            if self.activity.execution_state == "busy":
                # Cheap path for floods of output while busy: no need to read the parent.
                self.activity.observe(msg_type, None)
            else:
                self.activity.observe(msg_type, message.parent_msg_type)
            return False
        state = message.content().get("execution_state")
        parent_type = message.parent_msg_type
        self.activity.observe(msg_type, parent_type, state)
        if parent_type == "execute_request":
            self.running_cell = message.parent_header if state == "busy" else {}
            if state == "idle":
                self._cell_ran()
        if state != "idle":
            return False
        parent_id = message.parent_msg_id
        if parent_id is not None:
            self._idle_seen.append(parent_id)
        return True

    # --- lost output -----------------------------------------------------------------------

    def _arm_gap_timer(self) -> None:
        if self._gap_timer is not None:
            return
        due = self._gaps.next_due()
        if due is None:
            return
        delay = max(due - time.monotonic(), 0.0)
        self._gap_timer = asyncio.get_running_loop().call_later(delay, self._judge_gaps)

    def _judge_gaps(self) -> None:
        self._gap_timer = None
        now = time.monotonic()
        self._tell_losses(self._gaps.due(now))
        if self._held is not None and (
            not self._gaps.pending() or now - self._held_since >= self._gaps.settle
        ):
            self._release_held()
        if self._gaps.pending():
            self._arm_gap_timer()

    def _release_held(self) -> None:
        self._tell_losses(self._gaps.due(time.monotonic()))
        held, self._held = self._held or [], None
        for message in held:
            self.last_delivered = message
            self.bridge.broadcast(message)

    def flush(self) -> str:
        """Hand the clients what is held back (the server lets the kernel go); the msg_id of
        the last iopub message they were given, "" if none."""
        if self._held is not None:
            self._release_held()
        last = self.last_delivered
        msg_id = last.header.get("msg_id") if last is not None else None
        return msg_id if isinstance(msg_id, str) else ""

    def _end_orphan_cell(self) -> None:
        """After a loss: if the cell that was answered never got its idle status (ipykernel
        sends it right after execute_reply, so it was lost too), send one for it, or the
        cell would look busy forever."""
        parent = self._last_reply
        msg_id = parent.get("msg_id")
        if not isinstance(msg_id, str) or msg_id in self._idle_seen:
            return
        if self.activity.execution_state != "busy" or self.stopped:
            return  # it did end (another status came), or the kernel was stopped meanwhile
        logger.warning("Kernel %s: the idle status of cell %s was lost", self.kernel_id, msg_id)
        idle = status("idle", self.session, parent)
        self._track(idle)
        if self._held is not None:
            self._held.append(idle)
        else:
            self.bridge.broadcast(idle)

    def _tell_losses(self, losses: list[Loss]) -> None:
        """A stderr line in the cell whose output was lost, for every client."""
        if losses:
            asyncio.get_running_loop().call_later(self._gaps.settle, self._end_orphan_cell)
        for loss in losses:
            logger.warning(
                "Kernel %s: %d iopub message(s) lost between the kernel and the server (cell %s)",
                self.kernel_id,
                loss.count,
                loss.parent.get("msg_id", "?"),
            )
            self.bridge.broadcast(
                notice(
                    f"{loss.count} output message(s) of this cell never reached the server: "
                    "the kernel dropped them (its iopub queue to the server was full), so the "
                    "output above is incomplete.",
                    self.session,
                    loss.parent,
                )
            )
