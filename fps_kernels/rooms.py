"""Keeps fps-yjs's collaboration rooms open while server-side cells run in them.

fps-yjs 0.6.4 closes a room and drops its document `document_cleanup_delay` seconds after its
last client left (`RoomManager.serve` schedules `maybe_clean_room` when `room.clients` is
empty, and cancels it when a client joins). A cell that runs longer than that with no page
open would write into a dropped document: its outputs would be lost and never saved. So,
while a document has cells queued or running, this module keeps one client of its own in the
room, through the same `RoomManager.serve` a browser goes through: an in-process socket that
takes the room's updates and sends nothing. fps-yjs then keeps the document, saves it as it
changes, and schedules the cleanup as usual once the last cell ended and the last page left.

Writes are also paced around fps-yjs's saves (`quiet`): fps-yjs 0.6.4 cancels a save on every
change of the document, even once it is inside fps-contents 0.6.4's `write_content`, which has
then truncated the file (opened with "wt") and not written it yet: the notebook is left at 0
bytes. The saver sleeps `document_save_delay` after the last change, then reads, writes and
reads the file; a change while it sleeps only reschedules it. So while a save may be past its
sleep, the server's own writes (outputs, counts) wait until it is done: they never cut one.

It also removes the `execution_state` JupyterLab 4.6 writes (`idle`, when a cell gets its
count) from the cells of the documents it held: fps-yjs 0.6.4 would save that key, which
nbformat 4 does not allow.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Array, MapEvent, Subscription

from .kernel_driver.ycell import STATE_KEY, idle_states

logger = logging.getLogger(__name__)

#: The longest the server's writes wait for one save to end.
SAVE_WAIT = 10.0

#: How long a hold waits for fps-yjs to count it in the room (it loads nothing: the
#: document is in memory already when a cell is run).
JOIN_TIMEOUT = 10.0


class _RoomClient:
    """An in-process client of a room, as fps-yjs's `YWebsocket` looks to the room."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._left = asyncio.Event()
        self.joined = asyncio.Event()
        self.on_join: Callable[[], None] | None = None

    @property
    def path(self) -> str:
        return self._path

    def __aiter__(self) -> _RoomClient:
        return self

    async def __anext__(self) -> bytes:
        await self._left.wait()
        raise StopAsyncIteration

    async def send(self, message: bytes) -> None:
        # The room's first message to a client is its sync step 1, sent once it is counted.
        if not self.joined.is_set():
            self.joined.set()
            if self.on_join is not None:
                self.on_join()

    async def recv(self) -> bytes:
        await self._left.wait()
        raise ConnectionError("left the room")

    def leave(self) -> None:
        self._left.set()


@dataclass
class _Hold:
    client: _RoomClient
    task: asyncio.Task[None]
    count: int = 0


@dataclass
class _Watched:
    document: Any
    subscription: Subscription
    cells: Array = field(repr=False)


