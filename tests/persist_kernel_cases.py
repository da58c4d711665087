"""Kernels that outlive their server (kernels.persist), on the kernel side: a real ipykernel
launched by KernelServer with persist settings, let go, taken back by a new KernelServer
(KernelServer.adopting + take_back), with and without a keeper. Clients are fake WebSockets
driven through the server's real bridge (the whole server is tested in test_persist.py)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fps_kernels.kernel_driver.kernelspec import KernelSpec, load_kernelspec
from fps_kernels.kernel_driver.ownership import process_start
from fps_kernels.kernel_driver.wire import make_message_parts, unpack
from fps_kernels.kernel_server.close_codes import CloseCode
from fps_kernels.kernel_server.framing import V1_SUBPROTOCOL, encode_v1, split_v1
from fps_kernels.kernel_server.server import KernelServer, ServerSettings
from fps_kernels.persist.liveness import AdoptedProcess
from fps_kernels.persist.logs import kernel_log_path
from fps_kernels.persist.record import KernelRecord, RunningCell

from .support.processes import alive, kill_group, until

pytestmark = pytest.mark.anyio

KERNEL_START = 60  # seconds: a kernel start on a loaded 2-core machine
EVENT = 30  # seconds for anything else to happen

PERSIST = ServerSettings(persist=True, persist_keeper=False, startup_timeout=KERNEL_START)
KEEPER = ServerSettings(persist=True, persist_keeper=True, startup_timeout=KERNEL_START)

# Prints 0..N-1 every 0.2 s, each number also written to a file: the test follows the
# kernel's progress there while no server listens.
PRINTER = """
import time
with open({progress!r}, "w") as progress:
    for i in range({count}):
        print(i, flush=True)
        progress.write(f"{{i}}\\n"); progress.flush()
        time.sleep(0.2)
"""


class FakeSocket:
    """A client's WebSocket as the bridge sees it (v1 protocol): what the server sends is
    decoded into messages; requests go through the server's real receive path."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.scope = {"subprotocols": [V1_SUBPROTOCOL]}
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.messages: list[dict[str, Any]] = []
        self.close_code: int | None = None

    async def accept(self, subprotocol: str | None = None) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        return await self.incoming.get()

    async def send_bytes(self, data: bytes) -> None:
        channel, pieces = split_v1(data)
        header, parent, _metadata, content = (unpack(bytes(piece)) for piece in pieces[:4])
        self.messages.append(
            {"channel": channel, "header": header, "parent_header": parent, "content": content}
        )

    async def send_text(self, data: str) -> None:
        raise AssertionError("a v1 client gets binary frames only")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.close_code = code
        self.incoming.put_nowait({"type": "websocket.disconnect", "code": code})

    def request(self, channel: str, msg_type: str, content: dict[str, Any]) -> str:
        msg_id, parts = make_message_parts(msg_type, content, self.session_id)
        self.incoming.put_nowait({"type": "websocket.receive", "bytes": encode_v1(channel, parts)})
        return msg_id

    def execute(self, code: str) -> str:
        return self.request(
            "shell",
            "execute_request",
            {"code": code, "silent": False, "store_history": True, "allow_stdin": False},
        )

    def replies_to(self, msg_id: str, msg_type: str) -> list[dict[str, Any]]:
        return [
            m
            for m in self.messages
            if m["parent_header"].get("msg_id") == msg_id and m["header"]["msg_type"] == msg_type
        ]

    def stdout(self, msg_id: str) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.replies_to(msg_id, "stream")
            if m["content"].get("name") == "stdout"
        )

    def idle(self, msg_id: str) -> bool:
        return any(
            m["content"].get("execution_state") == "idle" for m in self.replies_to(msg_id, "status")
        )


@dataclass
class Client:
    socket: FakeSocket
    task: asyncio.Task[None]


def connect(server: KernelServer, session_id: str) -> Client:
    socket = FakeSocket(session_id)
    task = asyncio.create_task(server.serve(socket, session_id))  # type: ignore[arg-type]
    return Client(socket, task)


