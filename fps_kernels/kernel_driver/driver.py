"""KernelDriver: a ZMQ client of one kernel that executes cells into shared Y documents.

It has sockets of its own (shell and iopub), built from the kernel's connection info. Cells
are sent to the kernel in the order they were submitted, as JupyterLab sends them (all at
once for "Run All", with `stop_on_error`): the kernel runs them one at a time, in that
order. Each cell's iopub messages are written into its outputs by the rules of outputs.py,
and its execution count comes from the reply.

Comm messages go to a WidgetHost (fps-yjs's widget manager), so that collaborative widgets
created by server-side cells live in Y documents shared with every client.

When the kernel restarts or dies, `kernel_lost` marks the running cell and every queued one
with an error output and closes the sockets; the next cell opens new ones, so it runs on
the new kernel.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq
import zmq.asyncio

from .connection import ConnectionInfo
from .outputs import CellOutputs, DisplayMap, OutputSink, widget_model_id
from .signing import ReplayGuard, SignatureError, Signer
from .wire import WireError, join_frames, make_header, new_session_id, pack, split_frames, unpack
from .ycell import SharedCell

logger = logging.getLogger(__name__)

_INFO_RETRY = 0.5
_COMM_TYPES = ("comm_open", "comm_msg", "comm_close")
_OUTPUT_MESSAGES = ("stream", "display_data", "execute_result", "error", "clear_output")


class DriverError(RuntimeError):
    """The kernel could not be reached."""


@dataclass(frozen=True)
class CellKey:
    document_id: str
    cell_id: str


#: Finds a cell of a shared document again (for display updates), None if it is gone.
CellResolver = Callable[[CellKey], SharedCell | None]


class WidgetHost(Protocol):
    """Where the kernel's widget comms go (fps-yjs's widget manager, through an adapter)."""

    def comm_open(self, msg: dict[str, Any], comm: WidgetComm) -> None: ...

    def comm_msg(self, msg: dict[str, Any]) -> None: ...

    def widget_doc(self, model_id: str) -> Any: ...

    async def share(self, model_id: str) -> None:
        """Make the widget's Y document reachable by clients (its collaboration room)."""


@dataclass
class _Message:
    header: dict[str, Any]
    parent_header: dict[str, Any]
    metadata: dict[str, Any]
    content: dict[str, Any]
    buffers: list[bytes]

    @property
    def msg_type(self) -> str:
        return str(self.header.get("msg_type", ""))

    @property
    def parent_id(self) -> str | None:
        msg_id = self.parent_header.get("msg_id")
        return msg_id if isinstance(msg_id, str) else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "header": self.header,
            "msg_id": self.header.get("msg_id"),
            "msg_type": self.msg_type,
            "parent_header": self.parent_header,
            "metadata": self.metadata,
            "content": self.content,
            "buffers": self.buffers,
        }


@dataclass(eq=False)
class _Execution:
    key: CellKey
    cell: SharedCell
    outputs: CellOutputs
    code: str
    msg_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: bool = False
    reply: dict[str, Any] | None = None
    idle: bool = False
    # Run again before it finished: as in JupyterLab, only the newest run writes the cell.
    superseded: bool = False


@dataclass(frozen=True)
class _Outgoing:
    msg_type: str
    content: dict[str, Any]
    buffers: list[bytes]
    metadata: dict[str, Any]
    msg_id: str | None = None


class WidgetComm:
    """The server end of a widget's comm: what the widget manager sends goes to the kernel."""

    def __init__(self, driver: KernelDriver, comm_id: str) -> None:
        self._driver = driver
        self.comm_id = comm_id

    def send(
        self,
        data: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        buffers: list[bytes] | None = None,
    ) -> None:
        self._driver.post(
            "comm_msg",
            {"comm_id": self.comm_id, "data": data or {}},
            buffers=[bytes(b) for b in buffers or []],
            metadata=metadata,
        )


