"""No silent loss: abrupt drops during a flood, output the kernel dropped, the gap detector."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
import zmq
import zmq.asyncio

from fps_kernels.kernel_server.gaps import GapDetector, parse_msg_id
from fps_kernels.kernel_server.mailbox import ClientMailbox
from fps_kernels.kernel_server.messages import KernelMessage, server_message

from .conftest import JupyverseServer
from .kernel_client import KernelClient, Msg, decode_v1

pytestmark = pytest.mark.anyio

SESSION = "3f0c2a1b-9d8e7f6a5b4c3d2e1f0a9b8c"  # jupyter_client's new_id() form
NOTICE = re.compile(r"\[fps_kernels\] (\d+) output message\(s\) of this cell never reached")
MAILBOX_NOTICE = re.compile(r"\[fps_kernels\] (\d+) output message\(s\) were dropped for this")


def _id(number: int, pid: int = 4242) -> str:
    return f"{SESSION}_{pid}_{number}"


# --- the gap detector, on realistic msg_ids ------------------------------------------------


def test_msg_id_forms() -> None:
    assert parse_msg_id(_id(17)) == (f"{SESSION}_4242", 17)
    for other in (uuid.uuid4().hex, "abc_1_2", f"{SESSION}_x_1", None, 12):
        assert parse_msg_id(other) is None


def test_a_run_that_stays_missing_is_lost() -> None:
    gaps = GapDetector(settle=2.0)
    cell = {"msg_id": "cell-1", "msg_type": "execute_request"}
    assert not gaps.observe(_id(10), True, {}, 0.0)  # numbering starts here
    assert not gaps.observe(_id(11), True, cell, 0.1)
    assert gaps.observe(_id(500), True, lambda: cell, 0.2)  # 12..499 missing
    assert gaps.pending()
    assert gaps.due(1.0) == []  # not judged before `settle`
    losses = gaps.due(2.3)
    assert [(loss.count, loss.parent) for loss in losses] == [(488, cell)]
    assert not gaps.pending() and gaps.due(10.0) == []


def test_late_numbers_and_single_gaps_are_never_claimed() -> None:
    gaps = GapDetector(settle=2.0)
    gaps.observe(_id(1), True, {}, 0.0)
    # the execute_reply (shell) comes after the idle status (iopub): a gap, then filled
    gaps.observe(_id(3), True, {}, 0.0)
    gaps.observe(_id(2), False, {}, 0.1)
    # a thread's two messages numbered before, sent after the IOPub thread's
    gaps.observe(_id(6), True, {}, 0.2)
    gaps.observe(_id(4), True, {}, 0.3)
    gaps.observe(_id(5), True, {}, 0.3)
    # one number nobody sees: a reply to another client, a display hook that sent nothing
    gaps.observe(_id(8), True, {}, 0.4)
    # a run split by a late number into single numbers
    gaps.observe(_id(12), True, {}, 0.5)
    gaps.observe(_id(10), False, {}, 0.6)
    assert gaps.due(100.0) == []


def test_numbering_starts_at_the_first_iopub_message_of_each_process() -> None:
    gaps = GapDetector(settle=0.0)
    # replies before our subscription reached the kernel: not a start, not a loss
    assert not gaps.observe(_id(3), False, {}, 0.0)
    gaps.observe(_id(9), True, {}, 0.0)
    gaps.observe(_id(10), True, {}, 0.0)
    gaps.observe(_id(4), False, {}, 0.0)  # older than the start: ignored
    # a restarted kernel (new pid) and a forked child number on their own
    gaps.observe(_id(1, pid=5000), True, {}, 0.0)
    gaps.observe(_id(2, pid=5000), True, {}, 0.0)
    gaps.observe(_id(11), True, {}, 0.0)
    assert gaps.due(1.0) == []


# --- the mailbox: what a dead socket did not take stays for the next one ------------------


class FakeSocket:
    """Records what it sends; can block, then fail, like a stalled then dropped socket."""

    def __init__(self, block: bool = False) -> None:
        self.sent: list[bytes] = []
        self.block = block
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def send_bytes(self, data: bytes) -> None:
        if self.block:
            self.entered.set()
            await self.release.wait()  # uvicorn waits for the transport to drain
            raise OSError("connection lost")
        self.sent.append(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        pass


def _stream(text: str, parent: dict[str, Any]) -> KernelMessage:
    return server_message("iopub", "stream", {"name": "stdout", "text": text}, "k", parent)


def _texts(sock: FakeSocket) -> str:
    return "".join(decode_v1(frame).content["text"] for frame in sock.sent)


async def _serve_until(client: ClientMailbox, sock: FakeSocket, text: str) -> None:
    client.attach(sock, "v1")  # type: ignore[arg-type]
    writer = asyncio.ensure_future(client.run(sock))  # type: ignore[arg-type]
    with anyio.fail_after(10):
        while not _texts(sock).endswith(text):
            await asyncio.sleep(0.01)
    client.detach(sock)  # type: ignore[arg-type]
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)


@pytest.mark.parametrize("how", ["failed", "cancelled", "replaced"])
async def test_a_message_the_socket_did_not_take_stays_queued(how: str) -> None:
    parent = {"msg_id": "cell", "msg_type": "execute_request"}
    client = ClientMailbox("s", 1 << 20, "server")
    dead = FakeSocket(block=True)
    client.attach(dead, "v1")  # type: ignore[arg-type]
    writer = asyncio.ensure_future(client.run(dead))  # type: ignore[arg-type]
    client.send(_stream("0\n", parent))
    with anyio.fail_after(10):
        await dead.entered.wait()  # the writer has "0" in hand, on a stalled socket
    for i in range(1, 100):  # merged meanwhile, but never into the message in hand
        client.send(_stream(f"{i}\n", parent))
    if how == "failed":
        dead.release.set()  # the connection is lost: the write raises
        await asyncio.gather(writer, return_exceptions=True)
    elif how == "cancelled":
        client.detach(dead)  # type: ignore[arg-type]
        writer.cancel()  # what serve() does when the receive side saw the drop
        await asyncio.gather(writer, return_exceptions=True)
    alive = FakeSocket()
    if how == "replaced":
        await client.replace(1000, "replaced")
        await asyncio.gather(writer, return_exceptions=True)
    await _serve_until(client, alive, "99\n")
    assert _texts(alive) == "".join(f"{i}\n" for i in range(100))
    assert client.queued_bytes == 0


# --- real kernels ------------------------------------------------------------------------


def _numbers(msgs: list[Msg], parent: str) -> list[int]:
    text = "".join(
        m.content["text"]
        for m in msgs
        if m.msg_type == "stream" and m.parent_id == parent and m.content["name"] == "stdout"
    )
    return [int(n) for n in re.findall(r"<(\d+)>", text)]


def _is_idle(msg: Msg, parent: str) -> bool:
    return (
        msg.msg_type == "status"
        and msg.parent_id == parent
        and msg.content.get("execution_state") == "idle"
    )


def _told(msgs: list[Msg], parent: str, notice: re.Pattern[str] = NOTICE) -> int:
    return sum(
        int(n)
        for m in msgs
        if m.msg_type == "stream" and m.parent_id == parent and m.content["name"] == "stderr"
        for n in notice.findall(m.content["text"])
    )


def _in_flight_bound() -> int:
    """What a dropped connection can have taken with it, in bytes: the socket buffers of both
    ends (Linux's largest autotuned sizes) and the client library's and uvicorn's buffers."""
    largest = [
        int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        for name in ("tcp_rmem", "tcp_wmem")
    ]
    return sum(largest) + (1 << 20)


DROPS = 6
LINES_PER_CONNECTION = 20


@pytest.mark.parametrize("protocol", ["v1", "legacy"])
async def test_abrupt_drops_during_a_flood(
    server: JupyverseServer, kernel: str, protocol: str, tmp_path: Path
) -> None:
    """Abrupt drops (TCP reset, no close frame) while a cell prints, each followed by a
    reconnect with the same session_id. The cell prints until the test tells it to stop
    (a file), so every drop happens during its output, whatever the machine's speed.
    Every line arrives at most once, in order; nothing is missing within one connection;
    the cell ends. Lines can be missing only where a connection was dropped: what was
    already handed to the operating system then (the protocol has no acknowledgements)."""
    stop = tmp_path / "stop"
    session_id = uuid.uuid4().hex
    client = await KernelClient.connect(server.ws_url, kernel, protocol, session_id=session_id)
    await client.run("pass", 60)  # the kernel has started: its start-up output is behind us
    msg_id = await client.execute(
        "import os, time\n"
        "i, give_up = 0, time.monotonic() + 120\n"
        f"while not os.path.exists({str(stop)!r}) and time.monotonic() < give_up:\n"
        "    print(f'<{i}>', flush=True)\n"
        "    i += 1\n"
        "    time.sleep(0.002)\n"
        "print(f'[{i} lines]', flush=True)\n"
    )
    per_connection: list[list[int]] = []
    received: list[Msg] = []
    with anyio.fail_after(120):
        for drop in range(DROPS + 1):
            got: list[Msg] = []
            # every connection, the first one and each reconnected one, gets lines of its own
            while len(_numbers(got, msg_id)) < LINES_PER_CONNECTION:
                got.append(await client.receive(30))
                assert not _is_idle(got[-1], msg_id), "the cell ended before the test stopped it"
            received += got
            per_connection.append(_numbers(got, msg_id))
            if drop == DROPS:
                break
            client.ws.transport.abort()  # a TCP reset: no close frame, unread data is lost
            client = await KernelClient.connect(
                server.ws_url, kernel, protocol, session_id=session_id
            )
        stop.touch()
        got = await client.until_idle(msg_id, timeout=60)
        received += got
        per_connection[-1] += _numbers(got, msg_id)
    await client.close()
    assert len(per_connection) == DROPS + 1  # the cell printed across every drop
    numbers = [n for chunk in per_connection for n in chunk]
    assert numbers == sorted(set(numbers)), "a line came twice or out of order"
    for chunk in per_connection:  # nothing lost while a connection lived
        assert chunk == list(range(chunk[0], chunk[0] + len(chunk)))
    stdout = "".join(
        m.content["text"] for m in received if m.msg_type == "stream" and m.parent_id == msg_id
    )
    total = int(re.findall(r"\[(\d+) lines\]", stdout)[-1])
    assert numbers[-1] == total - 1  # the last connection got the end of the cell
    assert _told(received, msg_id) == 0 and _told(received, msg_id, MAILBOX_NOTICE) == 0
    lost = []
    for before, after in zip(per_connection, per_connection[1:], strict=False):
        missing = range(before[-1] + 1, after[0])
        assert sum(len(f"<{n}>\n") for n in missing) <= _in_flight_bound()
        lost.append(len(missing))
    print(f"{protocol}: {DROPS} drops during {total} lines; lost at each drop: {lost}")


def _kernel_iopub(server: JupyverseServer, kernel_id: str) -> zmq.asyncio.Socket:
    info = json.loads((Path(server.runtime_dir) / f"kernel-{kernel_id}.json").read_text())
    sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(f"tcp://{info['ip']}:{info['iopub_port']}")
    return sock


async def _probe(sock: zmq.asyncio.Socket, parent: str, until_idle: bool) -> int:
    """The number in the msg_id of the first message of `parent`'s cell the kernel
    published, or of its idle status."""
    while True:
        frames = await sock.recv_multipart()
        start = frames.index(b"<IDS|MSG>")
        header, parent_header = json.loads(frames[start + 2]), json.loads(frames[start + 3])
        if parent_header.get("msg_id") != parent:
            continue
        number = int(header["msg_id"].rsplit("_", 1)[1])
        if not until_idle:
            return number
        if header["msg_type"] == "status":
            if json.loads(frames[start + 5])["execution_state"] == "idle":
                return number


async def test_output_the_kernel_dropped_is_told_in_the_cell(
    server: JupyverseServer, kernel: str
) -> None:
    """The server is frozen (SIGSTOP) while the kernel floods: the kernel's iopub queue to it
    overflows and drops. A probe of our own subscribed to the kernel sees it all; the client
    gets what reached the server, and a stderr line in the cell saying how many messages
    were lost, before the cell's idle status."""
    assert server.process is not None
    probe = _kernel_iopub(server, kernel)
    # No keepalive pings from the client: the server cannot answer them while frozen.
    client = await KernelClient.connect(server.ws_url, kernel, ping_interval=None)
    try:
        with anyio.fail_after(60):  # the probe's subscription reached the kernel
            while True:
                msg_id = await client.execute("pass")
                try:
                    with anyio.fail_after(2):
                        await _probe(probe, msg_id, until_idle=True)
                    break
                except TimeoutError:
                    continue
            await client.until_idle(msg_id)
        lines = 20_000
        # 4 kB a line, 80 MB in all: far more than ZMQ (1000 messages) and TCP buffer
        msg_id = await client.execute(
            f"for i in range({lines}): print(f'<{{i}}>' + 'x' * 4000, flush=True)"
        )
        with anyio.fail_after(60):  # the kernel got the request: freeze the server now
            first = await _probe(probe, msg_id, until_idle=False)
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with anyio.fail_after(240):
                span = await _probe(probe, msg_id, until_idle=True) - first + 1
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        msgs = await client.until_idle(msg_id, timeout=120)
        msgs = client.received
        numbers = _numbers(msgs, msg_id)
        assert numbers == sorted(set(numbers))
        missing = lines - len(numbers)
        # the kernel's drop, and the client's own mailbox if the test reads too slowly
        told = _told(msgs, msg_id) + _told(msgs, msg_id, MAILBOX_NOTICE)
        assert _told(msgs, msg_id) > 0, "the kernel dropped nothing: the test did not test"
        # every lost line was told; and never more than the cell's messages could have been
        # lost: its busy status and execute_input came before the freeze, its execute_reply
        # comes on shell (no drop there), and each line that arrived took a message at least
        assert missing <= told <= span - 3 - len(set(numbers)), (missing, told, span)
        notice = next(m for m in msgs if NOTICE.search(m.content.get("text", "")))
        idle = next(
            m
            for m in msgs
            if m.msg_type == "status"
            and m.parent_id == msg_id
            and m.content["execution_state"] == "idle"
        )
        assert msgs.index(notice) < msgs.index(idle)
    finally:
        probe.close(linger=0)
        await client.close()
    assert "lost between the kernel and the server" in server.read_log()


async def test_no_false_notice_on_a_real_flood(server: JupyverseServer, kernel: str) -> None:
    client = await KernelClient.connect(server.ws_url, kernel)
    try:
        start = time.monotonic()
        msg_id = await client.execute("for i in range(20000): print(f'<{i}>', flush=True)")
        msgs = await client.until_idle(msg_id, timeout=120)
        # the last gap could be judged up to `settle` (2 s) later: wait for that too
        await client.run("import time; time.sleep(2.5)", 60)
        assert _numbers(msgs, msg_id) == list(range(20000))
        assert _told(client.received, msg_id) == 0
        assert time.monotonic() - start < 180
    finally:
        await client.close()
