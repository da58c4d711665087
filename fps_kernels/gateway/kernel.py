"""GatewayKernel: a kernel that lives in a kernel gateway, served through this server.

REST calls go to the gateway (interrupt, restart, DELETE) under the gateway's own kernel id.
Each client WebSocket is bridged to a WebSocket of its own on the gateway, opened before the
client's is accepted, with the subprotocol the client offered (v1, or none for the legacy
protocol) so that frames pass unchanged both ways, text as text and binary as binary. Only
iopub status messages are looked into, to show the kernel's state and activity.

When the gateway drops a bridge's WebSocket (it restarted, the network failed), the bridge
tells its client (a stderr line in the running cell) and reconnects with back-off; the
client's socket stays open meanwhile, and what it sends waits. If the kernel is gone from the
gateway, clients get `status: dead` and a normal close; after `retry_max` failed attempts,
a close with 1011.

A client message the gateway cannot take (over `max_message_bytes`, checked here, or refused
by the gateway with close code 1009) is never sent again: the client is told in its cell and
its socket closed with 1009; the kernel and its other clients go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from ..errors import GatewayError, GatewayTimeout, KernelNotFound
from ..kernel_driver.tasks import run_together
from ..kernel_driver.wire import make_header, new_session_id
from ..kernel_server import messages as server_messages
from ..kernel_server.activity import ExecutionState, KernelActivity, isoformat_z
from ..kernel_server.close_codes import CloseCode
from ..kernel_server.framing import V1_SUBPROTOCOL, encode_legacy_text, encode_v1
from ..kernel_server.mailbox import Protocol
from ..kernel_server.transport import allow_large_messages
from .client import GatewayClient, GatewayRefused, json_object
from .config import GatewayConfig
from .peek import Glance, header_of, peek

if TYPE_CHECKING:
    from ..kernel_driver.kernelspec import KernelSpec

logger = logging.getLogger(__name__)

_STATES: tuple[ExecutionState, ...] = ("starting", "idle", "busy", "restarting", "dead")
#: Seconds a restart may take beyond launch_timeout.
LAUNCH_PAD = 2.0
_CLIENT_ERRORS = (WebSocketDisconnect, RuntimeError, OSError)

GONE_NOTICE = (
    "The kernel no longer exists on the kernel gateway (the gateway restarted, or shut it "
    "down or culled it)."
)


def close_reason(text: str) -> str:
    """A WebSocket close reason: at most 123 bytes of UTF-8."""
    data = text.encode()
    if len(data) <= 123:
        return text
    return data[:120].decode(errors="ignore") + "..."


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class GatewayKernel:
    """One kernel of a gateway: satisfies `kernel_server.base.ServedKernel`."""

    def __init__(
        self,
        kernel_id: str,
        kernel_name: str,
        remote_name: str,
        client: GatewayClient,
        config: GatewayConfig,
        *,
        max_message_bytes: int,
        on_gone: Callable[[GatewayKernel, str], None],
        on_closed: Callable[[GatewayKernel], None],
        not_answering: Callable[[], GatewayError | None],
    ) -> None:
        self.kernel_id = kernel_id
        self.kernel_name = kernel_name
        self.remote_name = remote_name
        self.kernelspec: KernelSpec | None = None
        self.activity = KernelActivity()
        self.client = client
        self.config = config
        self.max_message_bytes = max_message_bytes
        self.session = new_session_id()
        #: The parent header of the cell running now (a notice about the gateway lands there).
        self.running_cell: dict[str, Any] = {}
        self._on_gone = on_gone
        self._on_closed = on_closed
        #: Why the gateway is seen not to answer now (a look at it that hangs), or None.
        self._not_answering = not_answering
        self._bridges: set[_Bridge] = set()
        self._closed = False
        self._problem = ""  # the reason we set while the gateway cannot be reached

    # --- what REST shows -------------------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._bridges)

    @property
    def owns_process(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def execution_state(self) -> ExecutionState:
        return self.activity.execution_state

    @property
    def last_activity(self) -> dict[str, str]:
        return {
            "date": isoformat_z(self.activity.last_activity),
            "execution_state": self.activity.execution_state,
        }

    def update(self, model: dict[str, Any]) -> None:
        """Take the state and activity of the gateway's kernel model. While clients are
        connected, the state seen on their iopub is fresher than the gateway's: it stays."""
        state = model.get("execution_state")
        if state in _STATES and not self._bridges:
            self.activity.execution_state = state
        moment = parse_time(model.get("last_activity"))
        if moment is not None and moment > self.activity.last_activity:
            self.activity.last_activity = moment
        self.gateway_reachable()

    def gateway_unreachable(self, problem: str) -> None:
        if not self.activity.reason or self.activity.reason == self._problem:
            self._problem = problem
            self.activity.reason = problem

    def gateway_reachable(self) -> None:
        if self._problem and self.activity.reason == self._problem:
            self.activity.reason = ""
        self._problem = ""

    def observe(self, glance: Glance | None) -> None:
        """Account for one frame the gateway sent a client."""
        if glance is None or glance.channel != "iopub":
            return
        if glance.msg_type == "status":
            self.activity.observe("status", glance.parent_msg_type, glance.state)
            if glance.parent_msg_type == "execute_request":
                self.running_cell = glance.parent_header if glance.state == "busy" else {}
        else:
            self.activity.observe(glance.msg_type, glance.parent_msg_type)

    # --- REST calls to the gateway ---------------------------------------------------------

    async def _call(self, method: str, action: str = "", timeout: float | None = None) -> Any:
        path = f"/api/kernels/{self.kernel_id}{'/' + action if action else ''}"
        try:
            return await self.client.request(method, path, timeout=timeout)
        except GatewayRefused as error:
            if error.status == 404:
                self.gone(GONE_NOTICE)
                raise KernelNotFound(self.kernel_id) from error
            raise

    async def interrupt(self) -> None:
        await self._call("POST", "interrupt")

    async def restart(self) -> None:
        """Restart it on the gateway; return once it answers kernel_info again."""
        loop = asyncio.get_running_loop()
        timeout = self.config.launch_timeout + LAUNCH_PAD
        deadline = loop.time() + timeout
        self.activity.set_state("restarting", self.activity.reason)
        try:
            response = await self._call("POST", "restart", timeout=timeout)
            self.update(json_object(response))
            await asyncio.wait_for(self.wait_ready(), max(deadline - loop.time(), 0.1))
        except asyncio.TimeoutError as error:
            self.activity.execution_state = "idle"  # unknown: the gateway did not say
            raise GatewayTimeout(
                f"Kernel {self.kernel_id} did not answer within {timeout:g} s of its restart "
                "on the kernel gateway (kernels.gateway.launch_timeout)"
            ) from error
        except GatewayError:
            self.activity.execution_state = "idle"
            raise

    async def wait_ready(self) -> None:
        """Return once the kernel answers kernel_info, through a WebSocket of our own (the
        gateway, like jupyter_server, reports `starting` until a client talked to it)."""
        session_id = f"fps-kernels-ready-{self.session}"
        upstream = await self.client.open_channels(self.kernel_id, session_id, V1_SUBPROTOCOL)
        try:
            v1 = upstream.subprotocol == V1_SUBPROTOCOL
            header = make_header("kernel_info_request", session_id)
            parts = [json.dumps(p).encode() for p in (header, {}, {}, {})]
            msg_id, msg_type = header["msg_id"], header["msg_type"]
            await upstream.send(
                encode_v1("shell", parts)
                if v1
                else encode_legacy_text("shell", parts, msg_id, msg_type)
            )
            while True:
                frame = await upstream.recv()
                glance = peek(frame, v1)
                self.observe(glance)
                if glance is not None and glance.channel == "shell":
                    break
        except ConnectionClosed as closed:
            raise GatewayError(
                f"The kernel gateway closed the kernel's WebSocket: {_describe_close(closed)}"
            ) from closed
        finally:
            await upstream.close()
        if self.activity.execution_state in ("starting", "restarting"):
            self.activity.execution_state = "idle"

    async def terminate(self) -> None:
        """DELETE the kernel on the gateway (gone already counts as done); at once a
        GatewayTimeout while the gateway is seen not to answer (a DELETE would wait out
        request_timeout, and hold the server's stop)."""
        hung = self._not_answering()
        if hung is not None:
            raise hung
        try:
            await self.client.request("DELETE", f"/api/kernels/{self.kernel_id}")
        except GatewayRefused as error:
            if error.status != 404:
                raise

    def gone(self, notice: str) -> None:
        """The gateway no longer has this kernel: have it forgotten."""
        if not self._closed:
            logger.info("Gateway kernel %s is gone", self.kernel_id)
            self._on_gone(self, notice)

    # --- lifetime --------------------------------------------------------------------------

    async def stop(self, notice: str | None = None) -> None:
        """Stop serving the kernel (it keeps running on the gateway unless DELETEd first):
        clients get `notice`, `status: dead` and a normal close."""
        if self._closed:
            return
        self._closed = True
        self.activity.set_state("dead", notice or self.activity.reason)
        reason = close_reason(notice or "Kernel shut down")
        await run_together(
            [
                (
                    f"Gateway kernel {self.kernel_id}: closing client {bridge.session_id}",
                    bridge.shutdown(notice, CloseCode.NORMAL, reason),
                )
                for bridge in list(self._bridges)
            ]
        )
        self._on_closed(self)

    # --- the kernel WebSocket --------------------------------------------------------------

    async def serve(
        self,
        websocket: WebSocket,
        session_id: str,
        permissions: dict[str, list[str]] | None = None,
    ) -> None:
        """Bridge `websocket` to a WebSocket of its own on the gateway."""
        if self._closed:
            await websocket.accept()
            await websocket.close(
                CloseCode.KERNEL_NOT_FOUND, KernelNotFound(self.kernel_id).message
            )
            return
        offered = websocket.scope.get("subprotocols") or []
        wanted = V1_SUBPROTOCOL if V1_SUBPROTOCOL in offered else None
        try:
            upstream = await self.client.open_channels(self.kernel_id, session_id, wanted)
        except GatewayError as error:
            await self._refuse(websocket, error)
            return
        # The gateway chose; a gateway without v1 gives the legacy protocol to both legs.
        subprotocol = upstream.subprotocol
        try:
            await websocket.accept(subprotocol=subprotocol)
        except _CLIENT_ERRORS as error:
            logger.debug("Client %s left before its WebSocket was accepted: %r", session_id, error)
            await upstream.close()
            return
        except BaseException:
            await upstream.close()
            raise
        allow_large_messages(websocket, self.max_message_bytes)
        bridge = _Bridge(self, websocket, session_id, upstream, subprotocol)
        self._bridges.add(bridge)
        logger.info(
            "Gateway kernel %s: client %s connected (%s protocol)",
            self.kernel_id,
            session_id,
            bridge.protocol,
        )
        try:
            await bridge.run()
        finally:
            self._bridges.discard(bridge)
            await bridge.close_upstream()
            logger.info("Gateway kernel %s: client %s disconnected", self.kernel_id, session_id)

    async def _refuse(self, websocket: WebSocket, error: GatewayError) -> None:
        """Tell a client why its WebSocket cannot be bridged (JupyterLab reads the reason)."""
        gone = isinstance(error, GatewayRefused) and error.status == 404
        if gone:
            self.gone(GONE_NOTICE)
        else:
            logger.warning("Gateway kernel %s: no WebSocket: %s", self.kernel_id, error.message)
        try:
            await websocket.accept()
            if gone:
                await websocket.close(CloseCode.KERNEL_NOT_FOUND, close_reason(GONE_NOTICE))
            else:
                await websocket.close(CloseCode.INTERNAL_ERROR, close_reason(error.message))
        except _CLIENT_ERRORS as problem:
            logger.debug("Client left before being told: %r", problem)


