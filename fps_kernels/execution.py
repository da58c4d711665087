"""Server-side execution: cells of shared notebooks run on a kernel, outputs in the Y document.

`ServerSideExecution` answers `POST /api/kernels/{id}/execute`: it finds the document in the
Yjs plugin (fps-yjs 0.6.4, document ids `format:type:file_id`) and the cell in it, and hands
the cell to the kernel's KernelDriver (kernel_driver/driver.py), created on first use and
kept in the kernel's entry. It follows the kernel's state: a restart or a death ends the
running and queued cells with an error, and cells sent after a restart go to the new kernel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pycrdt import Array

from .errors import CellNotFound, Conflict, DocumentNotFound
from .kernel_driver.driver import CellKey, KernelDriver, WidgetComm
from .kernel_driver.ycell import SharedCell, find_cell
from .kernel_server.activity import ExecutionState, StateListener
from .kernel_server.server import KernelServer
from .registry import Registry

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

    def __init__(self, registry: Registry, yjs: Any, ready_timeout: float = 60.0) -> None:
        self._registry = registry
        self._yjs = yjs
        self._widgets = YjsWidgets(yjs)
        self._ready_timeout = ready_timeout
        self._attached: dict[str, _Attached] = {}

    async def execute(self, kernel_id: str, document_id: str, cell_id: str) -> dict[str, str]:
        """Queue the cell on the kernel; NotFound or Conflict when it cannot be."""
        entry = self._registry.entry(kernel_id)
        if not isinstance(entry.server, KernelServer):
            raise Conflict(
                f"Kernel {kernel_id} does not run on this server ({entry.name}): server-side "
                "execution needs a local kernel"
            )
        cells = self._notebook_cells(document_id)
        ycell = find_cell(cells, cell_id)
        if ycell is None:
            raise CellNotFound(document_id, cell_id)
        answer = {"kernel_id": kernel_id, "document_id": document_id, "cell_id": cell_id}
        cell = SharedCell(ycell, self._widgets.widget_doc)
        if cell.cell_type != "code":
            return {**answer, "status": "skipped", "reason": f"a {cell.cell_type} cell"}
        state = entry.server.activity.execution_state
        if state == "dead":
            reason = entry.server.activity.reason
            raise Conflict(
                f"Kernel {kernel_id} is dead{f' ({reason})' if reason else ''}: "
                "restart it to run cells"
            )
        driver = await self._driver(kernel_id, entry.server)
        entry.driver = driver
        driver.submit(CellKey(document_id, cell_id), cell)
        return {**answer, "status": "queued"}

    async def close(self) -> None:
        for kernel_id in list(self._attached):
            await self._detach(kernel_id)

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

    def _resolve(self, key: CellKey) -> SharedCell | None:
        try:
            ycell = find_cell(self._notebook_cells(key.document_id), key.cell_id)
        except DocumentNotFound:
            return None
        return SharedCell(ycell, self._widgets.widget_doc) if ycell is not None else None

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
