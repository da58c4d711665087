"""A look at the gateway (a listing) run in the background, one at a time.

Whoever needs it waits a bounded time, counted from the look's start, and goes on with what
is known: a gateway that accepts connections but never answers holds nobody up for longer
than that, and a look that already hangs is not waited for again. The look itself goes on
until the gateway answers or its request times out.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

from ..errors import GatewayError

logger = logging.getLogger(__name__)


class Look:
    def __init__(self, what: str, work: Callable[[], Awaitable[None]]) -> None:
        self.what = what
        self._work = work
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0
        self._finished = -math.inf
        #: Why the last look failed; None when it went well (or none ended yet).
        self.error: GatewayError | None = None
        self._closed = False

    def running_for(self) -> float:
        """Seconds the look in progress has lasted (0 when none is)."""
        if self._task is None:
            return 0.0
        return asyncio.get_running_loop().time() - self._started

    async def fresh(self, max_age: float, wait: float) -> bool:
        """Have a look that ended less than `max_age` seconds ago, starting one if need be,
        and wait for it until `wait` seconds after its start; True when it has ended."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            if self._closed or loop.time() - self._finished < max_age:
                return True
            self._started = loop.time()
            self._task = asyncio.create_task(self._run())
        task = self._task
        left = self._started + wait - loop.time()
        if left > 0:
            # Never cancels the look: it goes on for the next caller.
            await asyncio.wait({task}, timeout=None if math.isinf(left) else left)
        return task.done()

    async def _run(self) -> None:
        try:
            await self._work()
        except GatewayError as error:
            if self.error is None or error.message != self.error.message:
                logger.warning("%s: %s", self.what, error.message)
            self.error = error
        except Exception as error:
            logger.exception("%s failed", self.what)
            self.error = GatewayError(f"{self.what} failed: {error!r}")
        else:
            if self.error is not None:
                logger.info("%s: the kernel gateway answers again", self.what)
            self.error = None
        finally:
            self._finished = asyncio.get_running_loop().time()
            self._task = None

    async def close(self) -> None:
        """Cancel the look in progress; no new one starts."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