async def run(client: Client, code: str, timeout: float = EVENT) -> tuple[str, str]:
    """Execute `code`: (its stdout, the reply's status)."""
    msg_id = client.socket.execute(code)
    await until(
        lambda: client.socket.replies_to(msg_id, "execute_reply") and client.socket.idle(msg_id),
        f"the end of {code!r}",
        timeout,
    )
    reply = client.socket.replies_to(msg_id, "execute_reply")[0]
    return client.socket.stdout(msg_id), reply["content"]["status"]


@pytest.fixture
def runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "runtime"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(path))
    return path


@pytest.fixture
def spec(tmp_path: Path) -> KernelSpec:
    folder = tmp_path / "kernels" / "python3"
    folder.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (folder / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"})
    )
    return load_kernelspec(folder)


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Kernel (and keeper) pids to kill at the end: a persisted kernel does not die with
    the test."""
    started: list[int] = []
    yield started
    for pid in started:
        kill_group(pid)


@pytest.fixture
async def servers() -> AsyncIterator[list[KernelServer]]:
    """Servers to close at the end (let go, so that nothing of theirs waits on a kernel)."""
    made: list[KernelServer] = []
    yield made
    for server in made:
        try:
            await server.let_go()
        except Exception:
            pass


def record_of(server: KernelServer, running: tuple[Any, ...] = ()) -> KernelRecord:
    """What the registry records of a kernel (F's persistence does it for real)."""
    identity = server.process_identity()
    assert identity is not None
    return KernelRecord(
        kernel_id=server.kernel_id,
        kernel_name=server.kernel_name,
        connection_file=server.connection_file_path,
        cwd=server.kernel_cwd,
        pid=identity[0],
        pid_start=identity[1],
        shell_identity=server.zmq_identity.hex(),
        clients=server.client_ids(),
        running=running,
        keeper_socket=server.keeper_socket,
    )


async def launch(
    spec: KernelSpec, settings: ServerSettings, pids: list[int], servers: list[KernelServer]
) -> KernelServer:
    server = KernelServer.launching(spec, settings=settings)
    servers.append(server)
    await server.start(wait_ready=False)
    identity = server.process_identity()
    assert identity is not None
    pids.append(identity[0])
    # Longer than the server's own startup_timeout: its reason says what never came.
    await asyncio.wait_for(server.wait_accepting(), KERNEL_START + 30)
    assert server.readiness.answered, server.activity.reason
    if settings.persist_keeper:
        await until(lambda: bool(server.keeper_socket), "the keeper")
    return server


async def let_go(
    server: KernelServer, servers: list[KernelServer], running: tuple[Any, ...] = ()
) -> KernelRecord:
    """The server recorded and let go, as at a restart: what the next server takes back."""
    record = record_of(server, running)
    servers.remove(server)
    await server.let_go()
    return record


def printed(progress: Path) -> int:
    """The last number a PRINTER cell wrote to `progress` (-1 before the first)."""
    lines = progress.read_text().split() if progress.exists() else []
    return int(lines[-1]) if lines else -1


async def printing_kernel(
    spec: KernelSpec,
    settings: ServerSettings,
    pids: list[int],
    servers: list[KernelServer],
    progress: Path,
    count: int,
) -> tuple[KernelServer, Client, str]:
    """A kernel launched with `settings`, and its client "c1" running a PRINTER cell of
    `count` lines, once its first lines came: the server, the client, the cell's msg_id."""
    server = await launch(spec, settings, pids, servers)
    client = connect(server, "c1")
    msg_id = client.socket.execute(PRINTER.format(progress=str(progress), count=count))
    await until(lambda: "3\n" in client.socket.stdout(msg_id), "the cell's first lines")
    return server, client, msg_id


def numbers(msg_id: str, *clients: Client) -> list[int]:
    """The numbers a PRINTER cell printed, as `clients` got them, one after the other."""
    return [int(n) for n in "".join(c.socket.stdout(msg_id) for c in clients).split()]


async def restarted(
    server: KernelServer,
    servers: list[KernelServer],
    spec: KernelSpec,
    settings: ServerSettings,
    msg_id: str,
    progress: Path,
    lines: int,
) -> tuple[KernelServer, float]:
    """A restart while the PRINTER cell `msg_id` runs: the server lets go, the kernel prints
    `lines` more lines while no server listens, and a new server with `settings` takes it
    back: the new server, and how long its take_back took."""
    record = await let_go(server, servers, running=(RunningCell(msg_id, "doc", "cell"),))
    mark = printed(progress)
    await until(lambda: printed(progress) >= mark + lines, "lines printed while no server listens")
    return await take_back(record, spec, settings, servers)


async def take_back(
    record: KernelRecord, spec: KernelSpec, settings: ServerSettings, servers: list[KernelServer]
) -> tuple[KernelServer, float]:
    process = AdoptedProcess.adopt(
        record.pid, record.pid_start, record.connection_file, kernel_log_path(record.kernel_id)
    )
    assert process is not None, "the kernel did not outlive its server"
    server = KernelServer.adopting(record, process, spec, settings)
    servers.append(server)
    began = time.monotonic()
    await server.take_back()
    return server, time.monotonic() - began


# --- launching with persist --------------------------------------------------------------


async def test_a_persisted_kernel_has_no_parent_poller_and_logs_to_a_file(
    runtime: Path, spec: KernelSpec, pids: list[int], servers: list[KernelServer]
) -> None:
    server = await launch(spec, PERSIST, pids, servers)
    pid = pids[0]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.startswith(b"JPY_PARENT_PID=")]
    assert os.getsid(pid) == pid  # a session of its own
    log = kernel_log_path(server.kernel_id)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    client = connect(server, "c1")
    # Low-level output goes to the log file, not to a pipe the server must drain.
    out, status = await run(client, "import os; os.system('echo low-level-line')")
    assert status == "ok"
    await until(lambda: "low-level-line" in log.read_text(), "the line in the kernel's log")
    assert "low-level-line" in "\n".join(server.process.recent_output)  # type: ignore[union-attr]
    # The identity is the kernel's for its life: a restart keeps it.
    identity = server.zmq_identity
    await server.restart()
    assert server.zmq_identity == identity
    new = server.process_identity()
    assert new is not None and new[0] != pid and alive(new[0])
    pids.append(new[0])
    await server.stop()
    servers.remove(server)
    assert not alive(new[0])
    assert not log.exists()
    assert not Path(server.connection_file_path).exists()


