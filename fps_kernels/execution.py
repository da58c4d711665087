"""Server-side execution: cells of shared notebooks run on a kernel, outputs in the Y document.

`ServerSideExecution` answers `POST /api/kernels/{id}/execute`: it finds the document in the
Yjs plugin (fps-yjs 0.6.4, document ids `format:type:file_id`) and the cell in it, and hands
the cell to the kernel's KernelDriver (kernel_driver/driver.py), created on first use and
kept in the kernel's entry. It follows the kernel's state: a restart or a death ends the
running and queued cells with an error, and cells sent after a restart go to the new kernel.

While a document has cells queued or running, its collaboration room is held open (rooms.py),
so that a cell that runs for hours with no page open still writes into the document fps-yjs
saves. The jupyter-server-nbmodel protocol (nbmodel.py) runs on the same drivers: a request
names code and, optionally, the cell it streams into.

With kernels.persist, the cells in flight are in the server's record (`running_cells`); at
the server's stop their drivers are let go, the cells left as they are, and the next server
`resume`s them: the sent ones go on writing into their cells, the queued ones run, and those
of a kernel that did not outlive the restart end with an error saying so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pycrdt import Array

from .errors import CellNotFound, Conflict, DocumentNotFound, KernelsError
from .kernel_driver.driver import (
    CellKey,
    DriverError,
    InFlight,
    KernelDriver,
    NoPendingInput,
    WidgetComm,
)
from .kernel_driver.outputs import CellOutputs, DisplayMap
from .kernel_driver.tasks import BackgroundTasks
from .kernel_driver.ycell import CellGone, SharedCell, find_cell
from .kernel_server.activity import ExecutionState, StateListener
from .kernel_server.messages import KernelMessage
from .kernel_server.server import KernelServer
from .nbmodel import Request, Requests
from .persist.record import RunningCell
from .registry import Registry
from .rooms import RoomKeeper

logger = logging.getLogger(__name__)

_YWIDGET_TARGET = "ywidget"


class YjsWidgets:
    """fps-yjs's widget manager (`yjs.widgets`, present when ypywidgets is installed)."""

    def __init__(self, yjs: Any) -> None:
        self._yjs = yjs

    def _manager(self) -> Any:
        return getattr(self._yjs, "widgets", None)

    def _widgets(self) -> dict[str, Any]:
        widgets = getattr(self._manager(), "widgets", None)
        return widgets if isinstance(widgets, dict) else {}

    def comm_open(self, msg: dict[str, Any], comm: WidgetComm) -> None:
        manager = self._manager()
        if manager is None or msg["content"].get("target_name") != _YWIDGET_TARGET:
            return
        try:
            manager.comm_open(msg, comm)
        except (KeyError, TypeError, ValueError) as error:
            logger.warning("Could not open widget comm %s: %r", comm.comm_id, error)

    def comm_msg(self, msg: dict[str, Any]) -> None:
        manager = self._manager()
        comm_id = msg["content"].get("comm_id")
        if manager is None or comm_id not in self._widgets() or not msg["buffers"]:
            return
        manager.comm_msg(msg)

    def widget_doc(self, model_id: str) -> Any:
        widget = self._widgets().get(model_id)
        model = widget.get("model") if isinstance(widget, dict) else None
        return getattr(model, "ydoc", None)

    async def share(self, model_id: str) -> None:
        doc = self.widget_doc(model_id)
        if doc is None:
            return
        server = self._yjs.room_manager.websocket_server
        await server.get_room(f"ywidget:{doc.guid}", ydoc=doc)


@dataclass
class _Attached:
    server: KernelServer
    driver: KernelDriver
    listener: StateListener


