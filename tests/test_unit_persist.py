"""The pieces of persistence (fps_kernels.persist) on real files and real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fps_kernels.kernel_driver.ownership import process_start
from fps_kernels.kernel_driver.signing import Signer
from fps_kernels.kernel_driver.wire import join_frames, make_message_parts, split_frames
from fps_kernels.kernel_server.keeping import queued_replies
from fps_kernels.kernel_server.mailbox import ClientMailbox
from fps_kernels.kernel_server.messages import KernelMessage
from fps_kernels.kernel_server.takeback import TakeBackInbound
from fps_kernels.persist import lock
from fps_kernels.persist.keeper import Keeper
from fps_kernels.persist.keeper_client import Backlog, KeeperError, attach
from fps_kernels.persist.keeper_protocol import client_of, for_client, msg_id_of
from fps_kernels.persist.liveness import EXIT_STATUS_UNKNOWN, AdoptedProcess, same_process
from fps_kernels.persist.logs import kernel_log_path, open_kernel_log, tail_lines
from fps_kernels.persist.record import (
    MAX_RECORD_BYTES,
    KernelRecord,
    RecordError,
    RecordWriter,
    RunningCell,
    ServerRecord,
    SessionRecord,
    Writer,
    encode_record,
    read_record,
    record_path,
    this_writer,
    write_record,
)
from fps_kernels.persist.takeback import forget_kernel, sort_kernels

EVENT = 30  # seconds to wait for a process to do something


@pytest.fixture
def runtime(tmp_path: Path) -> Path:
    path = tmp_path / "runtime"
    path.mkdir(mode=0o700)
    return path


def kernel_record(runtime: Path, **changes: Any) -> KernelRecord:
    kernel_id = str(uuid.uuid4())
    record = KernelRecord(
        kernel_id=kernel_id,
        kernel_name="python3",
        connection_file=str(runtime / f"kernel-{kernel_id}.json"),
        cwd="/home/someone/notebooks",
        pid=12345,
        pid_start="boot:1234",
        shell_identity=uuid.uuid4().hex.encode().hex(),
        clients=(uuid.uuid4().hex,),
        running=(RunningCell(uuid.uuid4().hex, "json:notebook:abc", "cell-1"),),
        keeper_socket=str(runtime / f"keeper-{kernel_id}.sock"),
    )
    return replace(record, **changes)


def server_record(runtime: Path, kernels: int = 2) -> ServerRecord:
    records = tuple(kernel_record(runtime) for _ in range(kernels))
    sessions = tuple(
        SessionRecord(str(uuid.uuid4()), f"nb{i}.ipynb", f"nb{i}.ipynb", "notebook", k.kernel_id)
        for i, k in enumerate(records)
    )
    return ServerRecord(records, sessions, Writer(os.getpid(), "boot:99"))


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- the record -------------------------------------------------------------------------------


def test_a_record_written_is_read_back_the_same(runtime: Path) -> None:
    path = record_path(runtime)
    record = server_record(runtime)
    write_record(path, record)
    assert mode(path) == 0o600
    assert read_record(path) == (record, [])
    assert [p.name for p in runtime.iterdir()] == [path.name]  # no temp file left


def test_the_record_holds_no_secret(runtime: Path) -> None:
    text = encode_record(server_record(runtime)).decode()
    assert '"key"' not in text and "curve" not in text


def test_a_record_is_replaced_whole_and_private_whatever_the_umask(runtime: Path) -> None:
    path = record_path(runtime)
    write_record(path, server_record(runtime, kernels=3))
    old = os.umask(0)
    try:
        write_record(path, server_record(runtime, kernels=1))
    finally:
        os.umask(old)
    assert mode(path) == 0o600
    assert len(read_record(path)[0].kernels) == 1


def test_a_failed_write_leaves_the_old_record(runtime: Path) -> None:
    path = record_path(runtime)
    good = server_record(runtime)
    write_record(path, good)
    huge = replace(good, sessions=good.sessions * (MAX_RECORD_BYTES // 150))
    with pytest.raises(RecordError, match="over"):
        write_record(path, huge)
    assert read_record(path)[0] == good
    assert [p.name for p in runtime.iterdir()] == [path.name]


def test_a_crash_mid_write_leaves_a_readable_record(runtime: Path) -> None:
    """A writer killed at any point leaves the previous record or the new one, never a torn
    one: a real process writes records in a loop and is SIGKILLed."""
    path = record_path(runtime)
    write_record(path, server_record(runtime))
    script = (
        "import sys, os\n"
        "from pathlib import Path\n"
        "sys.path.insert(0, os.getcwd())\n"
        "from tests.test_unit_persist import server_record\n"
        "from fps_kernels.persist.record import write_record, record_path\n"
        "runtime = Path(sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    write_record(record_path(runtime), server_record(runtime, kernels=50))\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(runtime)],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"ready\n"
        first = path.stat().st_ino
        deadline = time.monotonic() + EVENT
        while path.stat().st_ino == first:  # it has replaced the record at least once
            assert time.monotonic() < deadline, "the writer never wrote"
    finally:
        writer.kill()
        writer.wait(EVENT)
    record, problems = read_record(path)
    assert problems == [] and len(record.kernels) in (2, 50)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "not valid JSON"),
        (b'{"version": 1, "kernels": [], "sessions": [], "written_by"', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (b'{"version": 2, "kernels": [], "sessions": []}', "unknown version 2"),
        (b'{"kernels": [], "sessions": []}', "unknown version None"),
        (b'{"version": 1, "sessions": [], "written_by": {"pid": 1, "start": ""}}', "'kernels'"),
        (
            b'{"version": 1, "kernels": {}, "sessions": [], "written_by": {"pid": 1, "start": ""}}',
            "field 'kernels' is dict, not list",
        ),
        (b'{"version": 1, "kernels": [], "sessions": []}', "written_by"),
    ],
)
def test_a_record_that_cannot_be_read_is_refused_clearly(
    runtime: Path, content: bytes, message: str
) -> None:
    path = record_path(runtime)
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(RecordError, match=message):
        read_record(path)


def test_a_missing_record_is_no_error_but_file_not_found(runtime: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_record(record_path(runtime))


@pytest.mark.parametrize("bits", [0o640, 0o604, 0o620, 0o666])
def test_a_record_others_could_read_or_write_is_refused(runtime: Path, bits: int) -> None:
    path = record_path(runtime)
    write_record(path, server_record(runtime))
    path.chmod(bits)
    with pytest.raises(RecordError, match="lets others read or write it"):
        read_record(path)


def test_a_record_owned_by_another_user_is_refused(runtime: Path) -> None:
    if os.getuid() == 0:
        path = record_path(runtime)
        write_record(path, server_record(runtime))
        os.chown(path, 65534, 65534)
        other = 65534
    else:
        path, other = Path("/etc/passwd"), 0  # root's: another user's to us
    with pytest.raises(RecordError, match=f"owned by uid {other}, not by this user"):
        read_record(path)


def test_a_symlinked_record_is_refused(runtime: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    write_record(elsewhere, server_record(runtime))
    record_path(runtime).symlink_to(elsewhere)
    with pytest.raises(RecordError, match="cannot open"):
        read_record(record_path(runtime))


def test_a_record_too_large_is_refused(runtime: Path) -> None:
    path = record_path(runtime)
    with path.open("wb") as f:
        f.write(b" " * (MAX_RECORD_BYTES + 1))
    path.chmod(0o600)
    with pytest.raises(RecordError, match="over"):
        read_record(path)


def test_a_fifo_is_refused_without_blocking(runtime: Path) -> None:
    path = record_path(runtime)
    os.mkfifo(path, 0o600)
    with pytest.raises(RecordError, match="not a regular file"):
        read_record(path)


def _raw(runtime: Path) -> dict[str, Any]:
    path = record_path(runtime)
    write_record(path, server_record(runtime, kernels=3))
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _write_raw(runtime: Path, data: dict[str, Any]) -> tuple[ServerRecord, list[str]]:
    path = record_path(runtime)
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return read_record(path)


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("kernel_id", "../../etc", "not a plausible id"),
        ("kernel_id", "x" * 200, "not a plausible id"),
        ("kernel_id", 7, "is int, not str"),
        ("pid", "123", "is str, not int"),
        ("pid", True, "is bool, not int"),
        ("pid", 1, "field 'pid' is 1"),
        ("connection_file", "/etc/passwd", "not in the runtime dir"),
        ("connection_file", "kernel-x.json", "not an absolute path"),
        ("keeper_socket", "/tmp/keeper.sock", "not in the runtime dir"),
        ("shell_identity", "zz", "not hex"),
        ("shell_identity", "00ab", "not a usable ZMQ identity"),
        ("shell_identity", "", "is empty"),
        ("clients", ["ok", "a b"], "implausible session id"),
        ("clients", "abc", "is str, not list"),
        ("running", [{"msg_id": "", "document_id": "", "cell_id": ""}], "'msg_id' is empty"),
        ("running", [3], "something else than an object"),
        ("cwd", "a\0b", "not a plausible text"),
        ("pid_start", None, "is NoneType, not str"),
    ],
)
def test_a_bad_kernel_entry_is_refused_alone_with_its_reason(
    runtime: Path, field: str, value: Any, reason: str
) -> None:
    data = _raw(runtime)
    bad = data["kernels"][1]
    bad[field] = value
    record, problems = _write_raw(runtime, data)
    kept = [k.kernel_id for k in record.kernels]
    assert kept == [data["kernels"][0]["kernel_id"], data["kernels"][2]["kernel_id"]]
    assert len(problems) == 2, problems  # the kernel, then its session
    assert reason in problems[0], problems
    assert "is not kept" in problems[1]
    assert len(record.sessions) == 2


def test_a_kernel_entry_missing_a_field_is_refused(runtime: Path) -> None:
    data = _raw(runtime)
    del data["kernels"][0]["shell_identity"]
    record, problems = _write_raw(runtime, data)
    assert len(record.kernels) == 2
    assert "missing field 'shell_identity'" in problems[0]
    assert problems[0].startswith(f"kernel {data['kernels'][0]['kernel_id']}:")


def test_a_connection_file_linked_out_of_the_runtime_dir_is_refused(
    runtime: Path, tmp_path: Path
) -> None:
    data = _raw(runtime)
    link = Path(data["kernels"][0]["connection_file"])
    link.symlink_to(tmp_path / "outside.json")
    record, problems = _write_raw(runtime, data)
    assert len(record.kernels) == 2 and "not in the runtime dir" in problems[0]


def test_bad_session_entries_are_refused_one_by_one(runtime: Path) -> None:
    data = _raw(runtime)
    data["sessions"][0]["id"] = "no spaces please"
    data["sessions"][1]["path"] = 42
    data["sessions"].append("not an object")
    record, problems = _write_raw(runtime, data)
    assert [s.id for s in record.sessions] == [data["sessions"][2]["id"]]
    assert len(record.kernels) == 3
    assert len(problems) == 3, problems
    assert "session #0" in problems[0] and "not a plausible id" in problems[0]
    assert "is int, not str" in problems[1]
    assert "session #3: not a JSON object" in problems[2]


def test_a_kernel_listed_twice_is_kept_once(runtime: Path) -> None:
    data = _raw(runtime)
    data["kernels"].append(dict(data["kernels"][0]))
    record, problems = _write_raw(runtime, data)
    assert len(record.kernels) == 3
    assert problems == [
        f"kernel {data['kernels'][0]['kernel_id']}: listed twice, the second is refused"
    ]


# --- the lock ---------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from fps_kernels.persist import lock
held = lock.acquire(Path(sys.argv[1]))
print("held" if held else "refused", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture
def other_holder(runtime: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(runtime)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"held\n"
        yield process
    finally:
        process.kill()
        process.wait(EVENT)


def test_the_lock_is_ours_alone_and_says_who_holds_it(runtime: Path) -> None:
    held = lock.acquire(runtime)
    assert held is not None
    assert mode(lock.lock_path(runtime)) == 0o600
    assert lock.holder(runtime) == os.getpid()
    held.release()
    assert lock.holder(runtime) is None
    assert not held.held
    again = lock.acquire(runtime)
    assert again is not None
    again.release()


def test_the_lock_held_by_another_process_is_refused_with_its_pid(
    runtime: Path, other_holder: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    assert lock.acquire(runtime) is None
    assert f"Another server (pid {other_holder.pid}) holds the kernels" in caplog.text
    assert lock.holder(runtime) == other_holder.pid


def test_the_lock_is_free_once_its_holder_is_killed(
    runtime: Path, other_holder: subprocess.Popen[bytes]
) -> None:
    other_holder.kill()
    other_holder.wait(EVENT)
    held = lock.acquire(runtime)
    assert held is not None
    held.release()


def test_a_kernel_started_by_the_holder_does_not_inherit_the_lock(runtime: Path) -> None:
    held = lock.acquire(runtime)
    assert held is not None
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=False,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"  # its exec is over: it runs Python
        held.release()
        again = lock.acquire(runtime)
        assert again is not None, "the child kept the lock"
        again.release()
    finally:
        child.kill()
        child.wait(EVENT)


# --- liveness ---------------------------------------------------------------------------------


@pytest.fixture
def fake_kernel(runtime: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A process standing for a kernel: its connection file on its command line, in a session
    of its own, as a kernel is started."""
    connection_file = str(runtime / "kernel-fake.json")
    code = "import sys; print('ready', flush=True); sys.stdin.read()"
    process = subprocess.Popen(
        [sys.executable, "-c", code, "-f", connection_file],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        # Running Python: its exec is over (its command line is only set late in an exec).
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        yield process, connection_file
    finally:
        process.kill()
        process.wait(EVENT)


def test_same_process_knows_a_live_kernel(fake_kernel: tuple[subprocess.Popen[bytes], str]) -> None:
    process, connection_file = fake_kernel
    start = process_start(process.pid)
    assert start
    assert same_process(process.pid, start, connection_file)
    assert not same_process(process.pid, start, connection_file.replace("fake", "other"))


def test_same_process_refuses_a_dead_pid(fake_kernel: tuple[subprocess.Popen[bytes], str]) -> None:
    process, connection_file = fake_kernel
    start = process_start(process.pid)
    assert start
    process.kill()
    deadline = time.monotonic() + EVENT
    while process_state(process.pid) != "Z":
        assert time.monotonic() < deadline, "the process did not die"
        time.sleep(0.05)
    assert not same_process(process.pid, start, connection_file)  # a zombie: no command line
    process.wait(EVENT)
    assert not same_process(process.pid, start, connection_file)


def test_same_process_refuses_a_reused_pid(
    fake_kernel: tuple[subprocess.Popen[bytes], str],
) -> None:
    """A live process with the recorded pid and file, but another start time: the pid was
    given to another process since."""
    process, connection_file = fake_kernel
    start = process_start(process.pid)
    assert start
    boot, ticks = start.rsplit(":", 1)
    assert not same_process(process.pid, f"{boot}:{int(ticks) - 100}", connection_file)
    assert not same_process(process.pid, f"another-boot:{ticks}", connection_file)
    assert not same_process(process.pid, "", connection_file)
    assert not same_process(1, process_start(1) or "", connection_file)


def test_adopted_process_signals_waits_and_reports_its_end(
    runtime: Path, fake_kernel: tuple[subprocess.Popen[bytes], str]
) -> None:
    process, connection_file = fake_kernel
    log = kernel_log_path("fake", runtime)
    os.close(open_kernel_log(log))
    log.write_text("starting\nTraceback (most recent call last):\nValueError: boom\n")

    async def scenario() -> None:
        adopted = AdoptedProcess.adopt(
            process.pid, process_start(process.pid) or "", connection_file, log
        )
        assert adopted is not None
        assert adopted.pid == process.pid and adopted.is_alive() and adopted.returncode is None
        assert list(adopted.recent_output)[-1] == "ValueError: boom"
        waiter = asyncio.ensure_future(adopted.wait())
        adopted.signal_group(signal.SIGTERM)
        # The test's Popen reaps the child, as init reaps an adopted kernel.
        await asyncio.get_running_loop().run_in_executor(None, process.wait, EVENT)
        assert await asyncio.wait_for(waiter, EVENT) == EXIT_STATUS_UNKNOWN
        assert not adopted.is_alive() and adopted.returncode == EXIT_STATUS_UNKNOWN
        adopted.signal_group(signal.SIGKILL)  # a no-op once it ended

    asyncio.run(scenario())


def test_adopted_process_terminate_escalates_to_sigkill(runtime: Path) -> None:
    connection_file = str(runtime / "kernel-stubborn.json")
    code = (
        "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); sys.stdin.read()"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, connection_file],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"

        async def scenario() -> None:
            adopted = AdoptedProcess.adopt(
                process.pid, process_start(process.pid) or "", connection_file
            )
            assert adopted is not None
            loop = asyncio.get_running_loop()
            reaped = loop.run_in_executor(None, process.wait, EVENT)
            assert await adopted.terminate(term_wait=1, kill_wait=EVENT) == EXIT_STATUS_UNKNOWN
            assert await reaped == -signal.SIGKILL

        asyncio.run(scenario())
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(EVENT)


def test_adopt_refuses_a_process_that_is_not_the_kernel(
    fake_kernel: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, connection_file = fake_kernel
    assert AdoptedProcess.adopt(process.pid, "boot:1", connection_file) is None
    assert AdoptedProcess.adopt(process.pid, process_start(process.pid) or "", "/elsewhere") is None


# --- kernel logs ------------------------------------------------------------------------------


def test_the_kernel_log_is_private_and_its_tail_is_read(runtime: Path) -> None:
    path = kernel_log_path("abc", runtime)
    assert path == runtime / "kernel-abc.log"
    fd = open_kernel_log(path)
    try:
        os.write(fd, b"".join(b"line %d\n" % i for i in range(100)))
    finally:
        os.close(fd)
    assert mode(path) == 0o600
    assert tail_lines(path, 3) == ["line 97", "line 98", "line 99"]
    assert tail_lines(path, 5, max_bytes=20) == ["line 98", "line 99"]  # a cut line is left out
    assert tail_lines(runtime / "missing.log") == []


# --- the record writer and the sorting of kernels at start ------------------------------------


def test_the_record_writer_writes_the_latest_of_a_burst(runtime: Path) -> None:
    path = record_path(runtime)

    async def scenario() -> None:
        writer = RecordWriter(path)
        records = [server_record(runtime, kernels=n) for n in range(1, 6)]
        for record in records:
            writer.update(record)
        await asyncio.wait_for(writer.flush(), EVENT)
        assert read_record(path) == (records[-1], [])

    asyncio.run(scenario())
    assert mode(path) == 0o600


def test_the_record_writer_survives_a_failed_write(
    runtime: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        writer = RecordWriter(runtime / "missing-dir" / "state.json")
        writer.update(server_record(runtime))
        await asyncio.wait_for(writer.flush(), EVENT)
        assert "Could not write the state record" in caplog.text
        (runtime / "missing-dir").mkdir()
        writer.update(server_record(runtime, kernels=1))
        await asyncio.wait_for(writer.flush(), EVENT)
        assert len(read_record(writer.path, runtime)[0].kernels) == 1

    asyncio.run(scenario())


def test_this_writer_is_this_process() -> None:
    writer = this_writer()
    assert writer.pid == os.getpid() and writer.start == process_start(os.getpid())


def test_kernels_are_sorted_into_alive_and_dead_and_the_dead_forgotten(
    runtime: Path,
    fake_kernel: tuple[subprocess.Popen[bytes], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    process, connection_file = fake_kernel
    alive = kernel_record(
        runtime,
        pid=process.pid,
        pid_start=process_start(process.pid) or "",
        connection_file=connection_file,
    )
    dead = kernel_record(runtime, pid=process.pid, pid_start="boot:1")  # a reused pid
    for path in (dead.connection_file, dead.keeper_socket):
        Path(path).write_text("{}")
    kernel_log_path(dead.kernel_id, runtime).write_text("MemoryError\n")
    result = sort_kernels([alive, dead], runtime)
    assert [(k, p.pid) for k, p in result.alive] == [(alive, process.pid)]
    assert result.dead == [dead]
    caplog.set_level("INFO")
    assert forget_kernel(dead, runtime) == ["MemoryError"]
    assert not Path(dead.connection_file).exists() and not Path(dead.keeper_socket).exists()
    assert not kernel_log_path(dead.kernel_id, runtime).exists()
    assert f"Kernel {dead.kernel_id} (python3, pid {process.pid}) ended" in caplog.text
    assert "MemoryError" in caplog.text
    for _, adopted in result.alive:
        adopted.close()


# --- replies queued for offline clients, kept over a restart by the keeper -------------------

KEY = "the kernel's key"


def signed(channel: str, msg_type: str, parent: str = "", session: str = "kernel") -> list[bytes]:
    """Raw frames of a message as a kernel sends them (an iopub one with its topic frame)."""
    _msg_id, parts = make_message_parts(msg_type, {}, session, {"msg_id": parent} if parent else {})
    frames = [bytes(f) for f in join_frames(parts, [], Signer(KEY, "hmac-sha256"))]
    return [b"kernel.x." + msg_type.encode(), *frames] if channel == "iopub" else frames


def test_a_message_for_a_client_carries_its_session_id_and_nothing_else_does() -> None:
    reply = signed("shell", "execute_reply", "req-1")
    tagged = for_client("client-a", reply)
    assert client_of("shell", tagged) == "client-a"
    assert msg_id_of(tagged) == msg_id_of(reply)  # still the same message
    assert client_of("shell", reply) is None  # as the kernel sent it
    assert client_of("iopub", signed("iopub", "stream")) is None  # a topic, not a client
    assert client_of("iopub", for_client("client-a", reply)) is None  # iopub is for all


def keeper_scenario(
    tmp_path: Path, max_bytes: int, scenario: Callable[[Any, Path], Awaitable[None]]
) -> None:
    """Run `scenario(keeper, socket)` with a Keeper served in this process (no kernel: its
    messages are given to it by the test)."""

    async def main() -> None:
        keeper = Keeper({}, b"", max_bytes)  # no identity: it opens no DEALERs
        socket = tmp_path / "k.sock"
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(keeper.serve, path=str(socket))
        finally:
            os.umask(old_umask)
        try:
            await scenario(keeper, socket)
        finally:
            server.close()

    asyncio.run(main())


def test_replies_queued_at_a_detach_are_in_the_next_backlog_once(tmp_path: Path) -> None:
    outputs = [signed("iopub", "stream", "req-1") for _ in range(3)]
    reply = signed("shell", "execute_reply", "req-1")
    prompt = signed("stdin", "input_request", "req-2")

    async def scenario(keeper: Any, socket: Path) -> None:
        link, _ = await attach(socket)
        for frames in outputs:
            keeper.keep("iopub", frames)
        # Every output was delivered: the replies queued for offline clients are kept anyway.
        queued = [("shell", for_client("a", reply)), ("stdin", for_client("b", prompt))]
        await link.detach(str(msg_id_of(outputs[-1])), queued=queued)
        link, backlog = await attach(socket, last_msg_id=str(msg_id_of(outputs[-1])))
        assert [(c, client_of(c, f), msg_id_of(f)) for c, f in backlog.messages] == [
            ("shell", "a", msg_id_of(reply)),
            ("stdin", "b", msg_id_of(prompt)),
        ]
        assert backlog.messages[0][1][1:] == reply  # the frames as signed
        await link.detach(str(msg_id_of(outputs[-1])))
        _link, backlog = await attach(socket, last_msg_id=str(msg_id_of(outputs[-1])))
        assert backlog.messages == []  # given once

    keeper_scenario(tmp_path, 1 << 20, scenario)


def test_replies_queued_at_a_detach_count_in_the_keepers_bound(tmp_path: Path) -> None:
    replies = [signed("shell", "execute_reply", f"req-{n}") for n in range(4)]
    size = sum(map(len, for_client("a", replies[0])))

    async def scenario(keeper: Any, socket: Path) -> None:
        link, _ = await attach(socket)
        await link.detach("", queued=[("shell", for_client("a", r)) for r in replies])
        _link, backlog = await attach(socket)
        kept = [msg_id_of(frames) for _channel, frames in backlog.messages]
        assert kept == [msg_id_of(r) for r in replies[2:]]  # the oldest dropped
        assert backlog.dropped == 2

    keeper_scenario(tmp_path, 2 * size + size // 2, scenario)


def test_a_keeper_refuses_a_queued_message_for_no_client(tmp_path: Path) -> None:
    async def scenario(keeper: Any, socket: Path) -> None:
        link, _ = await attach(socket)
        with pytest.raises(KeeperError):
            await link.detach("", queued=[("shell", signed("shell", "execute_reply"))])
        assert not [e for e in keeper.entries if e.handed]

    keeper_scenario(tmp_path, 1 << 20, scenario)


def test_what_offline_mailboxes_hold_on_dealer_channels_is_signed_again_and_tagged() -> None:
    def message(channel: str, msg_type: str) -> KernelMessage:
        wire = split_frames(signed(channel, msg_type, "req-1"))
        return KernelMessage(channel, wire.parts, wire.buffers)

    async def scenario() -> None:
        away = ClientMailbox("client-a", 1 << 20, "server")
        for channel, msg_type in [
            ("iopub", "stream"),
            ("shell", "execute_reply"),
            ("iopub", "status"),
        ]:
            away.send(message(channel, msg_type))
        reply = away.unsent_replies()
        assert [m.msg_type for m in reply] == ["execute_reply"]
        [(channel, frames)] = queued_replies(
            [away, ClientMailbox("b", 1 << 20, "s")], Signer(KEY, "hmac-sha256")
        )
        assert channel == "shell" and client_of(channel, frames) == "client-a"
        wire = split_frames(frames)
        Signer(KEY, "hmac-sha256").check(wire.signature, wire.parts)  # the kernel's signature
        assert wire.parts == reply[0].parts

    asyncio.run(scenario())


def test_a_take_back_hands_a_kept_reply_to_its_client_and_not_to_the_dispatch() -> None:
    def verify(channel: str, frames: Any) -> KernelMessage:
        wire = split_frames(frames)
        return KernelMessage(channel, wire.parts, wire.buffers)

    async def scenario() -> None:
        dispatched: list[str] = []
        handed: list[tuple[str, str]] = []

        def to_client(session_id: str, message: KernelMessage) -> bool:
            handed.append((session_id, message.msg_type))
            return session_id == "back"

        inbound = TakeBackInbound(lambda c, m: dispatched.append(m.msg_type), [], 60, to_client)
        backlog = Backlog(
            [
                ("iopub", signed("iopub", "stream", "req-1")),
                ("shell", for_client("back", signed("shell", "execute_reply", "req-1"))),
                ("shell", for_client("gone", signed("shell", "execute_reply", "req-2"))),
                ("shell", signed("shell", "execute_reply", "req-3")),  # kept by the keeper
            ]
        )
        assert inbound.play(backlog, verify) == 0
        assert handed == [("back", "execute_reply"), ("gone", "execute_reply")]
        assert dispatched == ["stream", "execute_reply"]

    asyncio.run(scenario())