async def test_clients_changed_and_client_ids(
    runtime: Path, spec: KernelSpec, pids: list[int], servers: list[KernelServer]
) -> None:
    server = await launch(spec, PERSIST, pids, servers)
    calls: list[tuple[str, ...]] = []
    server.clients_changed = lambda: calls.append(server.client_ids())
    client = connect(server, "c1")
    await until(lambda: calls, "the hook for a new client")
    assert calls == [("c1",)]
    assert (await run(client, "print(1)"))[0] == "1\n"
    assert server.client_ids() == ("c1",)


async def test_let_go_leaves_the_kernel_and_take_back_serves_it_again(
    runtime: Path, spec: KernelSpec, pids: list[int], servers: list[KernelServer]
) -> None:
    server = await launch(spec, PERSIST, pids, servers)
    client = connect(server, "c1")
    assert (await run(client, "x = 42"))[1] == "ok"
    record = await let_go(server, servers)
    assert client.socket.close_code == CloseCode.GOING_AWAY
    assert alive(record.pid)
    assert Path(record.connection_file).exists()
    assert kernel_log_path(record.kernel_id).exists()
    await asyncio.wait_for(client.task, EVENT)

    again, took = await take_back(record, spec, PERSIST, servers)
    assert took < 5, took
    assert again.readiness.answered
    assert again.kernel_id == record.kernel_id and again.zmq_identity == server.zmq_identity
    back = connect(again, "c1")
    assert (await run(back, "print(x)"))[0] == "42\n"
    await until(lambda: again.execution_state == "idle", "idle once the kernel answered")
    assert again.kernel_info.get("implementation") == "ipython"
    # The taken-back kernel is ours: a stop shuts it down and removes its files.
    await again.stop()
    servers.remove(again)
    await until(lambda: not alive(record.pid), "the kernel's end")
    assert not Path(record.connection_file).exists()
    assert not kernel_log_path(record.kernel_id).exists()