class ServerSideExecution:
    """Runs cells of the Yjs plugin's shared notebooks on the registry's kernels."""

    def __init__(
        self, registry: Registry, yjs: Any, ready_timeout: float = 60.0, pace_saves: bool = True
    ) -> None:
        self._registry = registry
        self._yjs = yjs
        self._widgets = YjsWidgets(yjs)
        self._ready_timeout = ready_timeout
        self._attached: dict[str, _Attached] = {}
        self.rooms = RoomKeeper(yjs, pace_saves)
        self.requests = Requests()
        self._tasks = BackgroundTasks("Server-side execution")
        # Document id -> the notebook's path, for the record (file ids change at each start).
        self._paths: dict[str, str] = {}

    async def execute(self, kernel_id: str, document_id: str, cell_id: str) -> dict[str, str]:
        """Queue the cell on the kernel; NotFound or Conflict when it cannot be."""
        server = self._local_server(kernel_id)
        cell = self._find(document_id, cell_id)
        answer = {"kernel_id": kernel_id, "document_id": document_id, "cell_id": cell_id}
        if cell.cell_type != "code":
            return {**answer, "status": "skipped", "reason": f"a {cell.cell_type} cell"}
        self._check_alive(kernel_id, server)
        driver = await self._driver(kernel_id, server)
        self._registry.entry(kernel_id).driver = driver
        key = CellKey(document_id, cell_id)
        cell = await self._hold(key)
        try:
            driver.submit(key, cell, on_end=lambda: self._ended(key, cell))
        except DriverError as error:
            self.rooms.release(document_id)
            raise Conflict(f"Kernel {kernel_id} was shut down: its cells cannot run") from error
        return {**answer, "status": "queued"}

    async def submit_request(
        self, kernel_id: str, code: str, cell_id: str | None, document_id: str | None
    ) -> Request:
        """Queue an nbmodel request; it streams into the cell too when the cell is open."""
        server = self._local_server(kernel_id)
        self._check_alive(kernel_id, server)
        driver = await self._driver(kernel_id, server)
        self._registry.entry(kernel_id).driver = driver
        request = Request(kernel_id, cell_id, document_id)
        key = CellKey(document_id, cell_id) if document_id and cell_id else None
        cell: SharedCell | None = None
        if key is not None:
            try:
                self._find(key.document_id, key.cell_id)
                cell = await self._hold(key)
            except (DocumentNotFound, CellNotFound) as error:
                logger.info("Request %s runs without its cell: %s", request.id, error.message)
                key = None

        def ended() -> None:
            if key is not None and cell is not None:
                self._ended(key, cell)

        try:
            driver.submit(key, cell, code=code, observer=request, on_end=ended)
        except DriverError as error:
            ended()
            raise Conflict(f"Kernel {kernel_id} was shut down: its cells cannot run") from error
        self.requests.add(request)
        return request

    def send_input(self, kernel_id: str, value: str) -> None:
        """Answer the input() the kernel waits in; Conflict when it waits for none."""
        self._registry.entry(kernel_id)
        attached = self._attached.get(kernel_id)
        try:
            if attached is None:
                raise NoPendingInput("no request ran on it")
            attached.driver.send_input(value)
        except NoPendingInput as error:
            raise Conflict(f"Kernel {kernel_id} is not waiting for an input: {error}") from error

    async def close(self) -> None:
        await self._tasks.cancel_all()
        for kernel_id in list(self._attached):
            await self._detach(kernel_id)
        await self.rooms.close()

    # --- across a restart of the server (kernels.persist) ----------------------------------

    def running_cells(self, kernel_id: str) -> tuple[RunningCell, ...]:
        """The cells in flight on a kernel, for the record."""
        attached = self._attached.get(kernel_id)
        if attached is None:
            return ()
        return self._recorded(attached.driver.in_flight())

    def _recorded(self, in_flight: list[InFlight]) -> tuple[RunningCell, ...]:
        return tuple(
            RunningCell(
                f.msg_id,
                f.key.document_id,
                f.key.cell_id,
                f.sent,
                f.execution_count,
                self._paths.get(f.key.document_id, ""),
                f.last_msg_id,
            )
            for f in in_flight
        )

    async def let_go(
        self, kernel_ids: set[str], caught_up: dict[str, str]
    ) -> dict[str, tuple[RunningCell, ...]]:
        """The server stops and these kernels outlive it: their cells are left as they are,
        for the next server to resume, once each driver handled iopub up to `caught_up`
        (by kernel: where its keeper took over). The cells in flight, by kernel."""
        running: dict[str, tuple[RunningCell, ...]] = {}
        documents: set[str] = set()
        for kernel_id in kernel_ids:
            attached = self._attached.pop(kernel_id, None)
            if attached is None:
                continue
            if attached.listener in attached.server.activity.listeners:
                attached.server.activity.listeners.remove(attached.listener)
            in_flight = await attached.driver.let_go(caught_up.get(kernel_id, ""))
            running[kernel_id] = self._recorded(in_flight)
            documents.update(f.key.document_id for f in in_flight)
        # What the cells wrote so far goes into the files the next server reads.
        await asyncio.gather(*(self.rooms.saved(document_id) for document_id in documents))
        return running

    def resume(
        self,
        cells: dict[str, tuple[RunningCell, ...]],
        gone: tuple[tuple[RunningCell, str], ...] = (),
    ) -> None:
        """After a start that took kernels back: resume their cells in flight (in the
        background: a document may take a while to load); end those in `gone` (cell,
        why) with an error output."""
        for kernel_id, running in cells.items():
            self._tasks.spawn(self._resume(kernel_id, running), f"resuming cells of {kernel_id}")
        if gone:
            self._tasks.spawn(self._end_gone(gone), "ending the cells of kernels gone")

    async def _resume(self, kernel_id: str, running: tuple[RunningCell, ...]) -> None:
        try:
            server = self._local_server(kernel_id)
            driver = await self._driver(kernel_id, server)
        except KernelsError as error:
            await self._end_gone(tuple((cell, error.message) for cell in running))
            return
        self._registry.entry(kernel_id).driver = driver
        for item in running:
            key = CellKey(await self._document_now(item), item.cell_id)
            try:
                cell = await self._hold(key)
            except (DocumentNotFound, CellNotFound) as error:
                logger.warning("Cell %s was not resumed: %s", item.cell_id, error.message)
                continue
            if item.sent:
                driver.resume(
                    key,
                    cell,
                    item.msg_id,
                    item.execution_count,
                    on_end=self._end_of(key, cell),
                )
                # What the keeper kept of it while no server ran, first.
                feeder = _Feeder(driver)
                server.follow_cell(item.msg_id, feeder)
                feeder.start(item.last_msg_id)
                continue
            # Queued, never sent: it runs now, as asked before the restart.
            try:
                driver.submit(key, cell, on_end=self._end_of(key, cell))
            except DriverError:
                self.rooms.release(key.document_id)
        logger.info("Kernel %s: %d server-side cell(s) resumed", kernel_id, len(running))

    def _end_of(self, key: CellKey, cell: SharedCell) -> Callable[[], None]:
        return lambda: self._ended(key, cell)

    async def _document_now(self, cell: RunningCell) -> str:
        """The id the cell's notebook has now: fps-contents 0.6.4 gives every file a new id
        at each start (its ids table is made anew), so it is looked up by path."""
        kind, _, _old_id = cell.document_id.rpartition(":")
        manager = getattr(getattr(self._yjs, "contents", None), "file_id_manager", None)
        if not cell.path or not kind or manager is None:
            return cell.document_id
        try:
            file_id = await manager.get_id(cell.path) or await manager.index(cell.path)
        except Exception:
            logger.exception("Could not find the notebook %s again", cell.path)
            return cell.document_id
        return f"{kind}:{file_id}" if file_id else cell.document_id

    async def _remember_path(self, document_id: str) -> None:
        if document_id in self._paths:
            return
        manager = getattr(getattr(self._yjs, "contents", None), "file_id_manager", None)
        file_id = document_id.split(":", 2)[-1]
        try:
            path = await manager.get_path(file_id) if manager is not None else None
        except Exception:
            logger.exception("Could not find the path of document %s", document_id)
            path = None
        if path:
            self._paths[document_id] = str(path)

    async def _end_gone(self, cells: tuple[tuple[RunningCell, str], ...]) -> None:
        for item, why in cells:
            key = CellKey(await self._document_now(item), item.cell_id)
            try:
                cell = await self._hold(key)
            except (DocumentNotFound, CellNotFound):
                continue
            try:
                CellOutputs(cell.outputs(), key, DisplayMap()).add_error(
                    "DeadKernelError",
                    f"The server restarted while this cell ran, and its kernel did not "
                    f"outlive the restart: {why}",
                )
                cell.finish(None)
            except CellGone:
                pass  # deleted meanwhile: nothing to mark
            finally:
                self._ended(key, cell)

    # --- kernels -------------------------------------------------------------------------

    def _local_server(self, kernel_id: str) -> KernelServer:
        entry = self._registry.entry(kernel_id)
        if not isinstance(entry.server, KernelServer):
            raise Conflict(
                f"Kernel {kernel_id} does not run on this server ({entry.name}): server-side "
                "execution needs a local kernel"
            )
        return entry.server

    def _check_alive(self, kernel_id: str, server: KernelServer) -> None:
        if server.activity.execution_state == "dead":
            reason = server.activity.reason
            raise Conflict(
                f"Kernel {kernel_id} is dead{f' ({reason})' if reason else ''}: "
                "restart it to run cells"
            )

    # --- documents -----------------------------------------------------------------------

    def _notebook_cells(self, document_id: str) -> Array:
        try:
            document = self._yjs.get_document(document_id)
        except KeyError:
            raise DocumentNotFound(
                document_id, " (no client has it open: open it in its collaboration room first)"
            ) from None
        cells = getattr(document, "ycells", None)
        if not isinstance(cells, Array):
            raise DocumentNotFound(document_id, " (it is not a notebook)")
        return cells

    def _find(self, document_id: str, cell_id: str) -> SharedCell:
        cells = self._notebook_cells(document_id)
        ycell = find_cell(cells, cell_id)
        if ycell is None:
            raise CellNotFound(document_id, cell_id)
        return SharedCell(ycell, self._widgets.widget_doc, cells)

    async def _hold(self, key: CellKey) -> SharedCell:
        """Keep the cell's document open while it runs; the cell, found again in case fps-yjs
        reloaded the document meanwhile."""
        await self.rooms.hold(key.document_id)
        await self._remember_path(key.document_id)
        # Clearing the cell is a change too: not while its file is being written.
        await self.rooms.quiet(key.document_id)
        try:
            return self._find(key.document_id, key.cell_id)
        except (DocumentNotFound, CellNotFound):
            self.rooms.release(key.document_id)
            raise

    def _ended(self, key: CellKey, cell: SharedCell) -> None:
        self.rooms.release(key.document_id)
        try:
            cells = self._notebook_cells(key.document_id)
        except DocumentNotFound:
            cells = None
        if cells is None or not cell.is_in(cells):
            logger.info(
                "Cell %s of %s was deleted (or its notebook closed) while it ran: "
                "its outputs were not kept",
                key.cell_id,
                key.document_id,
            )

    async def _quiet(self, key: CellKey) -> None:
        await self.rooms.quiet(key.document_id)

    def _resolve(self, key: CellKey) -> SharedCell | None:
        try:
            return self._find(key.document_id, key.cell_id)
        except (DocumentNotFound, CellNotFound):
            return None

    # --- drivers -------------------------------------------------------------------------

    async def _driver(self, kernel_id: str, server: KernelServer) -> KernelDriver:
        for known in list(self._attached):
            if known not in self._registry.kernels:
                await self._detach(known)
        attached = self._attached.get(kernel_id)
        if attached is not None and attached.server is server:
            return attached.driver
        if attached is not None:
            await self._detach(kernel_id)
        driver = KernelDriver(
            server.connection_info,
            resolve=self._resolve,
            widgets=self._widgets,
            accepting=server.wait_accepting,
            ready_timeout=self._ready_timeout,
            name=kernel_id,
            quiet=self._quiet,
            changed=self._registry.changed,
        )

        def on_state(state: ExecutionState, reason: str) -> None:
            _follow_kernel(driver, server, state, reason)

        server.activity.listeners.append(on_state)
        self._attached[kernel_id] = _Attached(server, driver, on_state)
        return driver

    async def _detach(self, kernel_id: str) -> None:
        attached = self._attached.pop(kernel_id, None)
        if attached is None:
            return
        if attached.listener in attached.server.activity.listeners:
            attached.server.activity.listeners.remove(attached.listener)
        await attached.driver.close()


