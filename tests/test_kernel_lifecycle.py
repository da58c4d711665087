"""Kernel lifecycle an operator can trust: death, auto-restart, give-up, interrupt modes."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

from .conftest import JupyverseServer, kernel_pid, kernel_processes, serving, write_kernelspec
from .kernel_client import KernelClient

pytestmark = pytest.mark.anyio

# Works the first time, then exits at once on every later start: a kernel that cannot restart.
FLAKY = """
import os, sys
marker = sys.argv[1] + ".started"
if os.path.exists(marker):
    print("cannot start twice", flush=True)
    sys.exit(7)
open(marker, "w").close()
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", "-f", sys.argv[1]])
"""


@pytest.fixture(scope="module")
def lifecycle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyverseServer]:
    srv = JupyverseServer(tmp_path_factory.mktemp("lifecycle"), kernels={"shutdown_wait": 1})
    flaky = srv.home / "flaky.py"
    flaky.write_text(FLAKY)
    write_kernelspec(
        srv.share,
        "flaky",
        {"argv": [sys.executable, str(flaky), "{connection_file}"], "display_name": "Flaky"},
    )
    write_kernelspec(
        srv.share,
        "bymessage",
        {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Interrupted by message",
            "language": "python",
            "interrupt_mode": "message",
        },
    )
    yield from serving(srv)


async def _start(http: httpx.AsyncClient, name: str = "python3") -> str:
    """A new kernel, once it answered (POST answers while it is still `starting`)."""
    response = await http.post("/api/kernels", json={"name": name})
    assert response.status_code == 201, response.text
    kernel_id = str(response.json()["id"])
    with anyio.fail_after(60):
        while (await http.get(f"/api/kernels/{kernel_id}")).json()["execution_state"] != "idle":
            await anyio.sleep(0.05)
    return kernel_id


@asynccontextmanager
async def _connected(
    srv: JupyverseServer, name: str = "python3"
) -> AsyncIterator[tuple[httpx.AsyncClient, str, KernelClient]]:
    """A kernel once it answered, and a WebSocket client of it: both gone after."""
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
        kernel_id = await _start(http, name)
        client = await KernelClient.connect(srv.ws_url, kernel_id)
        try:
            yield http, kernel_id, client
        finally:
            await client.close()
            await http.delete(f"/api/kernels/{kernel_id}")


async def test_killed_kernel_restarts_on_the_same_socket_20_times(
    lifecycle_server: JupyverseServer,
) -> None:
    srv = lifecycle_server
    async with _connected(srv) as (http, kernel_id, client):
        for round_ in range(20):
            await client.run(f"x = {round_}")
            pid = kernel_pid(srv.runtime_dir, kernel_id)
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            msgs = await client.until(
                lambda m: m.msg_type == "status" and m.content["execution_state"] == "restarting",
                timeout=30,
            )
            # noticed at once (the server waits on the process), not by a heartbeat; the
            # bound leaves room for a loaded machine
            assert time.monotonic() - killed_at < 5.0
            notice = next(m for m in msgs if m.msg_type == "stream")
            assert "killed by SIGKILL, likely out of memory" in notice.content["text"]
            model = (await http.get(f"/api/kernels/{kernel_id}")).json()
            assert model["execution_state"] in ("restarting", "idle")
            assert "SIGKILL" in model["reason"]
            _msgs, stdout = await client.run("print('x' in globals())")
            assert stdout == "False\n", f"round {round_}"
            assert kernel_pid(srv.runtime_dir, kernel_id) != pid
        model = (await http.get(f"/api/kernels/{kernel_id}")).json()
        assert model["execution_state"] == "idle"


async def test_kernel_that_cannot_restart_ends_dead_without_looping(
    lifecycle_server: JupyverseServer,
) -> None:
    srv = lifecycle_server
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
        kernel_id = await _start(http, "flaky")
        client = await KernelClient.connect(srv.ws_url, kernel_id)
        msg_id = await client.execute("import os; print('dying', flush=True); os._exit(3)")
        msgs = await client.until(
            lambda m: m.msg_type == "status" and m.content["execution_state"] == "dead",
            timeout=30,
        )
        # the first notice lands in the cell that was running
        first = next(
            m for m in msgs if m.msg_type == "stream" and "[fps_kernels]" in m.content["text"]
        )
        assert first.parent_id == msg_id
        assert "exited with code 3" in first.content["text"]
        final = [m for m in msgs if m.msg_type == "stream"][-1].content["text"]
        assert "5 times in a row" in final and "not restarted" in final
        model = (await http.get(f"/api/kernels/{kernel_id}")).json()
        assert model["execution_state"] == "dead"
        assert "exited with code 7" in model["reason"]
        # died running the cell, then 4 failed starts: 5 deaths in a row, then no more tries
        started = srv.read_log().count("] cannot start twice")
        assert started == 4
        await anyio.sleep(1.5)
        assert srv.read_log().count("] cannot start twice") == started
        assert kernel_processes(srv.runtime_dir) == [] or all(
            kernel_id.encode() not in open(f"/proc/{p}/cmdline", "rb").read()
            for p in kernel_processes(srv.runtime_dir)
        )
        assert (await http.delete(f"/api/kernels/{kernel_id}")).status_code == 204
        await client.close()
    assert not (srv.runtime_dir / f"kernel-{kernel_id}.json").exists()


async def test_interrupt_by_message(lifecycle_server: JupyverseServer) -> None:
    srv = lifecycle_server
    async with _connected(srv, "bymessage") as (http, kernel_id, client):
        msg_id = await client.execute("import time; print('go', flush=True); time.sleep(60)")
        await client.until(lambda m: m.msg_type == "stream" and m.parent_id == msg_id)
        assert (await http.post(f"/api/kernels/{kernel_id}/interrupt")).status_code == 204
        msgs = await client.until(lambda m: m.msg_type == "error", timeout=10)
        assert msgs[-1].content["ename"] == "KeyboardInterrupt"


async def test_delete_leaves_no_process_no_file_and_closes_clients(
    lifecycle_server: JupyverseServer,
) -> None:
    srv = lifecycle_server
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
        kernel_id = await _start(http)
        pid = kernel_pid(srv.runtime_dir, kernel_id)
        client = await KernelClient.connect(srv.ws_url, kernel_id)
        # a child process in the kernel's group goes too
        await client.run("import subprocess; p = subprocess.Popen(['sleep', '300'])")
        _msgs, child = await client.run("print(p.pid)")
        assert (await http.delete(f"/api/kernels/{kernel_id}")).status_code == 204
        _msgs, close_code = await client.until_closed(30)
        assert close_code == 1000
    for gone in (pid, int(child)):
        assert (
            not os.path.exists(f"/proc/{gone}")
            or "Z" in open(f"/proc/{gone}/stat").read().split()[2]
        )
    assert not (srv.runtime_dir / f"kernel-{kernel_id}.json").exists()


async def test_autorestart_off_leaves_the_kernel_dead(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    srv = JupyverseServer(tmp_path_factory.mktemp("noauto"), kernels={"autorestart": False})
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            kernel_id = await _start(http)
            os.kill(kernel_pid(srv.runtime_dir, kernel_id), signal.SIGTERM)
            with anyio.fail_after(30):
                while (model := (await http.get(f"/api/kernels/{kernel_id}")).json())[
                    "execution_state"
                ] != "dead":
                    await anyio.sleep(0.05)
            assert "killed by SIGTERM" in model["reason"]
            assert "automatic restart is off" in srv.read_log()
    finally:
        srv.stop()
    assert kernel_processes(srv.runtime_dir) == []


async def test_failed_rest_restart_answers_500_fast(lifecycle_server: JupyverseServer) -> None:
    srv = lifecycle_server
    async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
        kernel_id = await _start(http, "flaky")
        started = time.monotonic()
        response = await http.post(f"/api/kernels/{kernel_id}/restart")
        assert response.status_code == 500
        assert "did not restart" in response.json()["message"]
        assert "exited with code 7" in response.json()["message"]
        # well before startup_timeout (60 s): the exit is seen at once
        assert time.monotonic() - started < 30
        model = (await http.get(f"/api/kernels/{kernel_id}")).json()
        assert model["execution_state"] == "dead" and "code 7" in model["reason"]
        assert (await http.delete(f"/api/kernels/{kernel_id}")).status_code == 204
