"""Sessions and kernels answer at launch: `POST` returns while the kernel still starts.

The kernels here first sleep `SLEEP` seconds, then exec ipykernel (same pid): a POST answered
while that process still sleeps was answered before the kernel could reply to anything.
"""

from __future__ import annotations

import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .conftest import BAD_ARGV, JupyverseServer, serving, write_kernelspec
from .kernel_client import KernelClient
from .support.processes import alive, until

pytestmark = pytest.mark.anyio

SLEEP = 4.0

# Writes its pid and a marker (so the test knows it is there), sleeps, then becomes ipykernel
# (same pid) or fails as argv[2] says.
SLOW = """
import os, sys, time
connection_file, mode, marks = sys.argv[1], sys.argv[2], sys.argv[3]
with open(os.path.join(marks, f"{os.getpid()}.pid"), "w") as f:
    f.write(connection_file)
print("slow kernel: waking up in a while", flush=True)
if mode == "hang":
    time.sleep(600)
# Sleeps its time, or longer while the test holds it (a `<pid>.hold` file in `marks`).
deadline = time.monotonic() + float(os.environ.get("SLOW_KERNEL_SLEEP", "4"))
hold = os.path.join(marks, f"{os.getpid()}.hold")
while time.monotonic() < deadline or (os.path.exists(hold) and time.monotonic() < deadline + 120):
    time.sleep(0.05)
if mode == "exit":
    print("slow kernel: giving up, no module named nowhere", flush=True)
    sys.exit(5)
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", "-f", connection_file])
"""


def _spec(script: Path, marks: Path, mode: str) -> dict[str, Any]:
    return {
        "argv": [sys.executable, str(script), "{connection_file}", mode, str(marks)],
        "display_name": f"Slow ({mode})",
        "language": "python",
        "env": {"SLOW_KERNEL_SLEEP": str(SLEEP)},
    }


def _slow_server(home: Path, modes: tuple[str, ...], **kernels: Any) -> JupyverseServer:
    """A server (not started) with the kernelspecs `slow-<mode>` of the slow kernel."""
    srv = JupyverseServer(home, kernels=kernels)
    script = srv.home / "slow.py"
    script.write_text(SLOW)
    marks = srv.home / "marks"
    marks.mkdir()
    for mode in modes:
        write_kernelspec(srv.share, f"slow-{mode}", _spec(script, marks, mode))
    return srv


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyverseServer]:
    # startup_timeout: enough for the slow kernel on a loaded machine, small for `hang`.
    srv = _slow_server(
        tmp_path_factory.mktemp("instant"),
        ("ok", "exit", "hang"),
        startup_timeout=40,
        shutdown_wait=1,
    )
    write_kernelspec(srv.share, "slow-badargv", BAD_ARGV)
    yield from serving(srv)


def _marks(srv: JupyverseServer) -> Path:
    return srv.home / "marks"


