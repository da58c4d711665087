"""Noticing iopub messages a kernel published that never reached the server.

A kernel's iopub socket (ipykernel's XPUB) drops, silently, what it cannot queue for a
subscriber that does not read fast enough (ZMQ's SNDHWM, 1000 messages by default): the
server reads iopub without a bound of its own, but a server starved of CPU can still fall
that far behind. jupyter_client's Session, which ipykernel uses, numbers every message it
builds in its msg_id, `<session>_<pid>_<n>`, one counter for all channels and threads of a
kernel process. A run of numbers the server never saw, on any channel, is output it lost.

It must never claim a loss that did not happen, so:
- a number can be missing for a while and still come (threads of the kernel number their
  messages before sending them, and replies come on other sockets): a gap is judged only
  after `settle` seconds;
- a single missing number is never claimed: it may be a reply to another client of the
  kernel, or a message the kernel built but did not send (a display hook with nothing to
  show). Only runs of `min_run` or more consecutive numbers count;
- other msg_id forms (other kernels, other libraries) are not judged at all, and numbering
  starts at the first iopub message seen from each kernel process (what was published
  before the server subscribed is not a loss).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

# jupyter_client's new_id() (8 + 24 hex digits), the process id, the message number
_MSG_ID = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{24}_\d+)_(\d+)$")
_PROCESSES_KEPT = 8
_GAPS_KEPT = 256


@dataclass
class Gap:
    """Numbers [low, high) not seen yet, noticed at `since`, before a message of `parent`."""

    low: int
    high: int
    since: float
    parent: dict[str, Any]

    @property
    def size(self) -> int:
        return self.high - self.low


@dataclass
class Loss:
    """`count` messages lost, told in the cell of `parent` (the message after them)."""

    count: int
    parent: dict[str, Any]


@dataclass
class _Numbering:
    """What was seen of one kernel process's message numbers."""

    first: int
    last: int
    gaps: list[Gap] = field(default_factory=list)


def parse_msg_id(msg_id: Any) -> tuple[str, int] | None:
    """(`<session>_<pid>`, number) of a jupyter_client msg_id, None for any other form."""
    if not isinstance(msg_id, str):
        return None
    match = _MSG_ID.match(msg_id)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


class GapDetector:
    """Follows the numbers in a kernel's msg_ids; reports runs that stayed missing."""

    def __init__(self, settle: float = 2.0, min_run: int = 2) -> None:
        self.settle = settle
        self.min_run = min_run
        self._processes: OrderedDict[str, _Numbering] = OrderedDict()

    def observe(self, msg_id: Any, iopub: bool, parent: Any, now: float) -> bool:
        """Account for a message received from the kernel; True if it opened a gap that
        may be claimed. `parent` is the message's parent header, or a callable giving it
        (only called when a gap opens: parsing it is not free on a flood)."""
        parsed = parse_msg_id(msg_id)
        if parsed is None:
            return False
        process, number = parsed
        numbering = self._processes.get(process)
        if numbering is None:
            if not iopub:
                return False
            self._processes[process] = _Numbering(number, number)
            if len(self._processes) > _PROCESSES_KEPT:
                self._processes.popitem(last=False)
            return False
        if number > numbering.last:
            size = number - numbering.last - 1
            if size:
                header = parent() if callable(parent) else parent
                numbering.gaps.append(Gap(numbering.last + 1, number, now, header or {}))
                if len(numbering.gaps) > _GAPS_KEPT:
                    del numbering.gaps[0]
            numbering.last = number
            return size >= self.min_run
        if number >= numbering.first:
            _fill(numbering.gaps, number)
        return False

    def pending(self) -> bool:
        """Whether a run that may be claimed is still open (not judged yet)."""
        return any(
            gap.size >= self.min_run
            for numbering in self._processes.values()
            for gap in numbering.gaps
        )

    def next_due(self) -> float | None:
        """When the oldest open gap will be judged."""
        times = [g.since for n in self._processes.values() for g in n.gaps]
        return min(times) + self.settle if times else None

    def due(self, now: float) -> list[Loss]:
        """Judge the gaps open for `settle` seconds: the runs still missing are lost."""
        losses: list[Loss] = []
        for numbering in self._processes.values():
            kept = []
            for gap in numbering.gaps:
                if gap.since + self.settle > now:
                    kept.append(gap)
                elif gap.size >= self.min_run:
                    losses.append(Loss(gap.size, gap.parent))
            numbering.gaps = kept
        return losses


def _fill(gaps: list[Gap], number: int) -> None:
    """A late number arrived: take it out of the gap it was in."""
    for index, gap in enumerate(gaps):
        if gap.low <= number < gap.high:
            pieces = [
                Gap(low, high, gap.since, gap.parent)
                for low, high in ((gap.low, number), (number + 1, gap.high))
                if high > low
            ]
            gaps[index : index + 1] = pieces
            return
