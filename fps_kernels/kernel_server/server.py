"""KernelServer: one kernel, its ZMQ sockets, and the WebSocket clients it serves.

The server keeps one set of ZMQ sockets per kernel, whatever the number of clients: iopub
is read all the time (so execution state is known without clients and ZMQ never drops),
and the replies on shell, control and stdin go back to the client whose request caused
them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zmq
import zmq.asyncio
from starlette.websockets import WebSocket, WebSocketDisconnect
from zmq.utils.monitor import parse_monitor_message

from ..kernel_driver.connection import (
    ConnectionInfo,
    InvalidConnectionFile,
    PortAllocator,
    new_connection_info,
    parse_connection_info,
    read_connection_file,
    write_connection_file,
)
from ..kernel_driver.kernelspec import KernelSpec, environment_for_kernel, load_kernelspec
from ..kernel_driver.paths import runtime_dir
from ..kernel_driver.process import KernelProcess, describe_exit
from ..kernel_driver.signing import ReplayGuard, SignatureError, Signer
from ..kernel_driver.wire import (
    WireError,
    join_frames,
    make_message_parts,
    new_session_id,
    split_frames,
)
from .activity import ExecutionState, KernelActivity, isoformat_z
from .client import ClientConnection, Protocol
from .framing import (
    V1_SUBPROTOCOL,
    ClientMessage,
    FrameError,
    decode_legacy_binary,
    decode_legacy_text,
    decode_v1,
)
from .gaps import GapDetector, Loss
from .messages import KernelMessage, server_message
from .registry import KernelEntry, KernelRegistry
from .transport import allow_large_messages, compress_small_messages_only

__all__ = ["KernelServer", "KernelStartError", "KernelEntry", "KernelRegistry", "kernels"]

logger = logging.getLogger(__name__)

#: Every kernel served at /api/kernels/{id}/channels (upstream's public registry).
kernels = KernelRegistry()

CLIENT_CHANNELS = ("shell", "control", "stdin")
_LINKED_CHANNELS = ("control", "stdin")
_KERNEL_CHANNELS = ("iopub", "shell", "control", "stdin")
_ROUTES_KEPT = 8192
_INFO_RETRY = 0.5
# Larger messages go uncompressed even when the client offered permessage-deflate.
_COMPRESS_UP_TO = 1024 * 1024


class KernelStartError(RuntimeError):
    """The kernel did not come up: it could not be launched, exited, or never answered."""


@dataclass(frozen=True)
class ServerSettings:
    """How a KernelServer treats its kernel and clients (the plugin's options)."""

    startup_timeout: float = 60.0
    shutdown_wait: float = 3.0
    max_client_queue_bytes: int = 32 * 1024 * 1024
    autorestart: bool = True
    restart_limit: int = 5
    stable_start_time: float = 10.0
    offline_buffer_seconds: float = 120.0
    max_message_bytes: int = 128 * 1024 * 1024
    transport_encryption: Literal["disabled", "auto", "required"] = "disabled"


class KernelServer:
    """Serves one kernel to any number of WebSocket clients.

    Built from a kernelspec (`kernelspec_path=`: its kernel.json or its directory) to launch a
    kernel, or from an existing connection file (`connection_file=`,
    `write_connection_file=False`) to attach to one started elsewhere.
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
        kernelspec: KernelSpec | None = None,
        kernel_name: str = "",
        kernel_id: str = "",
        session_name: str | None = None,
        settings: ServerSettings | None = None,
        ports: PortAllocator | None = None,
    ) -> None:
        if kernelspec is None and kernelspec_path:
            spec_path = Path(kernelspec_path)
            kernelspec = load_kernelspec(spec_path.parent if spec_path.is_file() else spec_path)
        self.kernelspec = kernelspec
        self.kernel_cwd = kernel_cwd
        self.capture_kernel_output = capture_kernel_output
        self.write_connection_file = write_connection_file
        self.kernel_id = kernel_id or str(uuid.uuid4())
        self.kernel_name = kernel_name or (kernelspec.name if kernelspec else "")
        self.session_name = session_name
        self.settings = settings or ServerSettings()
        self._ports = ports if ports is not None else kernels.ports

        self.activity = KernelActivity()
        # Message filters on what clients send: blocked and allowed are exclusive.
        self.blocked_messages: list[str] = []
        self.allowed_messages: list[str] | None = None

        self._clients: dict[str, ClientConnection] = {}
        self._routes: OrderedDict[str, str] = OrderedDict()  # request msg_id → client session
        self._own_requests: dict[str, asyncio.Future[KernelMessage]] = {}
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._process: KernelProcess | None = None
        self._supervisor: asyncio.Task[None] | None = None
        # Finishes a start that returned as soon as the process ran (see start()).
        self._starter: asyncio.Task[None] | None = None
        self._answered = False  # the running process answered kernel_info
        self._unstable_deaths = 0  # deaths right after a start, in a row
        self._ready_at = 0.0
        self._did_work = False  # ran a cell to its end since its last start
        self._running_cell: dict[str, Any] = {}  # header of the execute_request being run
        self._iopub_seen = asyncio.Event()
        self._linked = {channel: asyncio.Event() for channel in _LINKED_CHANNELS}
        # Clear while the kernel (re)starts: client messages wait, or the kernel would run
        # them before our iopub socket is connected to it, and their output would be lost.
        self._accepting = asyncio.Event()
        self._session = new_session_id()
        self._replay_guard = ReplayGuard()
        # Output the kernel published but we never received (see gaps.py): while a run of
        # missing messages is being judged, the end of a cell (and what follows) is held
        # back, so that the notice lands in the cell before its idle status.
        self._gaps = GapDetector()
        self._held: list[KernelMessage] | None = None
        self._held_since = 0.0
        self._gap_timer: asyncio.TimerHandle | None = None
        # The last execute_reply, and the cells whose idle status came: when the kernel's
        # drop took a cell's idle status, the server ends the cell itself.
        self._last_reply: dict[str, Any] = {}
        self._idle_seen: deque[str] = deque(maxlen=64)
        self._started = False
        self.kernel_info: dict[str, Any] = {}

        self.connection_file_path = ""
        self.connection_info = self._setup_connection(connection_file, connection_cfg)
        self._signer = Signer(self.connection_info.key, self.connection_info.signature_scheme)
        self.kernel_name = self.kernel_name or self.connection_info.kernel_name

    # --- upstream's attributes -----------------------------------------------------------

    @property
    def connection_cfg(self) -> dict[str, Any]:
        return self.connection_info.model_dump()

    @property
    def key(self) -> str:
        return self.connection_info.key

    @property
    def connections(self) -> int:
        return sum(1 for client in self._clients.values() if client.online)

    @property
    def last_activity(self) -> dict[str, str]:
        return {
            "date": isoformat_z(self.activity.last_activity),
            "execution_state": self.activity.execution_state,
        }

    @property
    def execution_state(self) -> ExecutionState:
        return self.activity.execution_state

    @property
    def owns_process(self) -> bool:
        """Whether this server launched the kernel (and so may signal and kill it)."""
        return self._process is not None

    @property
    def process(self) -> KernelProcess | None:
        return self._process

    async def wait_accepting(self) -> None:
        """Return once the kernel takes requests: at once, unless it is (re)starting."""
        await self._accepting.wait()

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
        if self._started:
            raise RuntimeError("this kernel server was already started")
        self._started = True
        self._open_sockets()
        try:
            if launch_kernel:
                await self._launch()
            if wait_ready or self._process is None:
                await self._wait_ready()
        except BaseException:
            await self._shutdown_quietly()
            raise
        if self._answered:
            self._supervisor = self._spawn(self._supervise())
        else:
            self._starter = self._spawn(self._finish_start())

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
            if self._process is not None:
                await self._process.terminate(self.settings.shutdown_wait)
            if self.write_connection_file and self.connection_file_path:
                # Its ports stay held: a restart launches it again with the same ones.
                Path(self.connection_file_path).unlink(missing_ok=True)
            self._notify(f"The kernel did not start: {error}", "dead", str(error))
            return
        logger.info("Kernel %s is ready", self.kernel_id)
        self._supervisor = self._spawn(self._supervise())

    async def _launch(self) -> None:
        if self.kernelspec is None:
            raise KernelStartError("Could not find a kernel, maybe you forgot to install one?")
        if self.write_connection_file and not Path(self.connection_file_path).exists():
            # Removed when its first start failed: a restart launches it again.
            write_connection_file(self.connection_file_path, self.connection_info)
        self._answered = False
        env = environment_for_kernel(self.kernelspec, self.session_name)
        process = KernelProcess(
            self.kernelspec.command(os.path.realpath(self.connection_file_path)),
            env=env,
            cwd=self.kernel_cwd or None,
            capture_output=self.capture_kernel_output,
            log_name=f"kernel {self.kernel_id[:8]}",
        )
        try:
            await process.start()
        except OSError as error:
            raise KernelStartError(
                f"Could not launch kernel {self.kernel_name!r} ({process.argv[0]}): {error}"
            ) from None
        logger.info(
            "Started kernel %s (%s), pid %s, in %s",
            self.kernel_id,
            self.kernel_name,
            process.pid,
            self.kernel_cwd or os.getcwd(),
        )
        self._process = process
        self._did_work = False

    async def _supervise(self) -> None:
        """Watch the kernel process; when it dies on its own, restart it or give up."""
        loop = asyncio.get_running_loop()
        while self._process is not None:
            returncode = await self._process.wait()
            cause = f"Kernel {describe_exit(returncode)}"
            stable = (
                self._did_work or loop.time() - self._ready_at >= self.settings.stable_start_time
            )
            self._unstable_deaths = 0 if stable else self._unstable_deaths + 1
            if (
                not self.settings.autorestart
                or self._unstable_deaths >= self.settings.restart_limit
            ):
                why = (
                    "automatic restart is off"
                    if not self.settings.autorestart
                    else f"it died {self._unstable_deaths} times in a row right after starting"
                )
                logger.error("Kernel %s died and stays dead (%s): %s", self.kernel_id, why, cause)
                await self._process.terminate(self.settings.shutdown_wait)
                self._notify(f"{cause}; {why}, so it was not restarted.", "dead", cause)
                return
            logger.error("Kernel %s died (%s): restarting it", self.kernel_id, cause)
            self._notify(f"{cause}; restarting it.", "restarting", cause)
            await self._process.terminate(self.settings.shutdown_wait)
            if self._unstable_deaths > 1:
                # Back off when it keeps failing: whatever kills it may pass.
                await asyncio.sleep(min(0.25 * 2 ** (self._unstable_deaths - 2), 2.0))
            try:
                await self._launch()
                await self._wait_ready()
            except KernelStartError as error:
                logger.error("Kernel %s did not come back: %s", self.kernel_id, error)
                if self._process is not None and self._process.is_alive():
                    await self._process.terminate(self.settings.shutdown_wait)
                self._ready_at = loop.time()
                continue
            logger.info("Kernel %s restarted after: %s", self.kernel_id, cause)

    def _notify(self, text: str, state: ExecutionState, reason: str) -> None:
        """Tell clients what happened to the kernel: a stderr line in the running cell, then
        the new state (JupyterLab forgets a cell's requests on `restarting`, so the text first).
        """
        self.activity.set_state(state, reason)
        if state == "restarting":
            self._accepting.clear()
        else:
            self._accepting.set()
        parent = self._running_cell
        self._running_cell = {}
        self.broadcast(
            server_message(
                "iopub",
                "stream",
                {"name": "stderr", "text": f"[fps_kernels] {text}\n"},
                self._session,
                parent,
            )
        )
        self.broadcast_status(state)

    async def _wait_ready(self, timeout: float | None = None) -> None:
        """Ask kernel_info until the kernel answers on shell and iopub reaches us."""
        timeout = self.settings.startup_timeout if timeout is None else timeout
        self._iopub_seen.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        replied: asyncio.Future[KernelMessage] = loop.create_future()
        pending: list[str] = []
        process = self._process
        exited = asyncio.ensure_future(process.wait()) if process is not None else None
        # One waiter for the whole wait, cancelled however the wait ends (a start cancelled
        # by a stop must leave no pending task behind).
        iopub_seen = asyncio.ensure_future(self._iopub_seen.wait())
        try:
            while True:
                if not replied.done() or not iopub_seen.done():
                    pending.append(self._request("shell", "kernel_info_request", {}, replied))
                wait_for: set[asyncio.Future[Any]] = {
                    future for future in (replied, iopub_seen) if not future.done()
                }
                if not wait_for:
                    break
                if exited is not None:
                    wait_for.add(exited)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise KernelStartError(
                        f"Kernel {self.kernel_name!r} did not answer kernel_info within "
                        f"{timeout:g} s{self._output_tail()}"
                    )
                await asyncio.wait(
                    wait_for,
                    timeout=min(_INFO_RETRY, remaining),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if exited is not None and exited.done():
                    raise KernelStartError(
                        f"Kernel {self.kernel_name!r} {describe_exit(exited.result())} "
                        f"while starting{self._output_tail()}"
                    )
        finally:
            for msg_id in pending:
                self._own_requests.pop(msg_id, None)
            for future in (exited, iopub_seen):
                if future is not None and not future.done():
                    future.cancel()
        for channel, linked in self._linked.items():
            try:
                await asyncio.wait_for(linked.wait(), max(deadline - loop.time(), 0.1))
            except asyncio.TimeoutError:
                raise KernelStartError(
                    f"Kernel {self.kernel_name!r} did not accept a connection on {channel}"
                ) from None
        self.kernel_info = replied.result().content()
        self._answered = True
        self._ready_at = loop.time()
        self._accepting.set()
        if self.activity.execution_state in ("starting", "restarting"):
            self.activity.set_state("idle", self.activity.reason)

    def _output_tail(self) -> str:
        if self._process is None or not self._process.recent_output:
            return ""
        return ": " + " | ".join(list(self._process.recent_output)[-5:])

    def interrupt(self) -> None:
        """Interrupt what the kernel runs, as its kernelspec's interrupt_mode says."""
        if self._process is not None and not self._answered:
            # Still starting: nothing runs yet, and a SIGINT would kill it mid-import.
            logger.info("Kernel %s: interrupt ignored, it is still starting", self.kernel_id)
            return
        mode = self.kernelspec.interrupt_mode if self.kernelspec else "message"
        if mode == "signal" and self._process is not None:
            self._process.signal_group(signal.SIGINT)
        else:
            self._request("control", "interrupt_request", {})

    async def restart(self) -> None:
        """Restart the kernel under the same id, connection file and ports."""
        if self._process is None:
            raise KernelStartError("only a kernel launched by this server can be restarted")
        await self._stop_supervising()
        self._accepting.clear()
        self.activity.set_state("restarting", self.activity.reason)
        await self._stop_process(restart=True)
        self._replay_guard.clear()
        self._unstable_deaths = 0
        try:
            await self._launch()
            await self._wait_ready()
        except BaseException as error:
            if self._process is not None:
                await self._process.terminate(self.settings.shutdown_wait)
            self._notify(f"The kernel did not restart: {error}", "dead", str(error))
            raise
        self._supervisor = self._spawn(self._supervise())

    async def stop(self, notice: str | None = None) -> None:
        """Shut the kernel down (if we launched it), tell clients, and release everything."""
        await self._stop_supervising()
        self._accepting.set()
        if self._process is not None:
            await self._stop_process(restart=False)
        if notice:
            self._notify(notice, "dead", notice)
        else:
            self.activity.set_state("dead", self.activity.reason)
            self.broadcast_status("dead")
        await self._close_clients(1000, notice or "Kernel shut down")
        await self._close()

    async def _stop_supervising(self) -> None:
        """Cancel the task finishing the start, if any, and the supervisor."""
        for task in (self._starter, self._supervisor):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._starter = self._supervisor = None

    async def _stop_process(self, restart: bool) -> None:
        process = self._process
        if process is None:
            return
        wait = self.settings.shutdown_wait
        if process.is_alive() and self._answered:
            # One that never answered would not answer this either: no use waiting.
            self._request("control", "shutdown_request", {"restart": restart})
            try:
                await asyncio.wait_for(process.wait(), wait)
            except asyncio.TimeoutError:
                logger.info("Kernel %s ignored shutdown_request: terminating", self.kernel_id)
        returncode = await process.terminate(wait)
        logger.info(
            "Kernel %s %s",
            self.kernel_id,
            describe_exit(returncode) if returncode is not None else "could not be reaped",
        )

    async def _shutdown_quietly(self) -> None:
        await self._stop_supervising()
        if self._process is not None:
            await self._process.terminate(self.settings.shutdown_wait)
        await self._close()

    async def _close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()
        for future in self._own_requests.values():
            future.cancel()
        self._own_requests.clear()
        self._remove_connection_file()

    # --- ZMQ side --------------------------------------------------------------------------

    def _open_sockets(self) -> None:
        context = zmq.asyncio.Context.instance()
        # shell and stdin share one identity: the kernel sends input_request on stdin to
        # the identity that sent the execute_request on shell.
        identity = uuid.uuid4().hex.encode()
        info = self.connection_info
        for channel in _KERNEL_CHANNELS:
            sock = context.socket(zmq.SUB if channel == "iopub" else zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # The kernel binds its ports after we connect: retry fast, so that a (re)started
            # kernel is reached within milliseconds, not ZMQ's default 100 ms.
            sock.setsockopt(zmq.RECONNECT_IVL, 10)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 50)
            if channel == "iopub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
                # We read iopub as fast as it comes; never let ZMQ drop silently.
                sock.setsockopt(zmq.RCVHWM, 0)
            else:
                sock.setsockopt(zmq.IDENTITY, identity)
            if info.encrypted:
                sock.curve_secretkey = info.curve_secretkey.encode()  # type: ignore[union-attr]
                sock.curve_publickey = info.curve_publickey.encode()  # type: ignore[union-attr]
                sock.curve_serverkey = info.curve_publickey.encode()  # type: ignore[union-attr]
            if channel in _LINKED_CHANNELS:
                monitor = sock.get_monitor_socket(
                    zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                )
                self._spawn(self._watch_link(channel, monitor))
            sock.connect(info.url(channel))
            self._sockets[channel] = sock
        for channel in _KERNEL_CHANNELS:
            self._spawn(self._read(channel))

    async def _watch_link(self, channel: str, monitor: zmq.asyncio.Socket) -> None:
        """Know when a DEALER is really connected: a kernel's ROUTER silently drops what it
        sends to an identity not connected yet (an input_request on stdin, for one)."""
        linked = self._linked[channel]
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    linked.set()
                else:
                    linked.clear()
        finally:
            monitor.close(linger=0)

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "Kernel %s: a background task failed", self.kernel_id, exc_info=task.exception()
            )

    async def _read(self, channel: str) -> None:
        sock = self._sockets[channel]
        while True:
            frames = await sock.recv_multipart()
            message = self._check(channel, frames)
            if message is not None:
                self._dispatch(channel, message)

    def _check(self, channel: str, frames: list[bytes]) -> KernelMessage | None:
        try:
            wire = split_frames(frames)
            self._signer.check(wire.signature, wire.parts)
            self._replay_guard.check(wire.signature)
        except (WireError, SignatureError) as error:
            logger.warning("Kernel %s: dropped a %s message: %s", self.kernel_id, channel, error)
            return None
        return KernelMessage(channel, wire.parts, wire.buffers)

    def _dispatch(self, channel: str, message: KernelMessage) -> None:
        iopub = channel == "iopub"
        if self._gaps.observe(
            message.header.get("msg_id"), iopub, lambda: message.parent_header, time.monotonic()
        ):
            self._arm_gap_timer()
        if iopub:
            self._track(message)
            self._iopub_seen.set()
            ends_cell = self._ends_cell(message)
            if self._held is None and ends_cell and self._gaps.pending():
                self._held = []
                self._held_since = time.monotonic()
                self._arm_gap_timer()
            if self._held is not None:
                self._held.append(message)
                return
            for client in list(self._clients.values()):
                client.send(message)
            return
        if message.msg_type == "execute_reply":
            self._last_reply = message.parent_header
        if self._held is not None and not self._gaps.pending():
            # the late reply filled the gap: nothing was lost
            self._release_held()
        parent_id = message.parent_msg_id
        if parent_id is None:
            return
        own = self._own_requests.pop(parent_id, None)
        if own is not None:
            if not own.done():
                own.set_result(message)
            return
        # Only the connection that sent the request gets what answers it: never a client
        # named by the ids in the message, which any client can write.
        if channel == "stdin":
            session_id = self._routes.get(parent_id)
        else:
            session_id = self._routes.pop(parent_id, None)
        requester = self._clients.get(session_id) if session_id is not None else None
        if requester is not None:
            requester.send(message)

    def _ends_cell(self, message: KernelMessage) -> bool:
        if message.msg_type != "status" or message.content().get("execution_state") != "idle":
            return False
        parent_id = message.parent_msg_id
        if parent_id is not None:
            self._idle_seen.append(parent_id)
        return True

    def _arm_gap_timer(self) -> None:
        if self._gap_timer is not None:
            return
        due = self._gaps.next_due()
        if due is None:
            return
        delay = max(due - time.monotonic(), 0.0)
        self._gap_timer = asyncio.get_running_loop().call_later(delay, self._judge_gaps)

    def _judge_gaps(self) -> None:
        self._gap_timer = None
        now = time.monotonic()
        self._tell_losses(self._gaps.due(now))
        if self._held is not None and (
            not self._gaps.pending() or now - self._held_since >= self._gaps.settle
        ):
            self._release_held()
        if self._gaps.pending():
            self._arm_gap_timer()

    def _release_held(self) -> None:
        self._tell_losses(self._gaps.due(time.monotonic()))
        held, self._held = self._held or [], None
        for message in held:
            self.broadcast(message)

    def _end_orphan_cell(self) -> None:
        """After a loss: if the cell that was answered never got its idle status (ipykernel
        sends it right after execute_reply, so it was lost too), send one for it, or the
        cell would look busy forever."""
        parent = self._last_reply
        msg_id = parent.get("msg_id")
        if not isinstance(msg_id, str) or msg_id in self._idle_seen:
            return
        if self.activity.execution_state != "busy" or not self._sockets:
            return  # it did end (another status came), or the kernel was stopped meanwhile
        logger.warning("Kernel %s: the idle status of cell %s was lost", self.kernel_id, msg_id)
        self._idle_seen.append(msg_id)
        idle = server_message("iopub", "status", {"execution_state": "idle"}, self._session, parent)
        self._track(idle)
        if self._held is not None:
            self._held.append(idle)
        else:
            self.broadcast(idle)

    def _tell_losses(self, losses: list[Loss]) -> None:
        """A stderr line in the cell whose output was lost, for every client."""
        if losses:
            asyncio.get_running_loop().call_later(self._gaps.settle, self._end_orphan_cell)
        for loss in losses:
            text = (
                f"[fps_kernels] {loss.count} output message(s) of this cell never reached the "
                "server: the kernel dropped them (its iopub queue to the server was full), so "
                "the output above is incomplete.\n"
            )
            logger.warning(
                "Kernel %s: %d iopub message(s) lost between the kernel and the server (cell %s)",
                self.kernel_id,
                loss.count,
                loss.parent.get("msg_id", "?"),
            )
            self.broadcast(
                server_message(
                    "iopub", "stream", {"name": "stderr", "text": text}, self._session, loss.parent
                )
            )

    def _track(self, message: KernelMessage) -> None:
        msg_type = message.msg_type
        if msg_type == "status":
            state = message.content().get("execution_state")
            self.activity.observe(msg_type, message.parent_msg_type, state)
            if message.parent_msg_type == "execute_request":
                # Remembered so that a notice about the kernel's death lands in that cell.
                self._running_cell = message.parent_header if state == "busy" else {}
                # A cell ran to its end (whoever asked): the kernel is past its start.
                self._did_work = self._did_work or state == "idle"
        elif self.activity.execution_state == "busy":
            # Cheap path for floods of output while busy: no need to read the parent.
            self.activity.observe(msg_type, None)
        else:
            self.activity.observe(msg_type, message.parent_msg_type)

    def _request(
        self,
        channel: str,
        msg_type: str,
        content: dict[str, Any],
        reply: asyncio.Future[KernelMessage] | None = None,
    ) -> str:
        """Send a request of our own; its reply resolves `reply` instead of reaching clients."""
        msg_id, parts = make_message_parts(msg_type, content, self._session)
        if reply is not None:
            self._own_requests[msg_id] = reply
        sock = self._sockets.get(channel)
        if sock is None:
            return msg_id
        sent = asyncio.ensure_future(sock.send_multipart(join_frames(parts, [], self._signer)))
        sent.add_done_callback(_log_send_failure)
        return msg_id

    def send_to_kernel(
        self, channel: str, parts: list[bytes], buffers: Sequence[bytes | memoryview]
    ) -> Any:
        """Sign and send a message's parts; returns the awaitable of the ZMQ send."""
        return self._sockets[channel].send_multipart(
            join_frames(parts, buffers, self._signer), copy=False
        )

    # --- WebSocket side --------------------------------------------------------------------

    def broadcast(self, message: KernelMessage) -> None:
        for client in list(self._clients.values()):
            client.send(message)

    def broadcast_status(self, state: ExecutionState) -> None:
        self.broadcast(server_message("iopub", "status", {"execution_state": state}, self._session))

    def broadcast_stderr(self, text: str) -> None:
        self.broadcast(
            server_message("iopub", "stream", {"name": "stderr", "text": text}, self._session)
        )

    async def serve(
        self,
        websocket: WebSocket,
        session_id: str,
        permissions: dict[str, list[str]] | None = None,
    ) -> None:
        """Accept `websocket` and bridge it to the kernel until either side goes away."""
        offered = websocket.scope.get("subprotocols") or []
        protocol: Protocol = "v1" if V1_SUBPROTOCOL in offered else "legacy"
        client = self._clients.get(session_id)
        if client is None:
            client = ClientConnection(
                session_id, self.settings.max_client_queue_bytes, self._session
            )
            self._clients[session_id] = client
        elif client.online:
            logger.info("Kernel %s: replacing stale connection %s", self.kernel_id, session_id)
            await client.replace(1000, "Replaced by a newer connection with the same session_id")
        elif client.queued_bytes:
            logger.info(
                "Kernel %s: client %s is back, replaying %d bytes it missed",
                self.kernel_id,
                session_id,
                client.queued_bytes,
            )
        await websocket.accept(subprotocol=V1_SUBPROTOCOL if protocol == "v1" else None)
        allow_large_messages(websocket, self.settings.max_message_bytes)
        compress_small_messages_only(websocket, _COMPRESS_UP_TO)
        client.attach(websocket, protocol)
        writer = self._spawn(client.run(websocket))
        logger.info(
            "Kernel %s: client %s connected (%s protocol)", self.kernel_id, session_id, protocol
        )
        try:
            await self._receive_from(websocket, client, protocol)
        finally:
            client.detach(websocket)
            writer.cancel()
            if not client.online and self._clients.get(session_id) is client:
                client.expiry = asyncio.get_running_loop().call_later(
                    self.settings.offline_buffer_seconds, self._forget, client
                )
            logger.info("Kernel %s: client %s disconnected", self.kernel_id, session_id)

    def _forget(self, client: ClientConnection) -> None:
        """Drop the mailbox of a client that did not come back in time."""
        if self._clients.get(client.session_id) is client and not client.online:
            del self._clients[client.session_id]
            if client.queued_bytes:
                logger.info(
                    "Kernel %s: discarded %d bytes buffered for client %s, which did not return",
                    self.kernel_id,
                    client.queued_bytes,
                    client.session_id,
                )

    async def _receive_from(
        self, websocket: WebSocket, client: ClientConnection, protocol: Protocol
    ) -> None:
        while client.websocket is websocket:
            try:
                event = await websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if event["type"] == "websocket.disconnect":
                if event.get("code") == 1009:
                    logger.warning(
                        "Kernel %s: client %s sent a message over %d bytes (max_message_bytes)",
                        self.kernel_id,
                        client.session_id,
                        self.settings.max_message_bytes,
                    )
                return
            try:
                message = self._decode(protocol, event)
            except FrameError as error:
                logger.warning(
                    "Kernel %s: ignored a malformed frame from client %s: %s",
                    self.kernel_id,
                    client.session_id,
                    error,
                )
                continue
            except Exception:
                # A kind of bad frame framing does not know yet: still one client's frame,
                # not a reason to end its connection.
                logger.exception(
                    "Kernel %s: ignored a frame from client %s that could not be decoded",
                    self.kernel_id,
                    client.session_id,
                )
                continue
            await self._forward(client, message)

    @staticmethod
    def _decode(protocol: Protocol, event: Mapping[str, Any]) -> ClientMessage:
        data = event.get("bytes")
        text = event.get("text")
        if protocol == "v1":
            if data is None:
                raise FrameError("text frame on a v1 connection (v1 frames are binary)")
            return decode_v1(data)
        if data is not None:
            return decode_legacy_binary(data)
        if text is None:
            raise FrameError("empty frame")
        return decode_legacy_text(text)

    async def _forward(self, client: ClientConnection, message: ClientMessage) -> None:
        channel = message.channel
        msg_type = message.header.get("msg_type", "")
        if channel not in CLIENT_CHANNELS:
            logger.warning(
                "Kernel %s: client %s may not send on channel %r (%s dropped)",
                self.kernel_id,
                client.session_id,
                channel,
                msg_type,
            )
            return
        if msg_type in self.blocked_messages or (
            self.allowed_messages is not None and msg_type not in self.allowed_messages
        ):
            logger.info("Kernel %s: filtered out a %s from a client", self.kernel_id, msg_type)
            return
        if not self._accepting.is_set():
            try:
                await asyncio.wait_for(self._accepting.wait(), self.settings.startup_timeout)
            except asyncio.TimeoutError:
                logger.warning(
                    "Kernel %s: dropped a %s (kernel not ready)", self.kernel_id, msg_type
                )
                return
        if msg_type.endswith("_request") and not self._route(client, message, msg_type):
            return
        try:
            await self.send_to_kernel(channel, message.parts, message.buffers)
        except zmq.ZMQError as error:
            logger.warning("Kernel %s: could not send a %s: %s", self.kernel_id, msg_type, error)

    def _route(self, client: ClientConnection, message: ClientMessage, msg_type: str) -> bool:
        """Remember who asked, so that the reply goes to that connection only. A request
        reusing the msg_id of a pending request of someone else's (every client sees msg_ids
        on iopub) would steal its reply: it is dropped instead."""
        msg_id = message.header.get("msg_id")
        if not isinstance(msg_id, str):
            return True
        owner = self._routes.get(msg_id)
        if (owner is not None and owner != client.session_id) or msg_id in self._own_requests:
            logger.warning(
                "Kernel %s: dropped a %s from client %s: its msg_id %s is taken by a pending "
                "request of another client",
                self.kernel_id,
                msg_type,
                client.session_id,
                msg_id,
            )
            return False
        self._routes[msg_id] = client.session_id
        if len(self._routes) > _ROUTES_KEPT:
            self._routes.popitem(last=False)
        return True

    async def _close_clients(self, code: int, reason: str) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        await asyncio.gather(*(client.close(code, reason) for client in clients))


def _log_send_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("Could not send a request to a kernel: %s", future.exception())
