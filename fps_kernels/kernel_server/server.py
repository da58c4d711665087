"""KernelServer: one kernel served to any number of WebSocket clients (upstream's API).

A thin front over the pieces that do the work: the kernel's process (supervisor.py, for a
kernel launched here), its ZMQ sockets (kernel_driver/channel.py: one set per kernel,
whatever the number of clients, iopub read all the time so that execution state is known
without clients), what the kernel says on its way to clients (dispatch.py) and the clients'
WebSockets (bridge.py). Where it stands is one state (readiness.py).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import zmq
from starlette.websockets import WebSocket

from ..kernel_driver.channel import (
    LINKED_CHANNELS,
    KernelChannel,
    LinkFailed,
    NoAnswer,
    ProcessExited,
)
from ..kernel_driver.connection import (
    ConnectionInfo,
    InvalidConnectionFile,
    PortAllocator,
    new_connection_info,
    parse_connection_info,
    read_connection_file,
    write_connection_file,
)
from ..kernel_driver.control import request_shutdown
from ..kernel_driver.kernelspec import KernelSpec, load_kernelspec
from ..kernel_driver.ownership import process_start
from ..kernel_driver.paths import runtime_dir
from ..kernel_driver.process import ProcessHandle, describe_exit
from ..kernel_driver.tasks import BackgroundTasks
from ..persist.keeper_client import keeper_socket_path
from ..persist.liveness import AdoptedProcess
from ..persist.logs import kernel_log_path
from ..persist.record import KernelRecord
from .activity import ExecutionState, KernelActivity
from .bridge import ClientBridge
from .close_codes import CloseCode
from .dispatch import KernelDispatch
from .keeping import KernelKeeping, queued_replies
from .messages import KernelMessage, notice
from .readiness import Readiness, ReadinessState
from .registry import KernelEntry, KernelRegistry
from .settings import ServerSettings
from .supervisor import KernelStartError, KernelSupervisor
from .takeback import TakeBackInbound

__all__ = [
    "KernelServer",
    "KernelStartError",
    "KernelEntry",
    "Readiness",
    "KernelRegistry",
    "ServerSettings",
    "kernels",
]

logger = logging.getLogger(__name__)

#: Every kernel served at /api/kernels/{id}/channels (upstream's public registry).
kernels = KernelRegistry()

_DEALERS = ("shell", "control", "stdin")
_TAKEN_BACK_LINKS = ("iopub", *_DEALERS)
#: How long a kernel taken back may take to accept our sockets before it is served anyway.
_TAKE_BACK_LINKS = 5.0


@dataclass(frozen=True)
class KernelIdentity:
    """Who a served kernel is, beyond upstream's constructor arguments."""

    kernelspec: KernelSpec | None = None
    kernel_id: str = ""
    kernel_name: str = ""
    session_name: str | None = None
    #: Where its ports come from (the registry's allocator unless given).
    ports: PortAllocator | None = None
    #: The ZMQ identity of its shell/control/stdin sockets (random unless given).
    zmq_identity: bytes | None = None


