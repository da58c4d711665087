"""KernelDriver: a ZMQ client of one kernel that executes cells into shared Y documents.

It has sockets of its own (shell and iopub), built from the kernel's connection info. Cells
are sent to the kernel in the order they were submitted, as JupyterLab sends them (all at
once for "Run All", with `stop_on_error`): the kernel runs them one at a time, in that
order. Each cell's iopub messages are written into its outputs by the rules of outputs.py,
and its execution count comes from the reply.

Comm messages go to a WidgetHost (fps-yjs's widget manager), so that collaborative widgets
created by server-side cells live in Y documents shared with every client.

An execution may also have an `ExecutionObserver` (a request of the jupyter-server-nbmodel
protocol, nbmodel.py) that gets its outputs, its `input()` prompts and its end, with or without
a cell: such executions are sent with `allow_stdin`, and the driver's stdin socket (connected,
its handshake done, before anything is sent) takes the kernel's `input_request`s; `send_input`
answers them.

When the kernel restarts or dies, `kernel_lost` marks the running cell and every queued one
with an error output and closes the sockets; the next cell opens new ones, so it runs on
the new kernel.

Across a restart of the server (kernels.persist), `resume` takes back an execution an
earlier server sent: its outputs go on into its cell from iopub, and it ends on its idle
status (its execute_reply went to the earlier server's socket); a kernel_info_request sent
once iopub flows is the barrier that tells an execution which ended while no server was
there, so that no cell is left running for good.
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

from .channel import KernelChannel, LinkFailed, NoAnswer
from .connection import ConnectionInfo
from .outputs import CellOutputs, DisplayMap, OutputSink, widget_model_id
from .tasks import BackgroundTasks
from .wire import new_session_id, unpack
from .ycell import CellGone, SharedCell

logger = logging.getLogger(__name__)

_COMM_TYPES = ("comm_open", "comm_msg", "comm_close")
_OUTPUT_MESSAGES = ("stream", "display_data", "execute_result", "error", "clear_output")
_CHANNELS = ("shell", "iopub", "stdin")


class DriverError(RuntimeError):
    """The kernel could not be reached."""


@dataclass(frozen=True)
class CellKey:
    document_id: str
    cell_id: str


@dataclass(frozen=True)
class InFlight:
    """An execution into a cell, queued or sent and not ended (for kernels.persist)."""

    key: CellKey
    msg_id: str
    sent: bool
    execution_count: int | None
    #: The last of its messages written into the cell.
    last_msg_id: str = ""


#: Finds a cell of a shared document again (for display updates), None if it is gone.
CellResolver = Callable[[CellKey], SharedCell | None]
#: Returns when writing into the cell's document is safe (not while its file is written).
QuietGate = Callable[[CellKey], Awaitable[None]]


class ExecutionObserver(Protocol):
    """Who wants to know how an execution goes, besides its cell (nbmodel.py's Request)."""

    def started(self) -> None: ...

    def output(self, msg_type: str, content: dict[str, Any]) -> None: ...

    def update_display(self, content: dict[str, Any]) -> None: ...

    def input_requested(self, header: dict[str, Any], content: dict[str, Any]) -> None: ...

    def input_answered(self) -> None: ...

    def finished_with(self, reply: dict[str, Any]) -> None: ...

    def failed(self, ename: str, evalue: str, started: bool) -> None: ...


class NoPendingInput(DriverError):
    """An input was sent while the kernel waits for none."""


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
    msg_type: str = field(init=False)
    parent_msg_id: str | None = field(init=False)

    def __post_init__(self) -> None:
        self.msg_type = str(self.header.get("msg_type", ""))
        parent_id = self.parent_header.get("msg_id")
        self.parent_msg_id = parent_id if isinstance(parent_id, str) else None

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
    key: CellKey | None
    cell: SharedCell | None
    outputs: CellOutputs | None
    code: str
    observer: ExecutionObserver | None = None
    on_end: Callable[[], None] | None = None
    msg_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: bool = False
    reply: dict[str, Any] | None = None
    idle: bool = False
    # Run again before it finished: as in JupyterLab, only the newest run writes the cell.
    superseded: bool = False
    ended: bool = False
    # Sent by an earlier server (kernels.persist): it ends on idle, as its reply went there.
    resumed: bool = False
    execution_count: int | None = None
    last_msg_id: str = ""

    def start(self) -> None:
        if not self.started:
            self.started = True
            if self.observer is not None:
                self.observer.started()


@dataclass(frozen=True)
class _Outgoing:
    msg_type: str
    content: dict[str, Any]
    buffers: list[bytes]
    metadata: dict[str, Any]
    msg_id: str | None = None
    parent_header: dict[str, Any] | None = None


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
        quiet: QuietGate | None = None,
        changed: Callable[[], None] | None = None,
    ) -> None:
        self.connection_info = connection_info
        self._quiet = quiet
        # Told when an execution is queued, sent, counted or ended (the persistence record).
        self._changed = changed
        self.name = name or "kernel"
        self._resolve = resolve
        self._widgets = widgets
        self._accepting = accepting
        self._ready_timeout = ready_timeout
        self._session = new_session_id()
        self.displays = DisplayMap()

        self._queue: deque[_Execution | _Outgoing] = deque()  # submitted, not yet sent
        self._sent: dict[str, _Execution] = {}  # sent, not finished, in the order sent
        self._wake = asyncio.Event()
        self._channel: KernelChannel[_Message] | None = None
        self._connected = False
        self._sender: asyncio.Task[None] | None = None
        self._tasks = BackgroundTasks(f"Kernel {self.name}")
        self._closed = False
        self._input_parent: dict[str, Any] | None = None
        self._input_for: _Execution | None = None
        self._connect_lock = asyncio.Lock()
        self._iopub_seen = asyncio.Event()
        self._barriers: set[str] = set()  # kernel_info_requests that end resumed executions
        # Messages of resumed executions come two ways (`feed`, and our iopub): one at a time,
        # in order, each once.
        self._handling = asyncio.Lock()
        self._resumed_seen: set[str] = set()
        # The iopub messages handled last, to catch up with the server before a let-go.
        self._recent_iopub: deque[str] = deque(maxlen=4096)
        self._iopub_moved = asyncio.Event()

    # --- what the service calls ----------------------------------------------------------

    def submit(
        self,
        key: CellKey | None,
        cell: SharedCell | None,
        *,
        code: str | None = None,
        observer: ExecutionObserver | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> bool:
        """Queue code (a cell's source unless given): the cell is cleared and marked running
        now, and run in its turn. False when there was nothing to send (an empty cell is
        cleared, as JupyterLab does); `on_end` is called once the execution ended, however."""
        if self._closed:
            raise DriverError("this kernel driver is closed")
        if code is None:
            code = cell.source if cell is not None else ""
        outputs = None
        if key is not None and cell is not None:
            for earlier in self._executions():
                if earlier.key == key:
                    earlier.superseded = True
            self.displays.forget_cell(key)
            outputs = CellOutputs(cell.outputs(), key, self.displays)
        if not code.strip():
            # As JupyterLab: an empty cell is cleared, not sent to the kernel.
            if cell is not None:
                cell.begin(running=False)
            if observer is not None:
                observer.finished_with({"status": "ok", "execution_count": None})
            if on_end is not None:
                on_end()
            return False
        if cell is not None:
            cell.begin()
        execution = _Execution(
            key=key, cell=cell, outputs=outputs, code=code, observer=observer, on_end=on_end
        )
        self._queue.append(execution)
        self._start_sender()
        self._tell()
        return True

    def resume(
        self,
        key: CellKey,
        cell: SharedCell,
        msg_id: str,
        execution_count: int | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        """Take back an execution an earlier server sent to this kernel (kernels.persist):
        not sent again; its outputs go on into `cell` (after those it has), and it ends on its
        idle status, or at the barrier if it ended while no server was there."""
        if self._closed:
            raise DriverError("this kernel driver is closed")
        execution = _Execution(
            key=key,
            cell=cell,
            outputs=CellOutputs(cell.outputs(), key, self.displays),
            code="",
            on_end=on_end,
            msg_id=msg_id,
            started=True,
            resumed=True,
            execution_count=execution_count,
        )
        self._sent[msg_id] = execution
        self._tasks.spawn(self._resume_connect(), "taking back executions")

    def feed(self, channel: str, parts: list[bytes], buffers: list[bytes]) -> None:
        """A message of a resumed execution that the server has, checked already: what the
        keeper kept while no server ran, then live ones (those our sockets get too count
        once)."""
        message = _parse(channel, parts, buffers)
        if message is not None and not self._closed:
            self._tasks.spawn(self._on_message(channel, message), "a resumed cell's message")

    async def _resume_connect(self) -> None:
        try:
            await self._ensure_connected()
        except (DriverError, zmq.ZMQError) as error:
            logger.warning("Kernel %s: %s", self.name, error)
            reason = f"Could not reach the kernel after the server restarted: {error}"
            self.kernel_lost("KernelNotReachable", reason, reason)

    def in_flight(self) -> list[InFlight]:
        """The executions into cells not ended yet, sent first, in order."""
        return [
            InFlight(e.key, e.msg_id, e.msg_id in self._sent, e.execution_count, e.last_msg_id)
            for e in self._executions()
            if e.key is not None and not e.superseded
        ]

    def _tell(self) -> None:
        if self._changed is not None:
            self._changed()

    def send_input(self, value: str) -> None:
        """Answer the kernel's pending `input()`; NoPendingInput when there is none."""
        parent, execution = self._input_parent, self._input_for
        if parent is None or execution is None:
            raise NoPendingInput("the kernel is not waiting for an input")
        self._input_parent = self._input_for = None
        if execution.observer is not None:
            execution.observer.input_answered()
        self._queue.appendleft(
            _Outgoing("input_reply", {"value": value}, [], {}, parent_header=parent)
        )
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
        every = self._executions()
        executions = [e for e in every if not e.superseded]
        self._sent.clear()
        self._queue.clear()
        self._input_parent = self._input_for = None
        self._disconnect()
        for execution in executions:
            message = running if execution.started else queued
            self._fail(execution, ename, message)
        for execution in every:
            self._end(execution)
        if executions:
            logger.info(
                "Kernel %s: %d server-side execution(s) ended: %s",
                self.name,
                len(executions),
                running,
            )
            self._tell()

    async def close(self) -> None:
        """Stop for good: fail what is left and release the sockets and tasks."""
        if self._closed:
            return
        self.kernel_lost("KernelShutdown", "The kernel was shut down", "The kernel was shut down")
        self._closed = True
        await self._tasks.cancel_all()

    async def let_go(self, caught_up: str = "", timeout: float = 5.0) -> list[InFlight]:
        """Stop for good, leaving the cells as they are: the kernel outlives the server
        (kernels.persist), and the next server resumes them. First, handle iopub up to
        `caught_up` (the last message the server gave its clients: where the keeper takes
        over), so that nothing falls between the two. The executions in flight."""
        if self._closed:
            return []
        if caught_up and self._connected:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while caught_up not in self._recent_iopub and loop.time() < deadline:
                self._iopub_moved.clear()
                try:
                    await asyncio.wait_for(self._iopub_moved.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            async with self._handling:
                pass  # the message being handled, if any, is written
        in_flight = self.in_flight()
        self._closed = True
        self._sent.clear()
        self._queue.clear()
        self._disconnect()
        await self._tasks.cancel_all()
        return in_flight

    # --- cells -----------------------------------------------------------------------------

    def _executions(self) -> list[_Execution]:
        """The cells sent and not finished, then the queued ones, in order."""
        queued = [item for item in self._queue if isinstance(item, _Execution)]
        return list(self._sent.values()) + queued

    def _fail(self, execution: _Execution, ename: str, evalue: str) -> None:
        if execution.outputs is not None and execution.cell is not None:
            try:
                execution.outputs.add_error(ename, evalue)
            except CellGone:
                pass  # deleted meanwhile: said once when it ends
            execution.cell.finish(None)
        if execution.observer is not None:
            execution.observer.failed(ename, evalue, execution.started)

    def _end(self, execution: _Execution) -> None:
        if execution.ended:
            return
        execution.ended = True
        if self._input_for is execution:
            self._input_parent = self._input_for = None
        if execution.on_end is not None:
            try:
                execution.on_end()
            except Exception:
                logger.exception("Kernel %s: an end-of-execution callback failed", self.name)

    def _sink_for(self, key: Hashable) -> OutputSink | None:
        if not isinstance(key, CellKey):
            return None
        running = next((e for e in self._sent.values() if e.key == key and not e.superseded), None)
        if running is not None and running.outputs is not None:
            return running.outputs.sink
        cell = self._resolve(key)
        return cell.outputs() if cell is not None else None

    def _maybe_finish(self, execution: _Execution) -> None:
        reply = execution.reply
        if reply is None and execution.resumed and execution.idle:
            reply = {"status": "ok", "execution_count": execution.execution_count}
        if reply is None or (not execution.idle and reply.get("status") != "aborted"):
            return
        self._sent.pop(execution.msg_id, None)
        if execution.observer is not None:
            execution.observer.finished_with(reply)
        if not execution.superseded and execution.cell is not None:
            count = reply.get("execution_count")
            execution.cell.finish(count if isinstance(count, int) else None)
        self._end(execution)
        self._tell()

    def _settle_resumed(self) -> None:
        """The barrier came back: the resumed executions still here ended while no server
        was there (their idle status went nowhere)."""
        for execution in [e for e in self._sent.values() if e.resumed]:
            if execution.outputs is not None and not execution.superseded:
                try:
                    execution.outputs.apply(
                        "stream",
                        {
                            "name": "stderr",
                            "text": "[the server restarted while this cell ran: it ended "
                            "meanwhile, and what it printed then is not shown]\n",
                        },
                    )
                except CellGone:
                    execution.outputs = None
            execution.idle = True
            self._maybe_finish(execution)

    # --- ZMQ -------------------------------------------------------------------------------

    def _start_sender(self) -> None:
        self._wake.set()
        if self._sender is None or self._sender.done():
            self._sender = self._tasks.spawn(self._send_loop(), "the cell sender")

    async def _send_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                try:
                    if not self._connected:
                        await self._ensure_connected()
                        if not self._queue:
                            break
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
                # Only a client that polls its request can answer input(); elsewhere it fails
                # at once with a clear error instead of hanging.
                "allow_stdin": item.observer is not None,
                "stop_on_error": True,
            }
            self._sent[item.msg_id] = item
            await self._send_message(
                "execute_request",
                content,
                metadata={"cellId": item.key.cell_id} if item.key is not None else {},
                msg_id=item.msg_id,
            )
            self._tell()
        elif item.msg_type == "input_reply":
            await self._send_message(
                item.msg_type, item.content, channel="stdin", parent=item.parent_header
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
        channel: str = "shell",
        parent: dict[str, Any] | None = None,
    ) -> str:
        kernel = self._channel
        if kernel is None or channel not in kernel.sockets:
            raise DriverError("not connected to the kernel")
        msg_id, parts = kernel.compose(
            msg_type, content, metadata=metadata, parent=parent, msg_id=msg_id
        )
        await kernel.send_parts(channel, parts, buffers or [])
        return msg_id

    async def _ensure_connected(self) -> None:
        async with self._connect_lock:
            if self._connected:
                return
            if self._accepting is not None:
                # Not while the kernel (re)starts: wait until it takes requests.
                await self._accepting()
            if any(e.resumed for e in self._sent.values()):
                await self._connect_resuming()
            elif self._queue:
                await self._connect()

    async def _connect_resuming(self) -> None:
        """Open the sockets to a kernel that may be busy with a resumed execution for hours:
        wait for iopub (control's kernel_info_request is answered even while busy, and its
        status goes out on iopub), not for a shell reply; then send the barrier on shell."""
        self._disconnect()
        kernel = KernelChannel(
            self.connection_info,
            _parse,
            channels=(*_CHANNELS, "control"),
            name=self.name,
            session=self._session,
        )
        self._channel = kernel
        self._iopub_seen.clear()
        kernel.open(self._on_message)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        while not self._iopub_seen.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._disconnect()
                raise DriverError(f"no message on iopub within {self._ready_timeout:g} s")
            kernel.post("control", "kernel_info_request", {})
            try:
                await asyncio.wait_for(self._iopub_seen.wait(), min(remaining, 1.0))
            except asyncio.TimeoutError:
                continue
        self._barriers.add(kernel.post("shell", "kernel_info_request", {}))
        self._connected = True
        logger.info("Kernel %s: server-side execution taken back", self.name)

    async def _connect(self) -> None:
        """Open the sockets and return once the kernel answered and iopub reaches us (and
        stdin is connected: a kernel answers input() on stdin only to a peer it knows)."""
        self._disconnect()
        kernel = KernelChannel(
            self.connection_info,
            _parse,
            channels=_CHANNELS,
            name=self.name,
            session=self._session,
        )
        self._channel = kernel
        kernel.open(self._on_message)
        try:
            await kernel.wait_kernel_info(self._ready_timeout)
        except NoAnswer:
            self._disconnect()
            raise DriverError(
                f"the kernel did not answer kernel_info within {self._ready_timeout:g} s"
            ) from None
        except LinkFailed:
            self._disconnect()
            raise DriverError(
                f"the kernel's stdin did not connect within {self._ready_timeout:g} s"
            ) from None
        except BaseException:
            self._disconnect()
            raise
        self._connected = True
        logger.info("Kernel %s: server-side execution connected", self.name)

    def _disconnect(self) -> None:
        self._connected = False
        self._barriers.clear()
        if self._channel is not None:
            self._channel.abort()
            self._channel = None

    async def _on_message(self, channel: str, message: _Message) -> None:
        if not self._handling.locked() and not any(e.resumed for e in self._sent.values()):
            self._resumed_seen.clear()
            await self._handle(channel, message)
            return
        async with self._handling:
            if self._seen_twice(message):
                return
            await self._handle(channel, message)

    def _seen_twice(self, message: _Message) -> bool:
        parent = self._sent.get(message.parent_msg_id or "")
        if parent is None or not parent.resumed:
            return False
        msg_id = message.header.get("msg_id")
        if not isinstance(msg_id, str):
            return False
        if msg_id in self._resumed_seen:
            return True
        self._resumed_seen.add(msg_id)
        return False

    async def _handle(self, channel: str, message: _Message) -> None:
        try:
            if channel == "iopub":
                await self._on_iopub(message)
            elif channel == "stdin":
                self._on_stdin(message)
            else:
                await self._on_shell(message)
        except CellGone as error:
            # A display update aimed at a cell deleted meanwhile: nowhere to go.
            logger.debug("Kernel %s: a %s for a deleted cell: %r", self.name, channel, error)
        except Exception:
            # A bad message or a failing widget must not stop the cells that follow.
            logger.exception(
                "Kernel %s: could not handle a %s %s", self.name, channel, message.msg_type
            )

    async def _settle(self, execution: _Execution) -> None:
        if self._quiet is not None and execution.key is not None and execution.cell is not None:
            await self._quiet(execution.key)

    async def _on_shell(self, message: _Message) -> None:
        parent_id = message.parent_msg_id
        if parent_id is None:
            return
        if self._channel is not None and self._channel.claim(message):
            return
        execution = self._sent.get(parent_id)
        if execution is not None and message.msg_type == "execute_reply":
            await self._settle(execution)
            execution.reply = message.content
            self._maybe_finish(execution)

    def _on_stdin(self, message: _Message) -> None:
        parent_id = message.parent_msg_id
        execution = self._sent.get(parent_id) if parent_id is not None else None
        if message.msg_type != "input_request" or execution is None:
            return
        if execution.observer is None:
            logger.warning("Kernel %s: an input_request nobody can answer", self.name)
            return
        self._input_parent = message.header
        self._input_for = execution
        execution.observer.input_requested(message.header, message.content)

    async def _on_iopub(self, message: _Message) -> None:
        msg_type = message.msg_type
        self._iopub_seen.set()
        try:
            await self._on_iopub_message(message, msg_type)
        finally:
            msg_id = message.header.get("msg_id")
            if isinstance(msg_id, str):
                self._recent_iopub.append(msg_id)
                self._iopub_moved.set()

    async def _on_iopub_message(self, message: _Message, msg_type: str) -> None:
        if (
            self._barriers
            and msg_type == "status"
            and message.parent_msg_id in self._barriers
            and message.content.get("execution_state") == "idle"
        ):
            self._barriers.clear()
            self._settle_resumed()
            return
        if msg_type in _COMM_TYPES:
            self._on_comm(message)
            return
        if msg_type == "update_display_data":
            self.displays.update(message.content, self._sink_for)
            for running in self._sent.values():
                if running.observer is not None:
                    running.observer.update_display(message.content)
            return
        parent_id = message.parent_msg_id
        execution = self._sent.get(parent_id) if parent_id is not None else None
        if execution is None:
            return
        await self._settle(execution)
        header_id = message.header.get("msg_id")
        if isinstance(header_id, str):
            execution.last_msg_id = header_id
        if msg_type == "status":
            state = message.content.get("execution_state")
            if state == "busy":
                execution.start()
            elif state == "idle":
                execution.idle = True
                self._maybe_finish(execution)
            return
        if msg_type == "execute_input":
            execution.start()
            count = message.content.get("execution_count")
            if isinstance(count, int) and not isinstance(count, bool):
                execution.execution_count = count
                self._tell()
            return
        if msg_type not in _OUTPUT_MESSAGES:
            return
        if execution.observer is not None:
            execution.observer.output(msg_type, message.content)
        if execution.superseded or execution.outputs is None:
            return
        if self._widgets is not None and msg_type in ("display_data", "execute_result"):
            model_id = widget_model_id(message.content)
            if model_id is not None:
                await self._widgets.share(model_id)
        try:
            execution.outputs.apply(msg_type, message.content)
        except CellGone as error:
            # The cell was deleted meanwhile: its outputs have nowhere to go; the service
            # says so once, when the cell ends.
            logger.debug("Kernel %s: outputs of a deleted cell dropped: %r", self.name, error)
            execution.outputs = None

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


def _parse(channel: str, parts: list[bytes], buffers: list[Any]) -> _Message | None:
    """Every part parsed (server-side execution reads all of a message)."""
    try:
        header, parent, metadata, content = (unpack(part) for part in parts)
    except ValueError as error:
        logger.warning("Dropped a %s message: %s", channel, error)
        return None
    if not all(isinstance(p, dict) for p in (header, parent, metadata, content)):
        logger.warning("Dropped a malformed %s message", channel)
        return None
    return _Message(header, parent, metadata, content, [bytes(b) for b in buffers])