HELPER = """
import asyncio, json, sys
from pathlib import Path
from fps_kernels.kernel_driver.kernelspec import load_kernelspec
from fps_kernels.kernel_server.server import KernelServer, ServerSettings

async def main():
    keeper = sys.argv[2] == "keeper"
    settings = ServerSettings(persist=True, persist_keeper=keeper, startup_timeout=60)
    server = KernelServer.launching(load_kernelspec(Path(sys.argv[1])), settings=settings)
    await server.start()
    await server._channel.request(
        "shell", "execute_request",
        {"code": "x = 42", "silent": False, "store_history": True, "allow_stdin": False}, 60,
    )
    while keeper and not server.keeper_socket:
        await asyncio.sleep(0.05)
    printer = server._channel.post(
        "shell", "execute_request",
        {"code": sys.argv[3], "silent": False, "store_history": True, "allow_stdin": False},
    )
    pid, start = server.process_identity()
    print(json.dumps({
        "keeper_socket": server.keeper_socket, "printer": printer,
        "kernel_id": server.kernel_id, "connection_file": server.connection_file_path,
        "pid": pid, "pid_start": start, "identity": server.zmq_identity.hex(),
    }), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.parametrize("keeper", ["keeper", "no-keeper"])
async def test_the_kernel_outlives_a_killed_server(
    keeper: str,
    runtime: Path,
    spec: KernelSpec,
    pids: list[int],
    servers: list[KernelServer],
    tmp_path: Path,
) -> None:
    progress = tmp_path / "progress"
    count = 40
    code = PRINTER.format(progress=str(progress), count=count)

    helper = subprocess.Popen(
        [sys.executable, "-c", HELPER, str(Path(spec.resource_dir)), keeper, code],
        stdout=subprocess.PIPE,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)},
    )
    try:
        assert helper.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(helper.stdout.readline), KERNEL_START)
        info = json.loads(line)
        pids.append(info["pid"])
        await until(lambda: printed(progress) >= 3, "the cell's first lines")
        helper.kill()
        await asyncio.to_thread(helper.wait, EVENT)
        # What the kernel prints from now on, no server gets live.
        killed_at = printed(progress)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait(EVENT)
    record = KernelRecord(
        kernel_id=info["kernel_id"],
        kernel_name="python3",
        connection_file=info["connection_file"],
        cwd="",
        pid=info["pid"],
        pid_start=info["pid_start"],
        shell_identity=info["identity"],
        keeper_socket=info["keeper_socket"],
        clients=("c2",),
    )
    await until(
        lambda: printed(progress) >= killed_at + 10, "lines printed while no server listens"
    )
    settings = KEEPER if keeper == "keeper" else PERSIST
    server, took = await take_back(record, spec, settings, servers)
    assert took < 5, took
    if keeper == "keeper":
        # The same keeper: it kept the kernel's output since the server's death.
        assert server.keeper_socket == info["keeper_socket"]
    client = connect(server, "c2")
    await until(lambda: client.socket.idle(info["printer"]), "the end of the cell", 60)
    got = set(numbers(info["printer"], client))
    lost = len(set(range(killed_at + 1, count)) - got)
    print(f"\nSIGKILL, {keeper}: {lost} line(s) lost of {count - killed_at - 1} printed after it")
    if keeper == "keeper":
        assert lost == 0
    assert count - 1 in got
    # Over a second: ipykernel's parent poller, had it run, would have ended the kernel.
    out, status = await run(client, "import os, time; time.sleep(2); print(x, os.getppid())")
    assert status == "ok"
    value, parent = out.split()
    assert value == "42" and int(parent) != info["pid"]
    assert process_start(info["pid"]) == info["pid_start"]


# --- a busy kernel across a restart, with and without a keeper ----------------------------


@pytest.mark.parametrize("settings", [PERSIST, KEEPER], ids=["without-keeper", "with-keeper"])
async def test_a_busy_kernel_is_taken_back_at_once_and_its_cell_goes_on(
    settings: ServerSettings,
    runtime: Path,
    spec: KernelSpec,
    pids: list[int],
    servers: list[KernelServer],
    tmp_path: Path,
) -> None:
    progress = tmp_path / "progress"
    count = 50
    server, client, msg_id = await printing_kernel(spec, settings, pids, servers, progress, count)
    # The restart window: the kernel prints on while no server listens.
    again, took = await restarted(server, servers, spec, settings, msg_id, progress, 10)
    assert took < 5, f"take_back of a busy kernel took {took:.2f} s"
    assert again.readiness.answered
    assert again.execution_state == "busy"
    assert printed(progress) < count - 1, "the cell ended before the take-back: nothing tested"
    followed: list[Any] = []
    assert again.follow_cell(msg_id, lambda channel, message: followed.append(message))
    assert not again.follow_cell("not-running", lambda channel, message: None)
    back = connect(again, "c1")
    await until(
        lambda: bool(back.socket.replies_to(msg_id, "execute_reply")) and back.socket.idle(msg_id),
        "the rest of the cell and its reply",
        60,
    )
    got = numbers(msg_id, client, back)
    lost = count - len(set(got))
    duplicated = len(got) - len(set(got))
    print(f"\n{'with' if settings.persist_keeper else 'without'} keeper: take_back {took:.3f} s,")
    print(f"  {lost} line(s) lost, {duplicated} duplicated, of {count}")
    assert got[-1] == count - 1
    assert back.socket.replies_to(msg_id, "execute_reply")[0]["content"]["status"] == "ok"
    if settings.persist_keeper:
        assert lost == 0 and duplicated == 0, (lost, duplicated)
    await until(lambda: again.execution_state == "idle", "idle after the cell")
    # Who resumes the cell gets all of its messages since the take-back, up to its end.
    assert followed[-1].msg_type == "status"
    assert followed[-1].content()["execution_state"] == "idle"
    if settings.persist_keeper:
        followed_lines = "".join(
            m.content()["text"] for m in followed if m.msg_type == "stream"
        ).split()
        assert followed_lines == [str(n) for n in range(int(followed_lines[0]), count)]
    assert (await run(back, "print('after')"))[0] == "after\n"


async def test_the_keeper_ends_with_its_kernel(
    runtime: Path, spec: KernelSpec, pids: list[int], servers: list[KernelServer]
) -> None:
    server = await launch(spec, KEEPER, pids, servers)
    socket = Path(server.keeper_socket)
    assert stat.S_ISSOCK(socket.stat().st_mode)
    assert stat.S_IMODE(socket.stat().st_mode) == 0o600
    # A restart means a new process: a new keeper serves it.
    await server.restart()
    identity = server.process_identity()
    assert identity is not None
    pids.append(identity[0])
    await until(lambda: bool(server.keeper_socket) and socket.exists(), "the new keeper")
    await server.stop()
    servers.remove(server)
    await until(lambda: not socket.exists(), "the keeper's end")
    assert server.keeper_socket == ""


async def test_a_gone_keeper_is_replaced_at_take_back(
    runtime: Path,
    spec: KernelSpec,
    pids: list[int],
    servers: list[KernelServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = await launch(spec, KEEPER, pids, servers)
    client = connect(server, "c1")
    assert (await run(client, "x = 7"))[1] == "ok"
    record = await let_go(server, servers)
    socket = Path(record.keeper_socket)
    # The keeper is gone (its socket too) while no server was there.
    from fps_kernels.persist import keeper_client

    await keeper_client.shutdown(socket)
    await until(lambda: not socket.exists(), "the keeper's end")
    again, took = await take_back(record, spec, KEEPER, servers)
    assert took < 5
    assert "its keeper is gone or unreachable" in caplog.text
    await until(lambda: bool(again.keeper_socket), "a new keeper")
    back = connect(again, "c1")
    assert (await run(back, "print(x)"))[0] == "7\n"


@pytest.mark.parametrize("known_spec", [True, False], ids=["spec", "no-spec"])
async def test_a_taken_back_kernel_that_dies_is_restarted_from_its_spec(
    known_spec: bool,
    runtime: Path,
    spec: KernelSpec,
    pids: list[int],
    servers: list[KernelServer],
) -> None:
    server = await launch(spec, PERSIST, pids, servers)
    record = await let_go(server, servers)
    process = AdoptedProcess.adopt(
        record.pid, record.pid_start, record.connection_file, kernel_log_path(record.kernel_id)
    )
    assert process is not None
    again = KernelServer.adopting(record, process, spec if known_spec else None, PERSIST)
    servers.append(again)
    await again.take_back()
    states: list[str] = []
    again.activity.listeners.append(lambda state, reason: states.append(state))
    kill_group(record.pid)
    if not known_spec:
        await until(lambda: again.execution_state == "dead", "the kernel given up on")
        assert states == ["dead"]  # no restart tried: nothing to launch it from
        return
    await until(lambda: "restarting" in states, "the restart", KERNEL_START)
    await asyncio.wait_for(again.wait_accepting(), KERNEL_START)
    await until(lambda: again.readiness.answered, "the restarted kernel", KERNEL_START)
    identity = again.process_identity()
    assert identity is not None and identity[0] != record.pid
    pids.append(identity[0])
    assert again.connection_file_path == record.connection_file
    client = connect(again, "c1")
    assert (await run(client, "print(1)"))[0] == "1\n"


async def test_output_queued_for_an_offline_client_at_let_go_is_kept_by_the_keeper(
    runtime: Path,
    spec: KernelSpec,
    pids: list[int],
    servers: list[KernelServer],
    tmp_path: Path,
) -> None:
    progress = tmp_path / "progress"
    count = 40
    server, client, msg_id = await printing_kernel(spec, KEEPER, pids, servers, progress, count)
    # The client's socket closes before the server lets go (uvicorn closes them first):
    # what comes meanwhile waits in its mailbox, which dies with the server.
    client.socket.incoming.put_nowait({"type": "websocket.disconnect", "code": 1012})
    await asyncio.wait_for(client.task, EVENT)
    mailbox = server._bridge.clients["c1"]
    await until(lambda: mailbox.first_unsent_iopub() is not None, "output queued offline")
    again, _ = await restarted(server, servers, spec, KEEPER, msg_id, progress, 5)
    back = connect(again, "c1")
    await until(lambda: back.socket.idle(msg_id), "the end of the cell", 60)
    got = numbers(msg_id, client, back)
    assert sorted(set(got)) == list(range(count)), "lines lost"
    assert len(got) == len(set(got)), "lines given twice"


async def test_an_unrecorded_keeper_is_taken_back_too(
    runtime: Path, spec: KernelSpec, pids: list[int], servers: list[KernelServer]
) -> None:
    from fps_kernels.persist import keeper_client

    server = await launch(spec, PERSIST, pids, servers)
    client = connect(server, "c1")
    assert (await run(client, "x = 5"))[1] == "ok"
    # A keeper started by a server killed before it could record it.
    socket = keeper_client.keeper_socket_path(server.kernel_id)
    identity = server.process_identity()
    assert identity is not None
    await keeper_client.start_keeper(
        Path(server.connection_file_path), socket, identity[0], server.zmq_identity
    )
    record = await let_go(server, servers)
    assert record.keeper_socket == ""
    again, _ = await take_back(record, spec, KEEPER, servers)
    assert again.keeper_socket == str(socket)
    back = connect(again, "c1")
    assert (await run(back, "print(x)"))[0] == "5\n"
    await again.stop()
    servers.remove(again)
    await until(lambda: not socket.exists(), "the keeper's end")
