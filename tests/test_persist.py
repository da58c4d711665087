"""kernels.persist: kernels that outlive a jupyverse restart, with real servers and kernels.

Each test runs jupyverse processes one after the other on the same port and runtime dir, and
stops them by pid (SIGTERM, or SIGKILL for a crash). With persist on, kernels and keepers
outlive the server: every test kills what it leaves, by pid, in a finally.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import JupyverseServer, kernel_pid, kernel_processes
from .kernel_client import KernelClient, run_once
from .support.processes import alive, processes_with

pytestmark = pytest.mark.anyio

RECORD = "fps_kernels-state.json"


# --- helpers ---------------------------------------------------------------------------------


def keeper_processes(runtime_dir: Path) -> list[int]:
    """Pids of the keepers whose socket is in `runtime_dir`."""
    return processes_with(b"fps_kernels.persist.keeper", str(runtime_dir).encode())


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


def kill_leftovers(runtime_dir: Path) -> None:
    """Kill, by pid, the kernels and keepers of this test's runtime dir."""
    for pid in kernel_processes(runtime_dir) + keeper_processes(runtime_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def persisting(home: Path, **options: Any) -> JupyverseServer:
    return JupyverseServer(home, kernels={"persist": True, "startup_timeout": 60, **options})


def halt(server: JupyverseServer, how: str) -> None:
    """Stop the server: SIGTERM (and wait), or SIGKILL as a crash."""
    assert server.process is not None
    if how == "kill":
        server.process.kill()
        server.process.wait(30)
    assert server.stop() in (0, -signal.SIGKILL)


def record(server: JupyverseServer) -> dict[str, Any]:
    return json.loads((server.runtime_dir / RECORD).read_text())


def recorded_kernels(server: JupyverseServer, keeper: bool = False) -> set[str]:
    """The kernels in the record (with a keeper's socket if `keeper`)."""
    try:
        kernels = record(server)["kernels"]
    except (OSError, ValueError):
        return set()
    return {k["kernel_id"] for k in kernels if k["keeper_socket"] or not keeper}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def new_session(http: httpx.Client, path: str) -> tuple[str, str]:
    response = http.post("/api/sessions", json={"path": path, "type": "notebook", "name": path})
    assert response.status_code == 201, response.text
    body = response.json()
    return body["id"], body["kernel"]["id"]


async def run(server: JupyverseServer, kernel_id: str, code: str) -> str:
    return await run_once(server.ws_url, kernel_id, code, timeout=60)


async def left_running(srv: JupyverseServer, notebook: str) -> tuple[str, int]:
    """A session's kernel that ran a cell and was recorded, then left running by a SIGTERM
    of the server: its id and pid."""
    with srv.client() as http:
        _session, kernel_id = new_session(http, notebook)
    assert await run(srv, kernel_id, "print(1)") == "1\n"
    wait_for(lambda: recorded_kernels(srv) == {kernel_id}, 30, "the kernel recorded")
    pid = kernel_pid(srv.runtime_dir, kernel_id)
    halt(srv, "term")
    return kernel_id, pid


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    kill_leftovers(tmp_path / "runtime")


# --- the acceptance scenario -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["term", "kill"])
async def test_kernels_outlive_a_stop_and_are_taken_back(home: Path, how: str) -> None:
    srv = persisting(home)
    srv.start()
    try:
        with srv.client() as http:
            kept_session, kept = new_session(http, "kept.ipynb")
            lost_session, lost = new_session(http, "lost.ipynb")
        assert await run(srv, kept, "x = 42\nprint('set')") == "set\n"
        assert await run(srv, lost, "print('here')") == "here\n"
        wait_for(
            lambda: recorded_kernels(srv, keeper=True) == {kept, lost},
            60,
            "both kernels recorded, with their keepers",
        )
        data = record(srv)
        assert {s["id"] for s in data["sessions"]} == {kept_session, lost_session}
        assert "key" not in json.dumps(data)  # secrets stay in the connection files
        for name in (RECORD, "fps_kernels-state.lock", f"kernel-{kept}.log", f"kernel-{kept}.json"):
            assert mode(srv.runtime_dir / name) == 0o600, name
        pids = {kept: kernel_pid(srv.runtime_dir, kept), lost: kernel_pid(srv.runtime_dir, lost)}
        for pid in pids.values():
            # ipykernel's parent poller would end it about a second after the server
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not any(item.startswith(b"JPY_PARENT_PID=") for item in environ)
        halt(srv, how)

        assert all(alive(pid) for pid in pids.values())
        assert (srv.runtime_dir / f"kernel-{kept}.json").exists()
        # one kernel dies while no server runs
        os.kill(pids[lost], signal.SIGKILL)
        wait_for(lambda: not alive(pids[lost]), 30, "the killed kernel gone")

        srv.start()
        with srv.client() as http:
            sessions = {s["id"]: s for s in http.get("/api/sessions").json()}
            kernels = {k["id"] for k in http.get("/api/kernels").json()}
        assert set(sessions) == {kept_session}
        assert sessions[kept_session]["kernel"]["id"] == kept
        assert sessions[kept_session]["path"] == "kept.ipynb"
        assert kernels == {kept}
        assert kernel_pid(srv.runtime_dir, kept) == pids[kept]
        assert await run(srv, kept, "print(x)") == "42\n"
        # the dead kernel is cleaned: files, session, record, with a log line
        assert not (srv.runtime_dir / f"kernel-{lost}.json").exists()
        assert not (srv.runtime_dir / f"kernel-{lost}.log").exists()
        assert f"Kernel {lost} (python3, pid {pids[lost]}) ended while no server" in srv.read_log()
        wait_for(lambda: recorded_kernels(srv) == {kept}, 30, "the record without the dead one")
        assert mode(srv.runtime_dir / RECORD) == 0o600

        # DELETE works on a kernel taken back as on any: process, files and record go
        with srv.client() as http:
            assert http.delete(f"/api/kernels/{kept}").status_code == 204
            assert http.get("/api/sessions").json() == []
        wait_for(lambda: not alive(pids[kept]), 30, "the deleted kernel's process gone")
        connection_file = srv.runtime_dir / f"kernel-{kept}.json"
        wait_for(lambda: not connection_file.exists(), 30, "its connection file removed")
        wait_for(lambda: recorded_kernels(srv) == set(), 30, "an empty record")
        wait_for(lambda: not keeper_processes(srv.runtime_dir), 30, "no keeper left")
    finally:
        srv.stop()
    assert srv.server_tracebacks() == []


async def test_without_the_option_a_stop_leaves_nothing(home: Path) -> None:
    srv = JupyverseServer(home)
    srv.start()
    try:
        with srv.client() as http:
            _session, kernel_id = new_session(http, "plain.ipynb")
        assert await run(srv, kernel_id, "print(1)") == "1\n"
    finally:
        assert srv.stop() == 0
    assert kernel_processes(srv.runtime_dir) == []
    assert list(srv.runtime_dir.glob("kernel-*")) == []
    assert not (srv.runtime_dir / RECORD).exists()


async def test_persist_off_after_a_persist_run_shuts_down_what_the_record_holds(
    home: Path,
) -> None:
    srv = persisting(home)
    srv.start()
    try:
        kernel_id, pid = await left_running(srv, "left.ipynb")
        assert alive(pid)

        srv.config["component"]["components"]["kernels"]["persist"] = False
        srv.start()
        try:
            assert not alive(pid)  # shut down before the server answers
            assert not (srv.runtime_dir / RECORD).exists()
            assert list(srv.runtime_dir.glob(f"kernel-{kernel_id}*")) == []
            with srv.client() as http:
                assert http.get("/api/kernels").json() == []
            assert "left running by a server with kernels.persist on: shut down" in (srv.read_log())
        finally:
            assert srv.stop() == 0
        assert kernel_processes(srv.runtime_dir) == []
        wait_for(lambda: not keeper_processes(srv.runtime_dir), 30, "no keeper left")
    finally:
        srv.stop()


# --- records that cannot be trusted ----------------------------------------------------------


def write_record(runtime_dir: Path, data: Any, file_mode: int = 0o600) -> Path:
    runtime_dir.mkdir(parents=True, exist_ok=True)
    path = runtime_dir / RECORD
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    path.chmod(file_mode)
    return path


async def test_a_corrupt_record_is_set_aside_and_the_server_starts_empty(home: Path) -> None:
    srv = persisting(home, persist_keeper=False)
    write_record(srv.runtime_dir, '{"version": 1, "kernels": [')
    srv.start()
    try:
        with srv.client() as http:
            assert http.get("/api/kernels").json() == []
        aside = list(srv.runtime_dir.glob(f"{RECORD}.bad-*"))
        assert len(aside) == 1 and aside[0].read_text().startswith('{"version": 1')
        assert "is refused" in srv.read_log()
        # a fresh record, written by this server
        wait_for(lambda: (srv.runtime_dir / RECORD).exists(), 30, "a new record")
        assert record(srv)["kernels"] == []
        assert mode(srv.runtime_dir / RECORD) == 0o600
    finally:
        assert srv.stop() == 0
    assert srv.server_tracebacks() == []


async def test_a_record_others_may_read_is_refused(home: Path) -> None:
    srv = persisting(home, persist_keeper=False)
    write_record(
        srv.runtime_dir,
        {"version": 1, "kernels": [], "sessions": [], "written_by": {"pid": 1, "start": ""}},
        0o644,
    )
    srv.start()
    try:
        assert "lets others read or write it" in srv.read_log()
        assert list(srv.runtime_dir.glob(f"{RECORD}.bad-*"))
    finally:
        assert srv.stop() == 0


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


async def test_a_record_naming_a_dead_pid_and_a_reused_pid(home: Path) -> None:
    srv = persisting(home, persist_keeper=False)
    runtime = srv.runtime_dir
    runtime.mkdir(parents=True, exist_ok=True)
    kernels = []
    for kernel_id, pid in (("dead-kernel", dead_pid()), ("reused-pid", os.getpid())):
        connection_file = runtime / f"kernel-{kernel_id}.json"
        connection_file.write_text(json.dumps({"shell_port": 1, "key": "k"}))
        connection_file.chmod(0o600)
        kernels.append(
            {
                "kernel_id": kernel_id,
                "kernel_name": "python3",
                "connection_file": str(connection_file),
                "cwd": str(srv.root),
                "pid": pid,
                # this test's own process: alive, but not started then (a reused pid)
                "pid_start": "another-boot:1",
                "shell_identity": uuid.uuid4().hex,
                "clients": [],
                "running": [],
                "keeper_socket": "",
            }
        )
    sessions = [
        {"id": f"s-{k['kernel_id']}", "path": "a.ipynb", "name": "", "type": "notebook",
         "kernel_id": k["kernel_id"]}
        for k in kernels
    ]  # fmt: skip
    write_record(
        runtime,
        {"version": 1, "kernels": kernels, "sessions": sessions,
         "written_by": {"pid": dead_pid(), "start": ""}},
    )  # fmt: skip
    srv.start()
    try:
        with srv.client() as http:
            assert http.get("/api/kernels").json() == []
            assert http.get("/api/sessions").json() == []
        assert not (runtime / "kernel-dead-kernel.json").exists()
        assert not (runtime / "kernel-reused-pid.json").exists()
        log = srv.read_log()
        assert "Kernel dead-kernel (python3" in log and "Kernel reused-pid (python3" in log
        wait_for(lambda: record(srv)["kernels"] == [], 30, "a record without them")
    finally:
        assert srv.stop() == 0
    assert alive(os.getpid())  # never signalled


async def test_a_second_server_on_the_same_runtime_dir_is_read_only(home: Path) -> None:
    first = persisting(home / "first", persist_keeper=False)
    second = persisting(home / "second", persist_keeper=False)
    second.runtime_dir = first.runtime_dir
    first.start()
    try:
        with first.client() as http:
            _session, kept = new_session(http, "first.ipynb")
        wait_for(lambda: recorded_kernels(first) == {kept}, 30, "the first's kernel recorded")
        second.start()
        try:
            assert first.process is not None
            assert f"Another server (pid {first.process.pid}) holds the kernels" in (
                second.read_log()
            )
            with second.client() as http:
                assert http.get("/api/kernels").json() == []  # took nothing back
                _session, own = new_session(http, "second.ipynb")
            assert await run(second, own, "print(2)") == "2\n"
            own_pid = kernel_pid(second.runtime_dir, own)
            environ = Path(f"/proc/{own_pid}/environ").read_bytes().split(b"\0")
            assert any(item.startswith(b"JPY_PARENT_PID=") for item in environ)
            assert recorded_kernels(first) == {kept}  # its record untouched
        finally:
            assert second.stop() == 0
        # its own kernel did not outlive it; the first's did
        wait_for(lambda: not alive(own_pid), 30, "the second server's kernel gone")
        assert kernel_pid(first.runtime_dir, kept)
        assert recorded_kernels(first) == {kept}
    finally:
        first.stop()
    kill_leftovers(first.runtime_dir)


# --- what a running cell says across the restart ---------------------------------------------


def printer(lines: int, interval: float = 0.2) -> str:
    return (
        f"import time\nfor i in range({lines}):\n"
        f"    print(i, flush=True)\n    time.sleep({interval})"
    )


def texts(outputs: list[Any]) -> str:
    return "".join(str(output.get("text", "")) for output in outputs)


def numbers(msgs: list[Any], msg_id: str) -> list[int]:
    text = "".join(
        m.content["text"]
        for m in msgs
        if m.msg_type == "stream" and m.parent_id == msg_id and m.content["name"] == "stdout"
    )
    return [int(line) for line in text.split() if line.isdigit()]


async def warmed_client(
    srv: JupyverseServer, path: str, keeper: bool = True
) -> tuple[str, KernelClient]:
    """A new session's kernel and a client of it that ran a first cell; with `keeper`, once
    the kernel's keeper runs."""
    with srv.client() as http:
        _session, kernel_id = new_session(http, path)
    client = await KernelClient.connect(srv.ws_url, kernel_id)
    await client.run("print('warm')", timeout=60)
    if keeper:
        wait_for(lambda: keeper_processes(srv.runtime_dir), 60, "a keeper for the kernel")
    return kernel_id, client


async def test_a_client_back_with_its_session_id_gets_every_line_and_the_reply(
    home: Path,
) -> None:
    srv = persisting(home)  # with the keeper
    srv.start()
    try:
        kernel_id, client = await warmed_client(srv, "printer.ipynb")
        session_id = client.session_id
        count = 40
        msg_id = await client.execute(printer(count))
        got = await client.until(lambda m: numbers([m], msg_id) == [9], timeout=60)
        halt(srv, "term")
        await client.close()
        srv.start()
        client = await KernelClient.connect(srv.ws_url, kernel_id, session_id=session_id)
        rest = await client.until(
            lambda m: m.msg_type == "execute_reply" and m.parent_id == msg_id, timeout=60
        )
        await client.close()
        lines = numbers(got + rest, msg_id)
        assert sorted(set(lines)) == list(range(count)), lines  # not one line lost
        assert len(lines) == count  # nor duplicated
    finally:
        srv.stop()


@pytest.mark.parametrize("how", ["term", "kill"])
async def test_a_server_side_cell_goes_on_across_a_restart(home: Path, how: str) -> None:
    from .test_execute import notebook_room, queue, write_notebook, yjs_server
    from .test_execute_durable import saved_cells
    from .ydoc_client import until

    srv = yjs_server(home, persist=True, startup_timeout=60)
    srv.start()
    try:
        with srv.client() as http:
            _session, kernel_id = new_session(http, "across.ipynb")
        cells = {"loop": printer(40), "after": "print('after')"}
        path = write_notebook(srv.root, "across.ipynb", cells)
        async with notebook_room(srv, path, 2) as (doc_id, doc, nb, http):
            await queue(http, kernel_id, doc_id, cells)
            await until(lambda: "5\n" in texts(nb.outputs("loop")), what="the loop running")
            wait_for(
                lambda: any(k["running"] for k in record(srv)["kernels"]), 30, "cells recorded"
            )
            halt(srv, how)
        srv.start()

        def ended() -> bool:
            saved = saved_cells(srv, path)
            return bool(saved) and all(
                "execution_state" not in cell and cell["execution_count"] is not None
                for cell in saved.values()
            )

        # No page open: the server holds the room, the cells end, fps-yjs saves them.
        wait_for(ended, 60, "both cells ended and saved")
        saved = saved_cells(srv, path)
        # every line, those printed while no server ran too (the keeper held them)
        printed = [int(x) for x in texts(saved["loop"]["outputs"]).split() if x.isdigit()]
        if how == "term":
            assert printed == list(range(40)), printed
        else:
            # A crash: what the server wrote into the document since fps-yjs last saved it
            # is lost with it (the keeper holds what came after); the rest is there, in order.
            # (fps-yjs saves only after 0.2 s without a change: a line every 0.2 s may keep
            # it from saving before the kill). What the file and the keeper hold is there, in
            # order, once, up to the last line.
            assert printed == sorted(set(printed)) and printed[-1] == 39, printed
            assert len(printed) > 25 and printed[-25:] == list(range(15, 40)), printed
        assert saved["after"]["outputs"][0]["text"] == "after\n"  # the queued one ran
        assert saved["after"]["execution_count"] == saved["loop"]["execution_count"] + 1
    finally:
        srv.stop()


async def test_a_kernel_taken_back_is_culled_as_any(home: Path) -> None:
    srv = persisting(home, persist_keeper=False)
    srv.start()
    try:
        kernel_id, pid = await left_running(srv, "idle.ipynb")
        srv.config["component"]["components"]["kernels"].update(
            cull_idle_timeout=3, cull_interval=1
        )
        srv.start()

        def culled() -> bool:
            with srv.client() as http:
                return http.get("/api/kernels").json() == []

        wait_for(culled, 60, "the kernel culled")
        wait_for(lambda: not alive(pid), 30, "its process gone")
        # Removed once the process is gone, as the shutdown ends (it is listed no more before).
        connection_file = srv.runtime_dir / f"kernel-{kernel_id}.json"
        wait_for(lambda: not connection_file.exists(), 30, "its connection file removed")
        wait_for(lambda: recorded_kernels(srv) == set(), 30, "an empty record")
        assert f"Culling kernel {kernel_id}" in srv.read_log()
    finally:
        srv.stop()


async def test_server_side_cells_of_a_kernel_that_died_meanwhile_end_with_an_error(
    home: Path,
) -> None:
    from .test_execute import notebook_room, queue, write_notebook, yjs_server
    from .test_execute_durable import saved_cells
    from .ydoc_client import until

    srv = yjs_server(home, persist=True, persist_keeper=False)
    srv.start()
    try:
        with srv.client() as http:
            _session, kernel_id = new_session(http, "died.ipynb")
        path = write_notebook(srv.root, "died.ipynb", {"loop": printer(100)})
        async with notebook_room(srv, path, 1) as (doc_id, doc, nb, http):
            await queue(http, kernel_id, doc_id, ["loop"])
            await until(lambda: "2\n" in texts(nb.outputs("loop")), what="the loop running")
            wait_for(lambda: any(k["running"] for k in record(srv)["kernels"]), 30, "cell recorded")
            pid = kernel_pid(srv.runtime_dir, kernel_id)
            halt(srv, "term")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), 30, "the kernel gone")
        srv.start()

        def ended() -> dict[str, Any] | None:
            cell = saved_cells(srv, path).get("loop")
            if cell is None or "execution_state" in cell:
                return None
            errors = [o for o in cell["outputs"] if o["output_type"] == "error"]
            return errors[0] if errors else None

        error = wait_for(ended, 60, "the cell ended with an error and saved")
        assert error["ename"] == "DeadKernelError"
        assert "did not outlive the restart" in error["evalue"]
    finally:
        srv.stop()