class _Bridge:
    """One client WebSocket and its WebSocket on the gateway."""

    def __init__(
        self,
        kernel: GatewayKernel,
        websocket: WebSocket,
        session_id: str,
        upstream: ClientConnection,
        subprotocol: str | None,
    ) -> None:
        self.kernel = kernel
        self.websocket = websocket
        self.session_id = session_id
        self.subprotocol = subprotocol
        self.protocol: Protocol = "v1" if subprotocol == V1_SUBPROTOCOL else "legacy"
        self._upstream = upstream
        self._ready = asyncio.Event()  # clear while reconnecting
        self._ready.set()
        self._send_lock = asyncio.Lock()
        self._closing = False
        #: The last frame sent to the gateway: the one it refuses when it closes with 1009
        #: (read for the notice's cell only then).
        self._last_sent: bytes | str | None = None

    async def run(self) -> None:
        to_gateway = asyncio.create_task(self._client_to_gateway())
        to_client = asyncio.create_task(self._gateway_to_client())
        tasks = (to_gateway, to_client)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, Exception):
                    logger.error("Gateway bridge failed", exc_info=result)

    async def close_upstream(self) -> None:
        await self._upstream.close()

    # --- client → gateway ------------------------------------------------------------------

    async def _client_to_gateway(self) -> None:
        while True:
            try:
                event = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if event["type"] == "websocket.disconnect":
                if event.get("code") == CloseCode.MESSAGE_TOO_BIG:
                    logger.warning(
                        "Gateway kernel %s: client %s sent a message over %d bytes "
                        "(max_message_bytes)",
                        self.kernel.kernel_id,
                        self.session_id,
                        self.kernel.max_message_bytes,
                    )
                return
            frame: bytes | str | None = event.get("bytes")
            if frame is None:
                frame = event.get("text")
            if frame is not None and not await self._to_gateway(frame):
                return

    async def _to_gateway(self, frame: bytes | str) -> bool:
        """Send a client's frame to the gateway, once it is connected; False when the bridge
        is over."""
        limit = self.kernel.config.max_message_bytes
        if limit and _size(frame, limit) > limit:
            await self._too_large(
                frame,
                f"{_size(frame, limit)} bytes, over the gateway's limit of {limit} "
                "(kernels.gateway.max_message_bytes)",
            )
            return False
        while True:
            await self._ready.wait()  # while reconnecting, what the client sends waits
            if self._closing:
                return False
            upstream = self._upstream
            self._last_sent = frame
            try:
                await upstream.send(frame)
                return True
            except ConnectionClosed as closed:
                if _too_big(closed):
                    await self._too_large(frame, "the gateway closed with 1009")
                    return False
                if self._upstream is upstream:
                    self._ready.clear()  # the reader reconnects and sets it again
                    await asyncio.sleep(0.05)

    async def _too_large(self, frame: bytes | str | None, why: str) -> None:
        """The gateway cannot take `frame`: tell the client (in the cell that sent it) and
        close its socket with 1009, never sending the frame again."""
        if self._closing:
            return
        kernel = self.kernel
        logger.warning(
            "Gateway kernel %s: a message of client %s is too large for the kernel gateway "
            "(%s): closing its WebSocket with 1009",
            kernel.kernel_id,
            self.session_id,
            why,
        )
        parent = header_of(frame, self.protocol == "v1") if frame is not None else {}
        notice = (
            f"The message was too large for the kernel gateway ({why}): it was not sent. "
            "The kernel keeps running; the connection is reopened."
        )
        await self.shutdown(
            notice,
            CloseCode.MESSAGE_TOO_BIG,
            "Message too large for the kernel gateway",
            None,
            parent,
        )

    # --- gateway → client ------------------------------------------------------------------

    async def _gateway_to_client(self) -> None:
        while True:
            upstream = self._upstream
            try:
                while True:
                    frame = await upstream.recv()
                    self.kernel.observe(peek(frame, self.protocol == "v1"))
                    if not await self._send(frame):
                        return
            except ConnectionClosed as closed:
                if _too_big(closed):
                    await self._too_large(self._last_sent, "the gateway closed with 1009")
                    return
                cause = _describe_close(closed)
            if self._closing or self.kernel.closed:
                return
            if not await self._reconnect(cause):
                return

    async def _send(self, frame: bytes | str) -> bool:
        """Send a frame to the client; False when the client is gone."""
        try:
            async with self._send_lock:
                if isinstance(frame, str):
                    await self.websocket.send_text(frame)
                else:
                    await self.websocket.send_bytes(frame)
        except _CLIENT_ERRORS as error:
            logger.debug("Stopped writing to client %s: %r", self.session_id, error)
            return False
        return True

    async def _tell(
        self,
        text: str | None,
        state: ExecutionState | None = None,
        parent: dict[str, Any] | None = None,
    ) -> None:
        """A stderr line (in `parent`'s cell, by default the running one) and/or a status,
        made by this server."""
        session = self.kernel.session
        told = []
        if text:
            told.append(server_messages.notice(text, session, parent or self.kernel.running_cell))
        if state is not None:
            told.append(server_messages.status(state, session))
        for message in told:
            frame = message.v1_frame() if self.protocol == "v1" else message.legacy_frame()
            await self._send(frame)

    async def _reconnect(self, cause: str) -> bool:
        """Reopen the gateway's WebSocket after a drop; False when the bridge is over."""
        self._ready.clear()
        kernel = self.kernel
        config = kernel.config
        logger.warning(
            "Gateway kernel %s: lost the gateway's WebSocket for client %s (%s); reconnecting",
            kernel.kernel_id,
            self.session_id,
            cause,
        )
        await self._tell(f"Lost the connection to the kernel gateway ({cause}); reconnecting.")
        problem = cause
        for attempt in range(config.retry_max):
            delay = min(config.retry_interval * 2**attempt, config.retry_interval_max)
            await asyncio.sleep(delay * (1 + 0.1 * random.random()))
            if self._closing or kernel.closed:
                return False
            try:
                upstream = await kernel.client.open_channels(
                    kernel.kernel_id, self.session_id, self.subprotocol
                )
            except GatewayRefused as error:
                if error.status == 404:
                    kernel.gone(GONE_NOTICE)  # forgotten, its sessions closed
                    await self.shutdown(GONE_NOTICE, CloseCode.NORMAL, close_reason(GONE_NOTICE))
                    return False
                problem = error.message
            except GatewayError as error:
                problem = error.message
            else:
                if upstream.subprotocol == self.subprotocol:
                    self._upstream = upstream
                    self._ready.set()
                    logger.info(
                        "Gateway kernel %s: reconnected client %s",
                        kernel.kernel_id,
                        self.session_id,
                    )
                    await self._tell("Reconnected to the kernel gateway.")
                    return True
                await upstream.close()
                problem = f"the gateway chose the subprotocol {upstream.subprotocol!r}"
            logger.info(
                "Gateway kernel %s: reconnection %d/%d failed: %s",
                kernel.kernel_id,
                attempt + 1,
                config.retry_max,
                problem,
            )
        notice = (
            f"Could not reconnect to the kernel gateway after {config.retry_max} attempts: "
            f"{problem}"
        )
        logger.warning("Gateway kernel %s: %s", kernel.kernel_id, notice)
        await self.shutdown(notice, CloseCode.INTERNAL_ERROR, close_reason(notice), state=None)
        return False

    async def shutdown(
        self,
        notice: str | None,
        code: int,
        reason: str,
        state: ExecutionState | None = "dead",
        parent: dict[str, Any] | None = None,
    ) -> None:
        """Tell the client `notice` and `state`, then close both sockets."""
        if self._closing:
            return
        self._closing = True
        self._ready.set()  # a sender waiting for a reconnection sees the bridge is over
        await self._tell(notice, state, parent)
        try:
            await self.websocket.close(code=code, reason=reason)
        except _CLIENT_ERRORS as error:
            logger.debug("Client %s was already gone: %r", self.session_id, error)
        await self.close_upstream()


def _too_big(closed: ConnectionClosed) -> bool:
    """Whether the gateway closed because a message was over its size limit."""
    return closed.rcvd is not None and closed.rcvd.code == CloseCode.MESSAGE_TOO_BIG


def _size(frame: bytes | str, limit: int) -> int:
    """A frame's size in bytes, exact when over `limit` (a text frame is only encoded when
    it may be)."""
    if isinstance(frame, bytes) or 4 * len(frame) <= limit:
        return len(frame)
    return len(frame.encode())


def _describe_close(closed: ConnectionClosed) -> str:
    frame = closed.rcvd
    if frame is None:
        return "the connection was cut"
    return (
        f"closed by the gateway with code {frame.code}{': ' + frame.reason if frame.reason else ''}"
    )