class KernelServer:
    """Serves one kernel to any number of WebSocket clients.

    `KernelServer.launching(spec, ...)` launches a kernel of a kernelspec;
    `KernelServer.attaching(connection_file, ...)` attaches to one started elsewhere.
    Upstream's constructor works too: `kernelspec_path=` (a kernel.json or its directory) to
    launch, `connection_file=` with `write_connection_file=False` to attach.
    """

    def __init__(
        self,
        kernelspec_path: str = "",
        kernel_cwd: str = "",
        connection_cfg: dict[str, Any] | None = None,
        connection_file: str = "",
        write_connection_file: bool = True,
        capture_kernel_output: bool = True,
        *,
        settings: ServerSettings | None = None,
        identity: KernelIdentity | None = None,
    ) -> None:
        identity = identity or KernelIdentity()
        kernelspec = identity.kernelspec
        if kernelspec is None and kernelspec_path:
            spec_path = Path(kernelspec_path)
            kernelspec = load_kernelspec(spec_path.parent if spec_path.is_file() else spec_path)
        settings = settings or ServerSettings()
        if not capture_kernel_output:
            settings = replace(settings, capture_kernel_output=False)
        self.kernelspec = kernelspec
        self.kernel_cwd = kernel_cwd
        self.write_connection_file = write_connection_file
        self.kernel_id = identity.kernel_id or str(uuid.uuid4())
        self.kernel_name = identity.kernel_name or (kernelspec.name if kernelspec else "")
        self.session_name = identity.session_name
        self.settings = settings
        self._ports = identity.ports if identity.ports is not None else kernels.ports

        self.activity = KernelActivity()
        self.readiness = ReadinessState()
        self.kernel_info: dict[str, Any] = {}
        self.connection_file_path = ""
        self.connection_info = self._setup_connection(connection_file, connection_cfg)
        self.kernel_name = self.kernel_name or self.connection_info.kernel_name

        self._channel: KernelChannel[KernelMessage] = KernelChannel(
            self.connection_info,
            KernelMessage,
            name=self.kernel_id,
            identity=identity.zmq_identity,
            # A kernel taken back: every socket is watched (see take_back()).
            linked=LINKED_CHANNELS if identity.zmq_identity is None else _TAKEN_BACK_LINKS,
        )
        self._bridge = ClientBridge(self.kernel_id, settings, self._channel, self.readiness)
        self._dispatch = KernelDispatch(
            self.kernel_id, self._bridge, self.activity, self._channel.session, self._cell_ran
        )
        self._supervisor: KernelSupervisor | None = None
        # Finishes a start that returned as soon as the process ran (see start()).
        self._tasks = BackgroundTasks(f"Kernel {self.kernel_id}")
        # kernels.persist: the record of a kernel being taken back, its keeper.
        self._taken_back: KernelRecord | None = None
        self._inbound: TakeBackInbound | None = None
        self._keeping: KernelKeeping | None = None

    @classmethod
    def launching(
        cls,
        spec: KernelSpec,
        *,
        kernel_id: str = "",
        kernel_name: str = "",
        cwd: str = "",
        session_name: str | None = None,
        settings: ServerSettings | None = None,
        ports: PortAllocator | None = None,
    ) -> KernelServer:
        """A server that launches a kernel of `spec` when started."""
        identity = KernelIdentity(spec, kernel_id, kernel_name, session_name, ports)
        return cls(kernel_cwd=cwd, settings=settings, identity=identity)

    @classmethod
    def attaching(
        cls,
        connection_file: str,
        *,
        kernel_id: str = "",
        kernel_name: str = "",
        settings: ServerSettings | None = None,
    ) -> KernelServer:
        """A server for the kernel of `connection_file`, started elsewhere (InvalidConnection
        File or ValueError for a bad file)."""
        identity = KernelIdentity(kernel_id=kernel_id, kernel_name=kernel_name)
        return cls(
            connection_file=connection_file,
            write_connection_file=False,
            settings=settings,
            identity=identity,
        )

    @classmethod
    def adopting(
        cls,
        record: KernelRecord,
        process: AdoptedProcess,
        spec: KernelSpec | None,
        settings: ServerSettings,
        ports: PortAllocator | None = None,
    ) -> KernelServer:
        """A server for a kernel an earlier server launched and let go (kernels.persist),
        with the same id, connection file and ZMQ identity; `take_back()` serves it again.
        It owns the process and the connection file as if it had launched it: a stop shuts
        the kernel down and removes the file; if the kernel dies, `spec` launches it again.
        InvalidConnectionFile or ValueError for a bad connection file."""
        identity = KernelIdentity(
            spec,
            record.kernel_id,
            record.kernel_name,
            None,
            ports,
            zmq_identity=bytes.fromhex(record.shell_identity),
        )
        server = cls(
            kernel_cwd=record.cwd,
            connection_file=record.connection_file,
            write_connection_file=False,
            settings=settings,
            identity=identity,
        )
        # Read, not rewritten, but ours from now on: removed at stop, its ports held.
        server.write_connection_file = True
        server._ports.hold(server.connection_info.ports())
        server._supervisor = server._new_supervisor()
        server._supervisor.adopt(process)
        server._taken_back = record
        return server

    # --- upstream's attributes -----------------------------------------------------------

    @property
    def capture_kernel_output(self) -> bool:
        return self.settings.capture_kernel_output

    @property
    def connection_cfg(self) -> dict[str, Any]:
        return self.connection_info.model_dump()

    @property
    def key(self) -> str:
        return self.connection_info.key

    @property
    def connections(self) -> int:
        return self._bridge.connections

    @property
    def last_activity(self) -> dict[str, str]:
        return self.activity.summary()

    @property
    def execution_state(self) -> ExecutionState:
        return self.activity.execution_state

    @property
    def owns_process(self) -> bool:
        """Whether this server launched the kernel (and so may signal and kill it)."""
        return self.process is not None

    @property
    def process(self) -> ProcessHandle | None:
        return self._supervisor.process if self._supervisor is not None else None

    @property
    def blocked_messages(self) -> list[str]:
        return self._bridge.blocked_messages

    @blocked_messages.setter
    def blocked_messages(self, value: list[str]) -> None:
        self._bridge.blocked_messages = value

    @property
    def allowed_messages(self) -> list[str] | None:
        return self._bridge.allowed_messages

    @allowed_messages.setter
    def allowed_messages(self, value: list[str] | None) -> None:
        self._bridge.allowed_messages = value

    async def wait_accepting(self) -> None:
        """Return once the kernel takes requests: at once, unless it is (re)starting."""
        await self.readiness.wait_accepting()

    def block_messages(self, message_types: Iterable[str] | str = ()) -> None:
        self.allowed_messages = None
        self.blocked_messages = (
            [message_types] if isinstance(message_types, str) else list(message_types)
        )

    def allow_messages(self, message_types: Iterable[str] | str | None = None) -> None:
        self.blocked_messages = []
        if message_types is None:
            self.allowed_messages = None
        elif isinstance(message_types, str):
            self.allowed_messages = [message_types]
        else:
            self.allowed_messages = list(message_types)

    def broadcast(self, message: KernelMessage) -> None:
        self._bridge.broadcast(message)

    def broadcast_status(self, state: ExecutionState) -> None:
        self._dispatch.announce(state)

    async def serve(
        self,
        websocket: WebSocket,
        session_id: str,
        permissions: dict[str, list[str]] | None = None,
    ) -> None:
        """Accept `websocket` and bridge it to the kernel until either side goes away."""
        await self._bridge.serve(websocket, session_id)

    # --- kernels that outlive the server (kernels.persist) --------------------------------

    @property
    def zmq_identity(self) -> bytes:
        """The ZMQ identity of its shell, control and stdin sockets, the same for its whole
        life (restarts included): a server taking it back reuses it, so that the replies to
        requests sent before reach it."""
        return self._channel.identity

    @property
    def keeper_socket(self) -> str:
        """The socket of the keeper holding its output, "" without one."""
        return self._keeping.socket_path if self._keeping is not None else ""

    def process_identity(self) -> tuple[int, str] | None:
        """(pid, start time) of its process, which tells it from a later process given the
        same pid; None without a process of ours."""
        pid = self._supervisor.process_pid if self._supervisor is not None else None
        if pid is None:
            return None
        return pid, process_start(pid) or ""

    def client_ids(self) -> tuple[str, ...]:
        """The session_ids of its clients with a mailbox (connected or expected back)."""
        return tuple(self._bridge.clients)

    @property
    def clients_changed(self) -> Callable[[], None] | None:
        """Called when what a record holds of the kernel changes: client_ids() (a new client,
        a mailbox forgotten), its process (started again), its keeper_socket."""
        return self._bridge.on_change

    @clients_changed.setter
    def clients_changed(self, hook: Callable[[], None] | None) -> None:
        self._bridge.on_change = hook

    def follow_cell(self, msg_id: str, follower: Callable[[str, KernelMessage], None]) -> bool:
        """For a kernel taken back: hand `follower` the messages (any channel) whose parent is
        `msg_id`, one of the record's running cells: those kept since the take-back (the
        keeper's backlog first), then the live ones until the cell's idle status. False
        when that cell is not followed (not running at take-back, or forgotten after
        offline_buffer_seconds)."""
        return self._inbound is not None and self._inbound.follow(msg_id, follower)

    async def take_back(self) -> None:
        """Serve again the kernel `adopting()` describes, at once: never waits for a
        kernel_info_reply (a busy kernel answers only when its cell ends). Its recorded
        clients get mailboxes first; its keeper's backlog is played before live output; it
        takes requests once our sockets are connected, and is "busy" until it answers."""
        record = self._taken_back
        if record is None:
            raise RuntimeError("take_back() serves a kernel given to adopting()")
        if self.readiness.state is not Readiness.NEW:
            raise RuntimeError("this kernel server was already started")
        self.readiness.set(Readiness.STARTING)
        self.activity.set_state("busy", "taken back after a server restart")
        self._bridge.expect(record.clients)
        inbound = TakeBackInbound(
            self._dispatch.dispatch,
            [cell.msg_id for cell in record.running],
            self.settings.offline_buffer_seconds,
            to_client=self._queue_for,
            name=self.kernel_id,
        )
        self._inbound = inbound
        # iopub first, the keeper's backlog, then the DEALERs: a kernel's ROUTER hands an
        # identity to the peer whose connection came last, and a keeper that connected its
        # own after ours (a server killed just before) would hold our replies for good.
        self._channel.open(inbound, later=_DEALERS)
        wait = min(_TAKE_BACK_LINKS, self.settings.startup_timeout)
        try:
            late = await self._channel.wait_linked(wait, ("iopub",))
            backlog = None
            # Recorded, or started by a server killed before it recorded it.
            socket = record.keeper_socket or str(self._keeper_path())
            if record.keeper_socket or Path(socket).exists():
                backlog = await self._keeper().attach(socket)
            dropped = inbound.play(backlog, self._channel.verify)
            if dropped:
                self._bridge.broadcast(
                    notice(
                        f"{dropped} output message(s) were dropped while the server was away: "
                        "more than the keeper holds came meanwhile.",
                        self._channel.session,
                        self._dispatch.running_cell,
                    )
                )
            self._channel.connect(_DEALERS)
            late += await self._channel.wait_linked(wait, _DEALERS)
            if late:
                logger.warning(
                    "Kernel %s: no connection on %s yet: served anyway",
                    self.kernel_id,
                    ", ".join(late),
                )
        except BaseException:
            self._dispatch.stop()
            await self._channel.close()
            raise
        pid = self._supervisor.process_pid if self._supervisor is not None else None
        if self._keeping is not None and not self.settings.persist_keeper:
            await self._keeping.shutdown()  # a keeper the option no longer wants
        elif self.settings.persist_keeper:
            keeping = self._keeper()
            keeping.adopted(pid)
            keeping.ensure(pid)
        self.readiness.set(Readiness.READY)
        reply: asyncio.Future[KernelMessage] = asyncio.get_running_loop().create_future()
        reply.add_done_callback(self._answered)
        self._channel.post("shell", "kernel_info_request", {}, reply)
        self._watch()
        logger.info(
            "Kernel %s (pid %s) taken back%s",
            self.kernel_id,
            pid,
            f", {len(backlog.messages)} message(s) from its keeper" if backlog else "",
        )

    def _queue_for(self, session_id: str, message: KernelMessage) -> bool:
        """Queue a message kept over the restart for the client `session_id` (a mailbox of
        record.clients); False when it has none."""
        client = self._bridge.clients.get(session_id)
        if client is None:
            return False
        self._dispatch.saw(message)
        client.send(message)
        return True

    def _answered(self, reply: asyncio.Future[KernelMessage]) -> None:
        if reply.cancelled():
            return
        self.kernel_info = reply.result().content()
        if self.activity.execution_state == "busy":
            # Its shell answered: no cell runs (iopub tells from now on).
            self.activity.set_state("idle", "")

    def _keeper_path(self) -> Path:
        return keeper_socket_path(self.kernel_id)

    def _keeper(self) -> KernelKeeping:
        if self._keeping is None:
            self._keeping = KernelKeeping(
                self.kernel_id,
                self.connection_file_path,
                self.zmq_identity,
                kernel_log_path(self.kernel_id),
                self._bridge.changed,
            )
        return self._keeping

    @property
    def last_iopub_id(self) -> str:
        """The msg_id of the last iopub message handed to clients, "" if none: where the
        keeper takes over at let_go() (server-side execution catches up to it)."""
        last = self._dispatch.last_delivered
        msg_id = last.header.get("msg_id") if last is not None else None
        return msg_id if isinstance(msg_id, str) else ""

    async def let_go(self, notice: str | None = None) -> None:
        """The server stops, the kernel stays (kernels.persist): the clients get what is
        queued for them and are told to come back (1001); the keeper takes over after the
        last output they were given (any client's queue that could not be written is kept
        again); the sockets close; the process is left alone, its connection file and log
        kept."""
        await self._stop_watching()
        # Requests from now on wait, then are dropped: the kernel is no longer ours.
        self.readiness.set(Readiness.RESTARTING)
        self._channel.stop_reading("iopub")
        last = self._dispatch.flush()
        # The clients get what is queued for them (those still connected), then what was
        # left in a queue (an offline client's, one closed before) the keeper keeps again.
        mailboxes = list(self._bridge.clients.values())
        await self._bridge.close_clients(
            CloseCode.GOING_AWAY, notice or "The server is restarting; the kernel goes on"
        )
        unsent = [m for m in (box.first_unsent_iopub() for box in mailboxes) if m is not None]
        # Replies queued for clients offline at the stop: the keeper keeps them for the next
        # server, which hands them to those clients when they come back.
        replies = queued_replies(mailboxes, self._channel.signer)
        kept = self._keeping is not None and await self._keeping.detach(last, unsent, replies)
        if replies and not kept:
            logger.warning(
                "Kernel %s: %d reply message(s) queued for offline clients are lost: no "
                "keeper takes them",
                self.kernel_id,
                len(replies),
            )
        self._dispatch.stop()
        await self._channel.close()
        self.readiness.set(Readiness.DEAD)
        if self._supervisor is not None:
            self._supervisor.let_go()
        logger.info("Kernel %s let go: it outlives the server", self.kernel_id)

    # --- connection file -----------------------------------------------------------------

    def _setup_connection(
        self, connection_file: str, connection_cfg: dict[str, Any] | None
    ) -> ConnectionInfo:
        if self.write_connection_file:
            if connection_cfg is not None:
                info = parse_connection_info(connection_cfg)
                self._ports.hold(info.ports())
            else:
                info = new_connection_info(self._ports, self.kernel_name, self._wants_curve())
            path = connection_file or str(runtime_dir() / f"kernel-{self.kernel_id}.json")
            write_connection_file(path, info)
            self.connection_file_path = path
            return info
        if connection_file:
            self.connection_file_path = connection_file
            return read_connection_file(connection_file)
        if connection_cfg is None:
            raise InvalidConnectionFile("No connection_cfg")
        return parse_connection_info(connection_cfg)

    def _wants_curve(self) -> bool:
        """Whether to encrypt with CurveZMQ, as transport_encryption and the kernelspec say."""
        policy = self.settings.transport_encryption
        if policy == "disabled":
            return False
        supported = (self.kernelspec.metadata if self.kernelspec else {}).get(
            "supported_encryption", []
        )
        if isinstance(supported, str):
            supported = [supported]
        can = zmq.has("curve") and "curve" in [str(s).lower() for s in supported]
        if policy == "required" and not can:
            raise KernelStartError(
                f"Kernel {self.kernel_name!r} cannot use CurveZMQ encryption, which "
                "transport_encryption=required asks for"
            )
        return can

    def _remove_connection_file(self) -> None:
        if self.write_connection_file and self.connection_file_path:
            Path(self.connection_file_path).unlink(missing_ok=True)
            self._ports.release(self.connection_info.ports())

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self, launch_kernel: bool = True, wait_ready: bool = True) -> None:
        """Launch (or attach to) the kernel and return once it answered kernel_info.

        With `wait_ready=False` (a launched kernel), return as soon as its process runs: the
        state stays `starting` and client messages wait until the kernel answers. A kernel
        that then dies or never answers becomes `dead`, with the reason, and stays listed.
        Either way, a kernel that cannot be spawned raises KernelStartError at once.
        """
        if self.readiness.state is not Readiness.NEW:
            raise RuntimeError("this kernel server was already started")
        self.readiness.set(Readiness.STARTING)
        self._channel.open(self._dispatch.dispatch)
        try:
            if launch_kernel:
                await self._launch()
            if wait_ready or self.process is None:
                await self._wait_ready()
        except BaseException:
            await self._shutdown_quietly()
            raise
        if self.readiness.answered:
            self._watch()
        else:
            self._tasks.spawn(self._finish_start(), "the end of the start")

    async def _finish_start(self) -> None:
        """Wait for a launched kernel to answer, then watch it; if it does not, it is dead:
        its process and connection file go, its clients are told, and it stays listed."""
        try:
            await self._wait_ready()
        except Exception as error:
            # Logged here, once (a traceback only for what is not a plain failed start).
            logger.error(
                "Kernel %s did not start: %s",
                self.kernel_id,
                error,
                exc_info=not isinstance(error, KernelStartError),
            )
            if self._supervisor is not None:
                await self._supervisor.terminate()
            if self.write_connection_file and self.connection_file_path:
                # Its ports stay held: a restart launches it again with the same ones.
                Path(self.connection_file_path).unlink(missing_ok=True)
            self._tell(f"The kernel did not start: {error}", "dead", str(error))
            return
        logger.info("Kernel %s is ready", self.kernel_id)
        self._watch()

    async def _launch(self) -> None:
        if self.kernelspec is None:
            raise KernelStartError("Could not find a kernel, maybe you forgot to install one?")
        if self._supervisor is None:
            self._supervisor = self._new_supervisor()
        await self._supervisor.launch()

    def _new_supervisor(self) -> KernelSupervisor:
        return KernelSupervisor(
            self.kernelspec,
            self.settings,
            kernel_id=self.kernel_id,
            cwd=self.kernel_cwd,
            session_name=self.session_name,
            connection_file=self.connection_file_path,
            connection_info=self.connection_info,
            write_file=self.write_connection_file,
        )

    def _watch(self) -> None:
        if self._supervisor is not None:
            self._supervisor.watch(self._wait_ready, self._tell)

    def _cell_ran(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cell_ran()

    def _tell(self, text: str, state: ExecutionState, reason: str) -> None:
        """Tell clients what happened to the kernel: a stderr line in the running cell, then
        the new state."""
        self.activity.set_state(state, reason)
        self.readiness.set(Readiness.RESTARTING if state == "restarting" else Readiness.DEAD)
        self._dispatch.tell(text, state)

    async def _wait_ready(self, timeout: float | None = None) -> None:
        """Ask kernel_info until the kernel answers on shell and iopub reaches us."""
        timeout = self.settings.startup_timeout if timeout is None else timeout
        process = self.process
        tail = self._output_tail
        try:
            reply = await self._channel.wait_kernel_info(
                timeout, process.wait() if process is not None else None
            )
        except NoAnswer:
            raise KernelStartError(
                f"Kernel {self.kernel_name!r} did not answer kernel_info within "
                f"{timeout:g} s{tail()}"
            ) from None
        except ProcessExited as exited:
            raise KernelStartError(
                f"Kernel {self.kernel_name!r} {describe_exit(exited.returncode)} "
                f"while starting{tail()}"
            ) from None
        except LinkFailed as failed:
            raise KernelStartError(
                f"Kernel {self.kernel_name!r} did not accept a connection on {failed.channel}"
            ) from None
        self.kernel_info = reply.content()
        if self._supervisor is not None:
            self._supervisor.ready()
            if self.settings.persist:
                self._bridge.changed()  # a new process to record
                if self.settings.persist_keeper:
                    self._keeper().ensure(self._supervisor.process_pid)
        self.readiness.set(Readiness.READY)
        if self.activity.execution_state in ("starting", "restarting"):
            self.activity.set_state("idle", self.activity.reason)

    def _output_tail(self) -> str:
        return self._supervisor.output_tail() if self._supervisor is not None else ""

    async def interrupt(self) -> None:
        """Interrupt what the kernel runs, as its kernelspec's interrupt_mode says."""
        if self._supervisor is not None and self.process is not None:
            if not self.readiness.answered:
                # Still starting: nothing runs yet, and a SIGINT would kill it mid-import.
                logger.info("Kernel %s: interrupt ignored, it is still starting", self.kernel_id)
                return
            if self.kernelspec is not None and self.kernelspec.interrupt_mode == "signal":
                self._supervisor.interrupt()
                return
        self._channel.post("control", "interrupt_request", {})

    async def restart(self) -> None:
        """Restart the kernel under the same id, connection file and ports."""
        supervisor = self._supervisor
        if supervisor is None or supervisor.process is None:
            raise KernelStartError("only a kernel launched by this server can be restarted")
        await self._stop_watching()
        answered = self.readiness.answered
        self.readiness.set(Readiness.RESTARTING)
        self.activity.set_state("restarting", self.activity.reason)
        await self._stop_process(restart=True, answered=answered)
        self._channel.clear_replay_guard()
        supervisor.reset_deaths()
        try:
            await self._launch()
            await self._wait_ready()
        except BaseException as error:
            await supervisor.terminate()
            self._tell(f"The kernel did not restart: {error}", "dead", str(error))
            raise
        self._watch()

    async def terminate(self) -> None:
        """Ask a kernel this server did not launch to shut down (a shutdown_request on
        control); nothing for one it launched: stop() shuts that one down."""
        if not self.owns_process:
            await request_shutdown(self.connection_info, self.settings.shutdown_wait)

    async def stop(self, notice: str | None = None) -> None:
        """Shut the kernel down (if we launched it), tell clients, and release everything."""
        await self._stop_watching()
        answered = self.readiness.answered
        self.readiness.set(Readiness.DEAD)
        await self._stop_process(restart=False, answered=answered)
        await self._forget_persisted()
        if notice:
            self._tell(notice, "dead", notice)
        else:
            self.activity.set_state("dead", self.activity.reason)
            self._dispatch.announce("dead")
        await self._bridge.close_clients(CloseCode.NORMAL, notice or "Kernel shut down")
        await self._close()

    async def _forget_persisted(self) -> None:
        """A kernel that could have outlived the server is shut down: its keeper and log go."""
        if self._keeping is not None:
            await self._keeping.shutdown()
        if self.settings.persist and self._supervisor is not None:
            self._supervisor.log_path.unlink(missing_ok=True)

    async def _stop_watching(self) -> None:
        """Cancel the task finishing the start, if any, and the watch of the process."""
        await self._tasks.cancel_all()
        if self._supervisor is not None:
            await self._supervisor.stop_watching()

    async def _stop_process(self, restart: bool, answered: bool) -> None:
        if self._supervisor is None:
            return
        # One that never answered would not answer a shutdown_request either: no use waiting.
        ask = (
            (lambda: self._channel.post("control", "shutdown_request", {"restart": restart}))
            if answered
            else None
        )
        await self._supervisor.stop(ask)

    async def _shutdown_quietly(self) -> None:
        await self._stop_watching()
        if self._supervisor is not None:
            await self._supervisor.terminate()
        await self._close()

    async def _close(self) -> None:
        self._dispatch.stop()
        await self._stop_watching()
        await self._bridge.close_clients(CloseCode.NORMAL, "Kernel shut down")
        await self._channel.close()
        self._remove_connection_file()