class _Feeder:
    """Hands a resumed cell's messages the server has to its driver: those the keeper kept
    (given at once when followed) after the last one the earlier server wrote into the cell,
    then the live ones."""

    def __init__(self, driver: KernelDriver) -> None:
        self._driver = driver
        self._kept: list[tuple[str, KernelMessage]] | None = []

    def __call__(self, channel: str, message: KernelMessage) -> None:
        if self._kept is not None:
            self._kept.append((channel, message))
        else:
            self._driver.feed(channel, list(message.parts), list(message.buffers))

    def start(self, written: str) -> None:
        kept, self._kept = self._kept or [], None
        ids = [message.header.get("msg_id") for _channel, message in kept]
        if written in ids:
            kept = kept[ids.index(written) + 1 :]  # the earlier server wrote those
        for channel, message in kept:
            self(channel, message)


def _follow_kernel(
    driver: KernelDriver, server: KernelServer, state: ExecutionState, reason: str
) -> None:
    """What a state the server sets means for the cells in flight: a restart or a death
    ends them (the driver reconnects, once the kernel takes requests, for the next cell)."""
    if state not in ("restarting", "dead"):
        return
    process = server.process
    if state == "restarting" and process is not None and process.is_alive():
        driver.kernel_lost(
            "KernelRestarted",
            "The kernel was restarted while this cell was running",
            "The kernel was restarted before this cell ran: it was not run",
        )
        return
    detail = f" ({reason})" if reason else ""
    driver.kernel_lost(
        "DeadKernelError",
        f"The kernel died or was shut down while this cell was running{detail}",
        f"The kernel died or was shut down before this cell ran{detail}: it was not run",
    )
