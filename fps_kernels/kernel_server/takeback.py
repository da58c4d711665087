"""TakeBackInbound: the way in for what a kernel taken back after a server restart says.

While the keeper's backlog is played, live iopub messages wait (the backlog is older); then
they go on, except those the backlog already had (the keeper and the server were both
subscribed for a while). The messages of the cells that were running across the restart
(record.running) are kept, so that whoever resumes such a cell (server-side execution) gets
all of them, from the backlog on, then the live ones until the cell's idle status. What the
earlier server had queued for an offline client (its replies, tagged with its session_id)
goes to that client's mailbox, not through the dispatch: it was dispatched once already.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence

from ..persist.keeper_client import Backlog
from ..persist.keeper_protocol import client_of, msg_id_of
from .messages import KernelMessage

logger = logging.getLogger(__name__)

Handler = Callable[[str, KernelMessage], None]
#: Checks a message's raw frames (signature, replay guard): the message, or None.
Verify = Callable[[str, Sequence[bytes]], "KernelMessage | None"]
#: Queues a message in the mailbox of the client of that session_id: whether it has one.
ToClient = Callable[[str, KernelMessage], bool]
#: Per running cell, what is kept for its follower at most (then the oldest are dropped).
_KEPT_PER_CELL = 10000


class _Cell:
    __slots__ = ("kept", "follower", "ended")

    def __init__(self) -> None:
        self.kept: list[tuple[str, KernelMessage]] = []
        self.follower: Handler | None = None
        self.ended = False


class TakeBackInbound:
    def __init__(
        self,
        dispatch: Handler,
        running: Iterable[str],
        keep_for: float,
        to_client: ToClient | None = None,
        name: str = "",
    ) -> None:
        self._dispatch = dispatch
        self._name = name
        self._to_client = to_client
        self._held: list[KernelMessage] | None = []
        self._cells = {msg_id: _Cell() for msg_id in running}
        if self._cells:
            # Cells nobody came to resume in that time are forgotten.
            asyncio.get_running_loop().call_later(keep_for, self._forget_unfollowed)

    def __call__(self, channel: str, message: KernelMessage) -> None:
        if self._held is not None and channel == "iopub":
            self._held.append(message)
            return
        self.deliver(channel, message)

    def deliver(self, channel: str, message: KernelMessage) -> None:
        """Hand a message on (one of the backlog's, or live)."""
        if self._cells:
            self._follow(channel, message)
        self._dispatch(channel, message)

    def play(self, backlog: Backlog | None, verify: Verify) -> int:
        """The keeper's backlog (raw frames, checked by `verify`) in order, then the live
        iopub messages held meanwhile; a message that came both ways goes once (the live
        copy, already checked: the replay guard would refuse the other); a message queued
        for a client goes to its mailbox. The count of messages the keeper dropped."""
        live: dict[str, KernelMessage] = {}
        for message in self._held or ():
            msg_id = message.header.get("msg_id")
            if isinstance(msg_id, str):
                live[msg_id] = message
        played: set[str] = set()
        unclaimed = 0
        for channel, frames in backlog.messages if backlog is not None else ():
            client = client_of(channel, frames)
            if client is not None:
                verified = verify(channel, frames)
                if verified is not None and not self._hand(client, verified):
                    unclaimed += 1
                continue
            msg_id = msg_id_of(frames) if channel == "iopub" else None
            copy = live.get(msg_id) if msg_id is not None else None
            if copy is not None and msg_id is not None:
                played.add(msg_id)
                self.deliver(channel, copy)
                continue
            verified = verify(channel, frames)
            if verified is not None:
                self.deliver(channel, verified)
        if unclaimed:
            logger.warning(
                "Kernel %s: %d message(s) kept for clients not expected back were dropped",
                self._name,
                unclaimed,
            )
        held, self._held = self._held or [], None
        for message in held:
            if message.header.get("msg_id") not in played:
                self.deliver("iopub", message)
        return backlog.dropped if backlog is not None else 0

    def _hand(self, client: str, message: KernelMessage) -> bool:
        return self._to_client is not None and self._to_client(client, message)

    def follow(self, msg_id: str, follower: Handler) -> bool:
        cell = self._cells.get(msg_id)
        if cell is None:
            return False
        kept, cell.kept = cell.kept, []
        cell.follower = follower
        for channel, message in kept:
            follower(channel, message)
        if cell.ended:
            del self._cells[msg_id]
        return True

    def _follow(self, channel: str, message: KernelMessage) -> None:
        cell = self._cells.get(message.parent_msg_id or "")
        if cell is None or cell.ended:
            return
        ends = (
            channel == "iopub"
            and message.msg_type == "status"
            and message.content().get("execution_state") == "idle"
        )
        if cell.follower is not None:
            try:
                cell.follower(channel, message)
            except Exception:
                logger.exception("The follower of a taken-back cell failed")
            if ends:
                self._cells.pop(message.parent_msg_id or "", None)
            return
        cell.kept.append((channel, message))
        if len(cell.kept) > _KEPT_PER_CELL:
            del cell.kept[0]
        cell.ended = ends

    def _forget_unfollowed(self) -> None:
        for msg_id in [m for m, cell in self._cells.items() if cell.follower is None]:
            del self._cells[msg_id]
