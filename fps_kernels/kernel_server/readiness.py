"""Readiness: where a served kernel stands between its start and its end, as one state."""

from __future__ import annotations

import asyncio
from enum import Enum


class Readiness(Enum):
    #: Not started yet.
    NEW = "new"
    #: Launched or being attached to: it has not answered kernel_info yet.
    STARTING = "starting"
    #: It answered: it takes requests.
    READY = "ready"
    #: Being restarted (by a client or after it died): requests wait.
    RESTARTING = "restarting"
    #: Given up on or stopped: requests no longer wait for it.
    DEAD = "dead"


class ReadinessState:
    """The one readiness state of a kernel, and a way to wait until it takes requests.

    Clients' messages wait while the kernel (re)starts, or the kernel would run them before
    our iopub socket is connected to it, and their output would be lost.
    """

    def __init__(self) -> None:
        self.state = Readiness.NEW
        self._accepting = asyncio.Event()

    def set(self, state: Readiness) -> None:
        self.state = state
        if state in (Readiness.READY, Readiness.DEAD):
            self._accepting.set()
        else:
            self._accepting.clear()

    @property
    def answered(self) -> bool:
        return self.state is Readiness.READY

    @property
    def accepting(self) -> bool:
        return self._accepting.is_set()

    async def wait_accepting(self) -> None:
        await self._accepting.wait()