class KernelDriver:
    """Executes cells of shared notebooks on one kernel, one at a time, in order."""

    def __init__(
        self,
        connection_info: ConnectionInfo,
        *,
        resolve: CellResolver,
        widgets: WidgetHost | None = None,
        accepting: Callable[[], Awaitable[None]] | None = None,
        ready_timeout: float = 60.0,
        name: str = "",
    ) -> None:
        self.connection_info = connection_info
        self.name = name or "kernel"
        self._resolve = resolve
        self._widgets = widgets
        self._accepting = accepting
        self._ready_timeout = ready_timeout
        self._signer = Signer(connection_info.key, connection_info.signature_scheme)
        self._session = new_session_id()
        self.displays = DisplayMap()

        self._queue: deque[_Execution | _Outgoing] = deque()  # submitted, not yet sent
        self._sent: dict[str, _Execution] = {}  # sent, not finished, in the order sent
        self._wake = asyncio.Event()
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._connected = False
        self._sender: asyncio.Task[None] | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._info_replies: dict[str, asyncio.Future[None]] = {}
        self._iopub_seen = asyncio.Event()
        self._replay_guard = ReplayGuard()
        self._closed = False

    # --- what the service calls ----------------------------------------------------------

    def submit(self, key: CellKey, cell: SharedCell) -> None:
        """Queue a code cell: it is cleared and marked running now, and run in its turn."""
        if self._closed:
            raise DriverError("this kernel driver is closed")
        code = cell.source
        for earlier in self._executions():
            if earlier.key == key:
                earlier.superseded = True
        self.displays.forget_cell(key)
        outputs = CellOutputs(cell.outputs(), key, self.displays)
        if not code.strip():
            # As JupyterLab: an empty cell is cleared, not sent to the kernel.
            cell.begin(running=False)
            return
        cell.begin()
        self._queue.append(_Execution(key=key, cell=cell, outputs=outputs, code=code))
        self._start_sender()

    def post(
        self,
        msg_type: str,
        content: dict[str, Any],
        buffers: list[bytes] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Send a message of our own on shell (e.g. a widget's comm_msg), in turn."""
        if self._closed:
            return
        self._queue.append(_Outgoing(msg_type, content, buffers or [], metadata or {}))
        self._start_sender()

    def kernel_lost(self, ename: str, running: str, queued: str) -> None:
        """The kernel is gone (restarted, died, shut down): mark every cell and disconnect.

        The running cell gets an error `ename: running`, each queued one `ename: queued`.
        """
        executions = [e for e in self._executions() if not e.superseded]
        self._sent.clear()
        self._queue.clear()
        self._disconnect()
        for execution in executions:
            message = running if execution.started else queued
            self._fail(execution, ename, message)
        if executions:
            logger.info(
                "Kernel %s: %d server-side execution(s) ended: %s",
                self.name,
                len(executions),
                running,
            )

    async def close(self) -> None:
        """Stop for good: fail what is left and release the sockets and tasks."""
        if self._closed:
            return
        self.kernel_lost("KernelShutdown", "The kernel was shut down", "The kernel was shut down")
        self._closed = True
        tasks = [t for t in (self._sender, *self._readers) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- cells -----------------------------------------------------------------------------

    def _executions(self) -> list[_Execution]:
        """The cells sent and not finished, then the queued ones, in order."""
        queued = [item for item in self._queue if isinstance(item, _Execution)]
        return list(self._sent.values()) + queued

    def _fail(self, execution: _Execution, ename: str, evalue: str) -> None:
        execution.outputs.add_error(ename, evalue)
        execution.cell.finish(None)

    def _sink_for(self, key: Hashable) -> OutputSink | None:
        if not isinstance(key, CellKey):
            return None
        running = next((e for e in self._sent.values() if e.key == key and not e.superseded), None)
        if running is not None:
            return running.outputs.sink
        cell = self._resolve(key)
        return cell.outputs() if cell is not None else None

    def _maybe_finish(self, execution: _Execution) -> None:
        reply = execution.reply
        if reply is None or (not execution.idle and reply.get("status") != "aborted"):
            return
        self._sent.pop(execution.msg_id, None)
        if execution.superseded:
            return
        count = reply.get("execution_count")
        execution.cell.finish(count if isinstance(count, int) else None)

    # --- ZMQ -------------------------------------------------------------------------------

    def _start_sender(self) -> None:
        self._wake.set()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_loop())
            self._sender.add_done_callback(self._sender_done)

    def _sender_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("Kernel %s: the cell sender failed", self.name, exc_info=task.exception())

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                try:
                    if not self._connected:
                        if self._accepting is not None:
                            # Not while the kernel (re)starts: wait until it takes requests.
                            await self._accepting()
                        if not self._queue:
                            break
                        await self._connect()
                    await self._send(self._queue.popleft())
                except (DriverError, zmq.ZMQError) as error:
                    logger.warning("Kernel %s: %s", self.name, error)
                    reason = f"Could not reach the kernel: {error}"
                    self.kernel_lost("KernelNotReachable", reason, reason)
                    break

    async def _send(self, item: _Execution | _Outgoing) -> None:
        if isinstance(item, _Execution):
            content = {
                "code": item.code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,  # input() fails at once with a clear error
                "stop_on_error": True,
            }
            self._sent[item.msg_id] = item
            await self._send_message(
                "execute_request",
                content,
                metadata={"cellId": item.key.cell_id},
                msg_id=item.msg_id,
            )
        else:
            await self._send_message(item.msg_type, item.content, item.buffers, item.metadata)

    async def _send_message(
        self,
        msg_type: str,
        content: dict[str, Any],
        buffers: list[bytes] | None = None,
        metadata: dict[str, Any] | None = None,
        msg_id: str | None = None,
    ) -> str:
        header = make_header(msg_type, self._session)
        if msg_id is not None:
            header["msg_id"] = msg_id
        parts = [pack(header), pack({}), pack(metadata or {}), pack(content)]
        sock = self._sockets.get("shell")
        if sock is None:
            raise DriverError("not connected to the kernel")
        await sock.send_multipart(join_frames(parts, buffers or [], self._signer), copy=False)
        return str(header["msg_id"])

    def _open_sockets(self) -> None:
        context = zmq.asyncio.Context.instance()
        info = self.connection_info
        for channel in ("shell", "iopub"):
            sock = context.socket(zmq.SUB if channel == "iopub" else zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if channel == "iopub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
                sock.setsockopt(zmq.RCVHWM, 0)
            else:
                sock.setsockopt(zmq.IDENTITY, uuid.uuid4().hex.encode())
            if info.curve_publickey and info.curve_secretkey:
                # CurveZMQ, as the kernel server's own sockets (the kernel holds the same pair).
                sock.curve_secretkey = info.curve_secretkey.encode()
                sock.curve_publickey = info.curve_publickey.encode()
                sock.curve_serverkey = info.curve_publickey.encode()
            sock.connect(info.url(channel))
            self._sockets[channel] = sock
        for channel in ("shell", "iopub"):
            task = asyncio.create_task(self._read(channel))
            self._readers.add(task)
            task.add_done_callback(self._reader_done)

    def _reader_done(self, task: asyncio.Task[None]) -> None:
        self._readers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("Kernel %s: a reader failed", self.name, exc_info=task.exception())

    async def _connect(self) -> None:
        """Open the sockets and return once the kernel answered and iopub reaches us."""
        self._disconnect()
        self._open_sockets()
        self._iopub_seen.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        replied = loop.create_future()
        try:
            while not (replied.done() and self._iopub_seen.is_set()):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise DriverError(
                        f"the kernel did not answer kernel_info within {self._ready_timeout:g} s"
                    )
                msg_id = await self._send_message("kernel_info_request", {})
                self._info_replies[msg_id] = replied
                waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._iopub_seen.wait())]
                if not replied.done():
                    waits.append(replied)
                await asyncio.wait(
                    waits, timeout=min(_INFO_RETRY, remaining), return_when=asyncio.ALL_COMPLETED
                )
                waits[0].cancel()
        except BaseException:
            self._disconnect()
            raise
        finally:
            self._info_replies.clear()
            if not replied.done():
                replied.cancel()
        self._connected = True
        logger.info("Kernel %s: server-side execution connected", self.name)

    def _disconnect(self) -> None:
        self._connected = False
        for task in list(self._readers):
            task.cancel()
        self._readers.clear()
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()
        self._replay_guard.clear()

    async def _read(self, channel: str) -> None:
        sock = self._sockets[channel]
        while True:
            frames = await sock.recv_multipart()
            message = self._parse(channel, frames)
            if message is None:
                continue
            try:
                if channel == "iopub":
                    self._iopub_seen.set()
                    await self._on_iopub(message)
                else:
                    self._on_shell(message)
            except Exception:
                # A bad message or a failing widget must not stop the cells that follow.
                logger.exception(
                    "Kernel %s: could not handle a %s %s", self.name, channel, message.msg_type
                )

    def _parse(self, channel: str, frames: list[bytes]) -> _Message | None:
        try:
            wire = split_frames(frames)
            self._signer.check(wire.signature, wire.parts)
            self._replay_guard.check(wire.signature)
            header, parent, metadata, content = (unpack(part) for part in wire.parts)
        except (WireError, SignatureError, ValueError) as error:
            logger.warning("Kernel %s: dropped a %s message: %s", self.name, channel, error)
            return None
        if not all(isinstance(p, dict) for p in (header, parent, metadata, content)):
            logger.warning("Kernel %s: dropped a malformed %s message", self.name, channel)
            return None
        return _Message(header, parent, metadata, content, [bytes(b) for b in wire.buffers])

    def _on_shell(self, message: _Message) -> None:
        parent_id = message.parent_id
        if parent_id is None:
            return
        if message.msg_type == "kernel_info_reply":
            future = self._info_replies.get(parent_id)
            if future is not None and not future.done():
                future.set_result(None)
            return
        execution = self._sent.get(parent_id)
        if execution is not None and message.msg_type == "execute_reply":
            execution.reply = message.content
            self._maybe_finish(execution)

    async def _on_iopub(self, message: _Message) -> None:
        msg_type = message.msg_type
        if msg_type in _COMM_TYPES:
            self._on_comm(message)
            return
        if msg_type == "update_display_data":
            self.displays.update(message.content, self._sink_for)
            return
        parent_id = message.parent_id
        execution = self._sent.get(parent_id) if parent_id is not None else None
        if execution is None:
            return
        if msg_type == "status":
            state = message.content.get("execution_state")
            if state == "busy":
                execution.started = True
            elif state == "idle":
                execution.idle = True
                self._maybe_finish(execution)
            return
        if msg_type == "execute_input":
            execution.started = True
            return
        if msg_type not in _OUTPUT_MESSAGES or execution.superseded:
            return
        if self._widgets is not None and msg_type in ("display_data", "execute_result"):
            model_id = widget_model_id(message.content)
            if model_id is not None:
                await self._widgets.share(model_id)
        execution.outputs.apply(msg_type, message.content)

    def _on_comm(self, message: _Message) -> None:
        if self._widgets is None:
            return
        msg = message.as_dict()
        if message.msg_type == "comm_open":
            comm_id = message.content.get("comm_id")
            if isinstance(comm_id, str):
                self._widgets.comm_open(msg, WidgetComm(self, comm_id))
        elif message.msg_type == "comm_msg":
            self._widgets.comm_msg(msg)