def _pid_of(srv: JupyverseServer, kernel_id: str, timeout: float = 30) -> int:
    """The pid of the slow kernel process of `kernel_id`, from the marker it writes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for mark in _marks(srv).glob("*.pid"):
            if kernel_id in mark.read_text():
                return int(mark.stem)
        time.sleep(0.05)
    raise AssertionError(f"kernel {kernel_id} never ran")


def _still_sleeping(pid: int) -> bool:
    """Whether the process is still the sleeping script (it has not become ipykernel)."""
    try:
        return b"ipykernel_launcher" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def _model(http: httpx.AsyncClient, kernel_id: str) -> dict[str, Any]:
    response = await http.get(f"/api/kernels/{kernel_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


@asynccontextmanager
async def _slow_session(
    srv: JupyverseServer, mode: str
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, Any], str, int]]:
    """A new notebook session with a `slow-<mode>` kernel: an HTTP client of the server, the
    session's model, its kernel's id and pid."""
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
        path = f"{uuid.uuid4().hex}.ipynb"
        response = await http.post(
            "/api/sessions",
            json={"path": path, "type": "notebook", "kernel": {"name": f"slow-{mode}"}},
        )
        assert response.status_code == 201, response.text
        session = response.json()
        kernel_id = session["kernel"]["id"]
        yield http, session, kernel_id, _pid_of(srv, kernel_id)


async def _new_kernel(http: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """The model of a kernel of type `name` just started."""
    response = await http.post("/api/kernels", json={"name": name})
    assert response.status_code == 201, response.text
    return dict(response.json())


async def _until_state(
    http: httpx.AsyncClient, kernel_id: str, state: str, timeout: float
) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            model = await _model(http, kernel_id)
            if model["execution_state"] == state:
                return model
            await anyio.sleep(0.1)


async def test_session_answers_while_the_kernel_starts_and_runs_what_was_sent(
    slow_server: JupyverseServer,
) -> None:
    srv = slow_server
    async with _slow_session(srv, "ok") as (http, session, kernel_id, pid):
        hold = _marks(srv) / f"{pid}.hold"
        hold.touch()  # the kernel sleeps until the request below was sent
        # Answered while the kernel still slept: it could not have replied to anything.
        assert _still_sleeping(pid), "the POST waited for the kernel"
        assert session["kernel"]["execution_state"] == "starting"
        assert (srv.runtime_dir / f"kernel-{kernel_id}.json").exists()
        try:
            client = await KernelClient.connect(srv.ws_url, kernel_id)
            msg_id = await client.execute("print('sent while starting')")
            assert _still_sleeping(pid)
            hold.unlink()
            msgs = await client.until_idle(msg_id, timeout=60)
            replies = [m for m in msgs if m.msg_type == "execute_reply"]
            if not replies:  # shell and iopub are not ordered: the reply may follow the idle
                replies = (await client.until(lambda m: m.msg_type == "execute_reply"))[-1:]
            assert replies[0].parent_id == msg_id and replies[0].content["status"] == "ok"
            stdout = [
                m.content["text"] for m in msgs if m.msg_type == "stream" and m.parent_id == msg_id
            ]
            assert "".join(stdout) == "sent while starting\n"
            await client.close()
            model = await _until_state(http, kernel_id, "idle", 30)
            assert "reason" not in model
        finally:
            await http.delete(f"/api/sessions/{session['id']}")
        await until(lambda: not alive(pid), "kernel gone", 30)


async def _check_dead_and_clean(
    srv: JupyverseServer, http: httpx.AsyncClient, kernel_id: str, pid: int, words: str
) -> dict[str, Any]:
    model = await _until_state(http, kernel_id, "dead", 60)
    assert words in model["reason"], model
    await until(lambda: not alive(pid), "no process left", 30)
    assert not (srv.runtime_dir / f"kernel-{kernel_id}.json").exists()
    # it stays listed, dead with its reason, until deleted
    listed = {k["id"]: k for k in (await http.get("/api/kernels")).json()}
    assert listed[kernel_id]["execution_state"] == "dead"
    return model


async def test_kernel_that_exits_while_starting_is_dead_with_its_last_output(
    slow_server: JupyverseServer,
) -> None:
    srv = slow_server
    async with _slow_session(srv, "exit") as (http, session, kernel_id, pid):
        assert _still_sleeping(pid) and session["kernel"]["execution_state"] == "starting"
        client = await KernelClient.connect(srv.ws_url, kernel_id)
        await client.execute("print('never runs')")
        model = await _check_dead_and_clean(srv, http, kernel_id, pid, "exited with code 5")
        assert "no module named nowhere" in model["reason"]
        # its client was told
        await client.until(
            lambda m: m.msg_type == "status" and m.content["execution_state"] == "dead", 30
        )
        await client.close()
        # its session remains, showing the dead kernel (as JupyterLab expects)
        got = await http.get(f"/api/sessions/{session['id']}")
        assert got.status_code == 200 and got.json()["kernel"]["execution_state"] == "dead"
        # no automatic restart loop: still the one process marker, still dead
        assert len([m for m in _marks(srv).glob("*.pid") if kernel_id in m.read_text()]) == 1
        assert (await http.delete(f"/api/sessions/{session['id']}")).status_code == 204
        assert (await http.get(f"/api/kernels/{kernel_id}")).status_code == 404


async def test_kernel_that_never_answers_is_dead_after_startup_timeout(
    tmp_path: Path,
) -> None:
    srv = _slow_server(tmp_path, ("hang",), startup_timeout=3, shutdown_wait=1)
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            started = await _new_kernel(http, "slow-hang")
            assert started["execution_state"] == "starting"
            kernel_id = started["id"]
            pid = _pid_of(srv, kernel_id)
            model = await _check_dead_and_clean(
                srv, http, kernel_id, pid, "did not answer kernel_info within 3 s"
            )
            assert "waking up in a while" in model["reason"]
            assert (await http.delete(f"/api/kernels/{kernel_id}")).status_code == 204
    finally:
        srv.stop()
    assert not srv.server_tracebacks()
    assert srv.read_log().count(f"Kernel {kernel_id} did not start") == 1


async def test_bad_argv_is_a_500_at_once(slow_server: JupyverseServer) -> None:
    async with httpx.AsyncClient(base_url=slow_server.url, timeout=60) as http:
        before = {k["id"] for k in (await http.get("/api/kernels")).json()}
        response = await http.post("/api/kernels", json={"name": "slow-badargv"})
        assert response.status_code == 500, response.text
        assert "Could not launch" in response.json()["message"]
        assert {k["id"] for k in (await http.get("/api/kernels")).json()} == before


async def test_rest_restart_launches_a_kernel_dead_at_start_again(
    slow_server: JupyverseServer,
) -> None:
    srv = slow_server
    async with httpx.AsyncClient(base_url=srv.url, timeout=90) as http:
        kernel_id = (await _new_kernel(http, "slow-exit"))["id"]
        pid = _pid_of(srv, kernel_id)
        await _check_dead_and_clean(srv, http, kernel_id, pid, "exited with code 5")
        # It is launched again (and fails again: same kernelspec), with a new process.
        restarted = await http.post(f"/api/kernels/{kernel_id}/restart")
        assert restarted.status_code == 500, restarted.text
        marks = [m for m in _marks(srv).glob("*.pid") if kernel_id in m.read_text()]
        assert len(marks) == 2
        model = await _model(http, kernel_id)
        assert model["execution_state"] == "dead" and "exited with code 5" in model["reason"]
        assert (await http.delete(f"/api/kernels/{kernel_id}")).status_code == 204
        assert not (srv.runtime_dir / f"kernel-{kernel_id}.json").exists()


async def test_interrupt_while_starting_does_not_kill_it(slow_server: JupyverseServer) -> None:
    srv = slow_server
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
        response = await http.post("/api/kernels", json={"name": "slow-ok"})
        kernel_id = response.json()["id"]
        try:
            pid = _pid_of(srv, kernel_id)
            assert _still_sleeping(pid)
            assert (await http.post(f"/api/kernels/{kernel_id}/interrupt")).status_code == 204
            await _until_state(http, kernel_id, "idle", 60)
        finally:
            await http.delete(f"/api/kernels/{kernel_id}")


async def test_stopping_the_server_while_a_kernel_starts_leaves_nothing(tmp_path: Path) -> None:
    srv = _slow_server(tmp_path, ("hang",), shutdown_wait=1)
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            kernel_id = (await _new_kernel(http, "slow-hang"))["id"]
        pid = _pid_of(srv, kernel_id)
        assert (srv.runtime_dir / f"kernel-{kernel_id}.json").exists()
    finally:
        code = srv.stop()
    assert code == 0 or code == -signal.SIGTERM, srv.read_log()[-3000:]
    await until(lambda: not alive(pid), "no process left", 30)
    assert not list(srv.runtime_dir.glob("kernel-*.json"))
    assert not srv.server_tracebacks()


async def test_a_starting_kernel_is_not_culled_for_idleness(tmp_path: Path) -> None:
    # Culling every second, after 1 s without activity: the slow kernel's start takes longer.
    srv = _slow_server(tmp_path, ("ok",), cull_idle_timeout=1, cull_interval=1, shutdown_wait=1)
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            kernel_id = (await _new_kernel(http, "slow-ok"))["id"]
            pid = _pid_of(srv, kernel_id)
            # Several cull checks pass while it sleeps; it comes up all the same.
            ready, culled = f"Kernel {kernel_id} is ready", f"Culling kernel {kernel_id}"
            await until(
                lambda: ready in srv.read_log() or culled in srv.read_log(), "ready or culled", 60
            )
            log = srv.read_log()
            assert f"{culled} (starting)" not in log
            # (it may be culled once idle, as it should)
            assert log.index(ready) < (log.index(culled) if culled in log else len(log))
            assert not _still_sleeping(pid)
    finally:
        srv.stop()
