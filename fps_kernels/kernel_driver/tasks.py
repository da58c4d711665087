"""Background tasks that belong to an object: started by it, logged when they fail, and
cancelled (and awaited) when it stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class BackgroundTasks:
    """The tasks one owner runs beside its requests.

    A task that fails is logged once, with its traceback and `owner`'s name; one that is
    cancelled is not. `cancel_all()` cancels what is left and waits for it to end.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(
        self, coroutine: Coroutine[Any, Any, T], what: str = "a background task"
    ) -> asyncio.Task[T]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._done(done, what))
        return task

    def _done(self, task: asyncio.Task[Any], what: str) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s: %s failed", self.owner, what, exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self, timeout: float) -> None:
        """Give the running tasks up to `timeout` seconds to end on their own."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def cancel(self) -> None:
        """Cancel what is left without waiting (for a synchronous caller, which may be one
        of these tasks itself)."""
        for task in list(self._tasks):
            task.cancel()

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.difference_update(tasks)


async def run_together(calls: Sequence[tuple[str, Awaitable[Any]]]) -> list[Any]:
    """Await `calls`, each named by what it does, at once. One that fails is logged with its
    name and traceback instead of raising; the results keep the exception in its place."""
    results = await asyncio.gather(*(call for _, call in calls), return_exceptions=True)
    for (what, _), result in zip(calls, results, strict=True):
        if isinstance(result, Exception):
            logger.error("%s failed", what, exc_info=result)
    return results
