"""The keeper (fps_kernels.persist.keeper) with a real ipykernel and the real keeper process:
no server, the test plays the server with ZMQ sockets of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from fps_kernels.kernel_driver.connection import (
    ConnectionInfo,
    PortAllocator,
    new_connection_info,
    write_connection_file,
)
from fps_kernels.kernel_driver.signing import Signer
from fps_kernels.kernel_driver.wire import join_frames, make_message_parts, split_frames, unpack
from fps_kernels.persist import keeper_client
from fps_kernels.persist.keeper_client import (
    Backlog,
    KeeperInfo,
    KeeperLink,
    attach,
    keeper_socket_path,
    start_keeper,
)

from .support.processes import alive, until

pytestmark = pytest.mark.anyio

KERNEL_START = 60  # seconds: a kernel start on a loaded 2-core machine
EVENT = 30  # seconds to wait for anything else


@dataclass
class Kernel:
    info: ConnectionInfo
    connection_file: Path
    process: subprocess.Popen[bytes]
    runtime: Path
    signer: Signer = field(init=False)

    def __post_init__(self) -> None:
        self.signer = Signer(self.info.key, self.info.signature_scheme)


@pytest.fixture
def kernel(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Kernel]:
    """A real ipykernel (CurveZMQ-encrypted when the test asks with a True param)."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    info = new_connection_info(PortAllocator(), encrypted=getattr(request, "param", False))
    connection_file = runtime / f"kernel-{uuid.uuid4()}.json"
    write_connection_file(connection_file, info)
    env = {k: v for k, v in os.environ.items() if k != "JPY_PARENT_PID"}
    with (runtime / "kernel.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ipykernel_launcher", "-f", str(connection_file)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Kernel(info, connection_file, process, runtime)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(EVENT)


class FakeServer:
    """What the server does with a kernel: shell/control/stdin DEALERs with one identity, an
    iopub SUB; it signs what it sends and checks what it gets."""

    def __init__(self, kernel: Kernel, identity: bytes) -> None:
        self.kernel = kernel
        self.identity = identity
        self.context = zmq.asyncio.Context.instance()
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.session = uuid.uuid4().hex

    async def connect(self) -> None:
        monitors = []
        for channel in ("shell", "control", "stdin", "iopub"):
            sock = self.context.socket(zmq.SUB if channel == "iopub" else zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            info = self.kernel.info
            if info.curve_publickey and info.curve_secretkey:
                sock.curve_secretkey = info.curve_secretkey.encode()
                sock.curve_publickey = info.curve_publickey.encode()
                sock.curve_serverkey = info.curve_publickey.encode()
            if channel == "iopub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
                sock.setsockopt(zmq.RCVHWM, 0)
            else:
                sock.setsockopt(zmq.IDENTITY, self.identity)
            # A unique address: pyzmq's default is named after the fd, which a socket closed
            # a moment ago may still hold.
            monitors.append(
                sock.get_monitor_socket(
                    zmq.EVENT_HANDSHAKE_SUCCEEDED, addr=f"inproc://test-monitor-{uuid.uuid4().hex}"
                )
            )
            sock.connect(self.kernel.info.url(channel))
            self.sockets[channel] = sock
        # Connected for real (the identity taken over) before going on.
        for sock, monitor in zip(self.sockets.values(), monitors, strict=True):
            event = parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), EVENT))
            assert event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
            sock.disable_monitor()  # before its reader goes: libzmq would block writing to it
            monitor.close(linger=0)

    async def send(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        msg_id, parts = make_message_parts(msg_type, content, self.session)
        await self.sockets[channel].send_multipart(join_frames(parts, [], self.kernel.signer))
        return msg_id

    def decode(self, frames: list[bytes]) -> dict[str, Any]:
        wire = split_frames(frames)
        self.kernel.signer.check(wire.signature, wire.parts)
        header, parent, _metadata, content = (unpack(part) for part in wire.parts)
        return {"header": header, "parent": parent, "content": content}

    async def recv(self, channel: str, timeout: float = EVENT) -> dict[str, Any]:
        frames = await asyncio.wait_for(self.sockets[channel].recv_multipart(), timeout)
        return self.decode(frames)

    async def ready(self) -> None:
        """kernel_info until it answers on shell and something arrives on iopub."""
        deadline = time.monotonic() + KERNEL_START
        replied = seen = False
        while not (replied and seen):
            assert time.monotonic() < deadline, "the kernel did not answer kernel_info"
            if not replied:
                await self.send("shell", "kernel_info_request", {})
            try:
                while not (replied and seen):
                    polled = dict(await self._poll(1))
                    if not polled:
                        break
                    for sock in polled:
                        channel = next(c for c, s in self.sockets.items() if s is sock)
                        self.decode(await sock.recv_multipart())
                        replied |= channel == "shell"
                        seen |= channel == "iopub"
            except asyncio.TimeoutError:
                pass

    async def _poll(self, timeout: float) -> list[tuple[Any, int]]:
        poller = zmq.asyncio.Poller()
        for channel in ("shell", "iopub"):
            poller.register(self.sockets[channel], zmq.POLLIN)
        return await poller.poll(timeout * 1000)

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()


def stream_lines(messages: list[dict[str, Any]], parent: str) -> list[int]:
    text = "".join(
        m["content"]["text"]
        for m in messages
        if m["header"]["msg_type"] == "stream" and m["parent"].get("msg_id") == parent
    )
    return [int(line) for line in text.split()]


async def until_idle(probe: FakeServer, request: str) -> list[dict[str, Any]]:
    """What the probe sees until the request's idle status (the kernel sends the reply before)."""
    seen: list[dict[str, Any]] = []
    while not any(
        m["header"]["msg_type"] == "status"
        and m["parent"].get("msg_id") == request
        and m["content"]["execution_state"] == "idle"
        for m in seen
    ):
        seen.append(await probe.recv("iopub"))
    return seen


async def connected(kernel: Kernel, identity: bytes | None = None) -> FakeServer:
    """A FakeServer connected to the kernel; without an identity, the test's own observer."""
    server = FakeServer(kernel, identity or uuid.uuid4().hex.encode())
    await server.connect()
    return server


async def take_over(
    kernel: Kernel, keeper: tuple[KeeperInfo, bytes], last_msg_id: str = "", ready: bool = False
) -> tuple[FakeServer, KeeperLink, Backlog]:
    """A server with the keeper's identity, connected to the kernel (answering first when
    `ready`) and attached to the keeper after `last_msg_id`."""
    info, identity = keeper
    server = await connected(kernel, identity)
    if ready:
        await server.ready()
    link, backlog = await attach(info.socket, last_msg_id, identity)
    return server, link, backlog


async def print_numbers(server: FakeServer, count: int) -> str:
    """Runs a cell printing 0..count-1 every 0.1 s; its request's msg_id."""
    code = f"import time\nfor i in range({count}):\n    print(i, flush=True)\n    time.sleep(0.1)"
    return await server.send(
        "shell", "execute_request", {"code": code, "silent": False, "allow_stdin": False}
    )


@pytest.fixture
async def keeper(kernel: Kernel) -> AsyncIterator[tuple[KeeperInfo, bytes]]:
    identity = uuid.uuid4().hex.encode()
    socket = keeper_socket_path(str(uuid.uuid4()), kernel.runtime)
    info = await start_keeper(
        kernel.connection_file,
        socket,
        kernel.process.pid,
        identity,
        log_path=kernel.runtime / "keeper.log",
    )
    try:
        yield info, identity
    finally:
        if alive(info.pid):
            os.kill(info.pid, signal.SIGKILL)


@pytest.mark.parametrize("kernel", [False, True], indirect=True, ids=["plain", "curve"])
async def test_a_cell_printing_while_detached_is_given_back_whole(
    kernel: Kernel, keeper: tuple[KeeperInfo, bytes]
) -> None:
    info, _ = keeper
    assert keeper_client.socket_is_private(info.socket), oct(info.socket.lstat().st_mode)
    server, link, _ = await take_over(kernel, keeper, ready=True)
    # The probe is the test's own observer, not part of the server: it tells when the cell ends.
    probe = await connected(kernel)
    request = await print_numbers(server, 40)
    got: list[dict[str, Any]] = []
    while not stream_lines(got, request)[3:]:  # a few lines in: the cell is running
        got.append(await server.recv("iopub"))
    await link.detach(got[-1]["header"]["msg_id"])
    server.close()  # the server stops
    seen = await until_idle(probe, request)
    assert stream_lines(seen, request)[-1] == 39

    new_server, link, backlog = await take_over(kernel, keeper)
    assert backlog.dropped == 0
    kept = [(channel, new_server.decode(frames)) for channel, frames in backlog.messages]
    iopub = [msg for channel, msg in kept if channel == "iopub"]
    # Every line once, in order, across the restart.
    assert stream_lines(got, request) + stream_lines(iopub, request) == list(range(40))
    assert backlog.msg_ids() == {m["header"]["msg_id"] for m in iopub}
    replies = [msg for channel, msg in kept if channel == "shell"]
    assert [r["header"]["msg_type"] for r in replies] == ["execute_reply"]
    assert replies[0]["parent"]["msg_id"] == request
    assert replies[0]["content"]["status"] == "ok"
    # The new server has the identity now: a request of its own is answered to it.
    asked = await new_server.send("shell", "kernel_info_request", {})
    reply = await new_server.recv("shell")
    assert reply["parent"]["msg_id"] == asked
    link.close()
    new_server.close()
    probe.close()


async def test_a_server_that_dies_leaves_everything_after_it_to_the_keeper(
    kernel: Kernel, keeper: tuple[KeeperInfo, bytes]
) -> None:
    server, link, _ = await take_over(kernel, keeper, ready=True)
    probe = await connected(kernel)
    request = await print_numbers(server, 30)
    got: list[dict[str, Any]] = []
    while not stream_lines(got, request)[2:]:
        got.append(await server.recv("iopub"))
    # As a SIGKILL does: the connections close, nothing is said.
    server.close()
    link.close()
    await until_idle(probe, request)
    new_server, link, backlog = await take_over(kernel, keeper)
    kept = [(channel, new_server.decode(frames)) for channel, frames in backlog.messages]
    after = stream_lines([m for c, m in kept if c == "iopub"], request)
    before = stream_lines(got, request)
    assert after == sorted(after) and after[-1] == 29
    # Nothing lost; what the dead server had may come again.
    assert set(before) | set(after) == set(range(30)), (before, after)
    replies = [m for c, m in kept if c == "shell"]
    assert replies, [(c, m["header"]["msg_type"]) for c, m in kept][-8:]
    reply = replies[0]
    assert reply["header"]["msg_type"] == "execute_reply"
    assert reply["parent"]["msg_id"] == request
    link.close()
    new_server.close()
    probe.close()


async def test_attach_starts_right_after_the_last_message_delivered(
    kernel: Kernel, keeper: tuple[KeeperInfo, bytes]
) -> None:
    server, link, _ = await take_over(kernel, keeper, ready=True)
    request = await server.send(
        "shell", "execute_request", {"code": "for i in range(5): print(i, flush=True)"}
    )
    got: list[dict[str, Any]] = []
    while stream_lines(got, request)[-1:] != [4]:
        got.append(await server.recv("iopub"))
    await server.recv("shell")
    link.close()
    server.close()
    # The new server knows what it delivered up to line 2 (in a real restart: the record).
    upto = next(m for m in got if stream_lines([m], request) and 2 in stream_lines([m], request))
    new_server, link, backlog = await take_over(kernel, keeper, upto["header"]["msg_id"])
    assert backlog.found
    iopub = [new_server.decode(f) for c, f in backlog.messages if c == "iopub"]
    assert stream_lines(iopub, request)[0] == stream_lines([upto], request)[-1] + 1
    assert stream_lines(iopub, request)[-1] == 4
    link.close()
    new_server.close()


async def test_detached_output_over_the_limit_is_dropped_oldest_first_and_counted(
    kernel: Kernel,
) -> None:
    socket = keeper_socket_path("small", kernel.runtime)
    info = await start_keeper(
        kernel.connection_file, socket, kernel.process.pid, b"", max_bytes=20000
    )
    server = FakeServer(kernel, uuid.uuid4().hex.encode())
    try:
        await server.connect()
        await server.ready()
        link, _ = await attach(socket, "")
        link.close()  # detached from now on, without DEALERs (no identity given)
        request = await server.send(
            "shell", "execute_request", {"code": "for i in range(300): print(i, flush=True)"}
        )
        got: list[dict[str, Any]] = []
        while stream_lines(got, request)[-1:] != [299]:
            got.append(await server.recv("iopub"))
        link, backlog = await attach(socket, "")
        assert backlog.dropped > 0
        assert not any(channel != "iopub" for channel, _ in backlog.messages)
        assert sum(len(b"".join(f)) for _, f in backlog.messages) <= 20000
        messages = list(backlog.messages)
        link.close()  # without a DETACH: what came is unread, the next attach gets it
        # The keeper's subscription may lag behind ours (another process, a loaded machine):
        # the last lines may reach it after our first attach.
        deadline = time.monotonic() + EVENT
        while 299 not in stream_lines([server.decode(f) for _, f in messages], request):
            assert time.monotonic() < deadline, "the keeper never got the last line"
            await asyncio.sleep(0.05)
            try:
                link, backlog = await attach(socket, "")
            except keeper_client.KeeperError:
                continue  # it has not seen our last link close yet
            messages += backlog.messages
            link.close()
        lines = stream_lines([server.decode(f) for _, f in messages], request)
        assert lines and lines[-1] == 299 and lines == sorted(lines)
        await keeper_client.shutdown(socket)
        await until(lambda: not alive(info.pid), "the keeper to exit on SHUTDOWN", EVENT)
        assert not socket.exists()
    finally:
        server.close()
        if alive(info.pid):
            os.kill(info.pid, signal.SIGKILL)


async def test_the_keeper_exits_with_its_kernel(
    kernel: Kernel, keeper: tuple[KeeperInfo, bytes]
) -> None:
    info, _ = keeper
    assert alive(info.pid)
    kernel.process.kill()
    kernel.process.wait(EVENT)
    await until(lambda: not alive(info.pid), "the keeper to exit with the kernel", EVENT)
    assert not info.socket.exists()


async def test_the_keeper_exits_when_the_connection_file_goes(
    kernel: Kernel, keeper: tuple[KeeperInfo, bytes]
) -> None:
    info, _ = keeper
    server = await connected(kernel)
    await server.ready()  # ipykernel writes its connection file again while it starts
    server.close()
    kernel.connection_file.unlink()
    await until(lambda: not alive(info.pid), "the keeper to exit without its file", EVENT)


async def test_a_second_server_is_refused_while_one_is_attached(
    kernel: Kernel, keeper: tuple[KeeperInfo, bytes]
) -> None:
    info, identity = keeper
    link, _ = await attach(info.socket, "", identity)
    with pytest.raises(keeper_client.KeeperError, match="another server is attached"):
        await attach(info.socket, "", identity)
    link.close()


async def test_a_keeper_for_a_missing_connection_file_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(keeper_client.KeeperError, match="failed to start"):
        await start_keeper(tmp_path / "nope.json", tmp_path / "k.sock", os.getpid(), b"")


async def test_a_second_keeper_never_takes_a_live_keepers_place(
    kernel: Kernel, keeper: tuple[KeeperInfo, bytes]
) -> None:
    info, identity = keeper
    with pytest.raises(keeper_client.KeeperError, match="failed to start"):
        await start_keeper(
            kernel.connection_file,
            info.socket,
            kernel.process.pid,
            identity,
            log_path=kernel.runtime / "keeper2.log",
        )
    assert "another keeper serves" in (kernel.runtime / "keeper2.log").read_text()
    link, _ = await attach(info.socket, "", identity)  # the first one still serves
    link.close()


async def test_a_keeper_whose_starter_is_gone_serves_on(kernel: Kernel) -> None:
    """The server that starts a keeper may die before it reads the keeper's pid (a SIGKILL
    right after a kernel's start): the keeper goes on, and the next server attaches to it."""
    socket = keeper_socket_path(str(uuid.uuid4()), kernel.runtime)
    log = kernel.runtime / "keeper.log"
    with log.open("ab") as errors:
        starter = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fps_kernels.persist.keeper",
                f"--connection-file={kernel.connection_file}",
                f"--socket={socket}",
                f"--kernel-pid={kernel.process.pid}",
            ],
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,
        )
    assert starter.stdout is not None
    starter.stdout.close()  # nobody reads the pid
    try:
        await asyncio.to_thread(starter.wait, EVENT)
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait(EVENT)
    await until(socket.exists, "the keeper's socket", EVENT)
    link, _ = await attach(socket, "")
    link.close()
    assert "Traceback" not in log.read_text()
    await keeper_client.shutdown(socket)
    await until(lambda: not socket.exists(), "the keeper's end", EVENT)