def execution_state(server: JupyverseServer, kernel_id: str) -> str:
    with server.client() as http:
        return str(http.get(f"/api/kernels/{kernel_id}").json()["execution_state"])


@pytest.mark.parametrize(
    "when, keeper", [("after the cell", True), ("during the cell", True), ("after the cell", False)]
)
async def test_a_client_offline_at_the_stop_gets_its_reply_once_after_the_restart(
    home: Path, when: str, keeper: bool
) -> None:
    srv = persisting(home, persist_keeper=keeper)
    srv.start()
    try:
        kernel_id, client = await warmed_client(srv, "offline.ipynb", keeper)
        session_id = client.session_id
        msg_id = await client.execute("import time; time.sleep(3); print('done')")
        await client.until(lambda m: m.msg_type == "execute_input" and m.parent_id == msg_id, 60)
        await client.close()  # gone before the reply: the server queues it for the client
        if when == "after the cell":
            # The cell ends while the client is away: its reply waits in the client's mailbox.
            wait_for(lambda: execution_state(srv, kernel_id) == "idle", 60, "the cell ended")
        halt(srv, "term")
        if not keeper:
            assert "1 reply message(s) queued for offline clients are lost" in srv.read_log()
            return
        srv.start()
        client = await KernelClient.connect(srv.ws_url, kernel_id, session_id=session_id)
        ends = {"execute_reply", "idle"}  # in either order: they come on two channels

        def cell_ended(m: Any) -> bool:
            if m.parent_id == msg_id:
                ends.discard(m.content.get("execution_state") or m.msg_type)
            return not ends

        got = await client.until(cell_ended, timeout=60)
        # A request's reply comes after anything kept for the client: a second copy of the
        # cell's reply or output would come before it.
        probe = await client.request("kernel_info_request", {})
        got += await client.until(
            lambda m: m.msg_type == "kernel_info_reply" and m.parent_id == probe, timeout=60
        )
        await client.close()
    finally:
        srv.stop()
    replies = [m for m in got if m.msg_type == "execute_reply" and m.parent_id == msg_id]
    assert [m.content["status"] for m in replies] == ["ok"]
    stdout = [m for m in got if m.msg_type == "stream" and m.parent_id == msg_id]
    assert texts([m.content for m in stdout]) == "done\n"
