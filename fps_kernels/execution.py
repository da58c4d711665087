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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pycrdt import Array

from .errors import CellNotFound, Conflict, DocumentNotFound
from .kernel_driver.driver import CellKey, DriverError, KernelDriver, NoPendingInput, WidgetComm
from .kernel_driver.ycell import SharedCell, find_cell
from .kernel_server.activity import ExecutionState, StateListener
from .kernel_server.server import KernelServer
from .nbmodel import Request, Requests
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
        for kernel_id in list(self._attached):
            await self._detach(kernel_id)
        await self.rooms.close()

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