class RoomKeeper:
    """Holds the rooms of documents with cells in flight; see the module's docstring."""

    def __init__(self, yjs: Any, pace_saves: bool = True) -> None:
        self._yjs = yjs
        self._pace_saves = pace_saves
        self._cleaners: set[asyncio.Task[None]] = set()
        self._holds: dict[str, _Hold] = {}
        self._leaving: dict[str, asyncio.Task[None]] = {}
        self._watched: dict[str, _Watched] = {}
        self._told_index_stopped = False

    def _manager(self) -> Any:
        return getattr(self._yjs, "room_manager", None)

    def held(self, document_id: str) -> bool:
        return document_id in self._holds

    async def hold(self, document_id: str) -> None:
        """One more cell in flight in the document: keep its room open until `release`."""
        hold = self._holds.get(document_id)
        if hold is None:
            manager = self._manager()
            if manager is None:
                return
            self._check_file_index(manager)
            leaving = self._leaving.get(document_id)
            if leaving is not None:
                # fps-yjs schedules the room's cleanup when a client leaves an empty room, and
                # only a client that joins after that cancels it: let the last hold leave first.
                await asyncio.wait([leaving], timeout=JOIN_TIMEOUT)
            hold = self._holds.get(document_id)
        if hold is None:
            hold = self._join(document_id, manager)
        hold.count += 1
        if not hold.client.joined.is_set():
            try:
                await asyncio.wait_for(hold.client.joined.wait(), JOIN_TIMEOUT)
            except asyncio.TimeoutError:
                logger.warning(
                    "Could not join the collaboration room %s within %g s: its document may be "
                    "closed while cells run in it",
                    document_id,
                    JOIN_TIMEOUT,
                )
        self._watch(document_id)

    def _check_file_index(self, manager: Any) -> None:
        """Warn once when fps-contents' file-id index stopped following renames (README,
        "Renaming a notebook while fps-yjs saves it"): nothing else would ever say so."""
        if self._told_index_stopped:
            return
        file_ids = getattr(getattr(manager, "contents", None), "file_id_manager", None)
        task = getattr(file_ids, "watch_files_task", None)
        if not isinstance(task, asyncio.Task) or not task.done() or task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        self._told_index_stopped = True
        logger.warning(
            "fps-contents' file-id index stopped following file changes (%r): notebooks renamed "
            "from now on are no longer saved by fps-yjs until jupyverse restarts",
            error,
        )

    def _join(self, document_id: str, manager: Any) -> _Hold:
        rooms = getattr(getattr(manager, "websocket_server", None), "rooms", {})
        room = rooms.get(document_id) if isinstance(rooms, dict) else None
        # fps-yjs sets the room's write filter from the permissions of the client joining
        # last: the room keeps the one its users set, not the server's own.
        previous = getattr(room, "on_message", None)
        client = _RoomClient(document_id)
        task = asyncio.create_task(manager.serve(client, None))
        hold = _Hold(client, task)
        self._holds[document_id] = hold

        def joined() -> None:
            if room is not None and previous is not None:
                room.on_message = previous

        client.on_join = joined
        task.add_done_callback(lambda t: self._served(document_id, hold, t))
        return hold

    def release(self, document_id: str) -> None:
        """A cell of the document ended: leave its room when it was the last one."""
        hold = self._holds.get(document_id)
        if hold is None:
            return
        hold.count -= 1
        if hold.count <= 0:
            del self._holds[document_id]
            hold.client.leave()
            self._leaving[document_id] = hold.task
        self.clean_states(document_id)

    def _served(self, document_id: str, hold: _Hold, task: asyncio.Task[None]) -> None:
        if self._holds.get(document_id) is hold:
            del self._holds[document_id]
        if self._leaving.get(document_id) is task:
            del self._leaving[document_id]
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            logger.warning("Left the collaboration room %s: %r", document_id, error)

    async def close(self) -> None:
        holds = list(self._holds.values())
        self._holds.clear()
        for hold in holds:
            hold.client.leave()
        tasks = [hold.task for hold in holds] + list(self._leaving.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
        for cleaner in list(self._cleaners):
            cleaner.cancel()
        for document_id in list(self._watched):
            self._unwatch(document_id)

    # --- JupyterLab's execution_state ----------------------------------------------------

    def _document(self, document_id: str) -> Any:
        documents = getattr(self._manager(), "documents", {})
        return documents.get(document_id) if isinstance(documents, dict) else None

    def _watch(self, document_id: str) -> None:
        for known, watched in list(self._watched.items()):
            if self._document(known) is not watched.document:
                self._unwatch(known)  # dropped or reloaded by fps-yjs
        document = self._document(document_id)
        cells = getattr(document, "ycells", None)
        if document is None or not isinstance(cells, Array) or document_id in self._watched:
            return
        loop = asyncio.get_running_loop()

        def on_change(events: list[Any]) -> None:
            for event in events:
                keys = getattr(event, "keys", None)
                if isinstance(event, MapEvent) and isinstance(keys, dict) and STATE_KEY in keys:
                    # Not inside the transaction that is being observed.
                    loop.call_soon(self._clean_soon, document_id)
                    return

        subscription = cells.observe_deep(on_change)
        self._watched[document_id] = _Watched(document, subscription, cells)

    def _unwatch(self, document_id: str) -> None:
        watched = self._watched.pop(document_id, None)
        if watched is None:
            return
        try:
            watched.cells.unobserve(watched.subscription)
        except (RuntimeError, ValueError) as error:
            logger.debug("Could not unobserve %s: %r", document_id, error)

    def _clean_soon(self, document_id: str) -> None:
        task = asyncio.create_task(self._clean_when_quiet(document_id))
        self._cleaners.add(task)
        task.add_done_callback(self._cleaned)

    async def _clean_when_quiet(self, document_id: str) -> None:
        await self.quiet(document_id)
        self.clean_states(document_id)

    def _cleaned(self, task: asyncio.Task[None]) -> None:
        self._cleaners.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("Could not clean execution states", exc_info=task.exception())

    async def quiet(self, document_id: str) -> None:
        """Return once writing into the document cannot cut a save of its file short."""
        if not self._pace_saves:
            return
        watched = self._watched.get(document_id)
        manager = self._manager()
        savers = getattr(manager, "savers", None)
        if watched is None or not isinstance(savers, dict):
            return
        saver = savers.get(document_id.split(":", 2)[-1])
        if not isinstance(saver, asyncio.Task) or saver.done():
            return
        if _in_delay(saver):
            return  # a change now only reschedules it
        _, pending = await asyncio.wait([saver], timeout=SAVE_WAIT)
        if pending:
            logger.warning("A save of %s took over %g s: writing anyway", document_id, SAVE_WAIT)

    async def saved(self, document_id: str) -> None:
        """Return once the document's pending save, if any, is written (bounded): at a stop
        that leaves its cells running (kernels.persist), what they wrote must be in the file
        the next server reads."""
        savers = getattr(self._manager(), "savers", None)
        saver = savers.get(document_id.split(":", 2)[-1]) if isinstance(savers, dict) else None
        if not isinstance(saver, asyncio.Task) or saver.done():
            return
        _, pending = await asyncio.wait([saver], timeout=SAVE_WAIT)
        if pending:
            logger.warning("%s was not saved within %g s of the stop", document_id, SAVE_WAIT)

    def clean_states(self, document_id: str) -> None:
        """Remove the `execution_state` of the document's cells that do not run."""
        watched = self._watched.get(document_id)
        if watched is None or self._document(document_id) is not watched.document:
            return
        cells = idle_states(watched.cells)
        if not cells:
            return
        with watched.cells.doc.transaction():
            for ycell in cells:
                del ycell[STATE_KEY]


def _in_delay(saver: asyncio.Task[Any]) -> bool:
    """Whether fps-yjs's saver is still in its delay, before it reads and writes the file.

    Read off what its coroutine awaits, not guessed from the time of the last change: a
    transaction that changes nothing does not reschedule the saver, and a loaded loop runs
    it late.
    """
    coroutine = saver.get_coro()
    if inspect.iscoroutine(coroutine) and (
        inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED
    ):
        return True
    awaited = getattr(coroutine, "cr_await", None)
    return getattr(awaited, "__qualname__", None) == "sleep"
