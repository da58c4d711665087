"""Culling idle kernels with the four options, and telling their clients why."""

from __future__ import annotations

import time

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import JupyverseServer
from .kernel_client import KernelClient

pytestmark = pytest.mark.anyio

FAST = {"cull_idle_timeout": 1.5, "cull_interval": 0.25}


async def _ids(http: httpx.AsyncClient) -> set[str]:
    return {k["id"] for k in (await http.get("/api/kernels")).json()}


async def test_default_culling_spares_connected_and_busy_kernels(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    srv = JupyverseServer(tmp_path_factory.mktemp("cull"), kernels=FAST)
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            session = (
                await http.post("/api/sessions", json={"path": "idle.ipynb", "type": "notebook"})
            ).json()
            idle = session["kernel"]["id"]
            created = time.monotonic()
            connected = (await http.post("/api/kernels", json={})).json()["id"]
            busy = (await http.post("/api/kernels", json={})).json()["id"]
            client = await KernelClient.connect(srv.ws_url, connected)
            worker = await KernelClient.connect(srv.ws_url, busy)
            msg_id = await worker.execute("import time; time.sleep(30)")
            await worker.until(lambda m: m.msg_type == "execute_input" and m.parent_id == msg_id)
            await worker.close()
            with anyio.fail_after(10):
                while idle in await _ids(http):
                    await anyio.sleep(0.1)
            # not before cull_idle_timeout (1.5 s) without activity
            assert time.monotonic() - created >= 1.4
            # its session went with it, at once
            assert (await http.get(f"/api/sessions/{session['id']}")).status_code == 404
            await anyio.sleep(2.5)
            assert {connected, busy} <= await _ids(http)
            assert (await http.get(f"/api/kernels/{busy}")).json()["execution_state"] == "busy"
            await client.close()
            with anyio.fail_after(10):
                while connected in await _ids(http):
                    await anyio.sleep(0.1)
            assert busy in await _ids(http)
        assert "Culling kernel" in srv.read_log()
    finally:
        srv.stop()


async def test_cull_connected_and_busy_tell_clients(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    srv = JupyverseServer(
        tmp_path_factory.mktemp("cullall"),
        kernels={**FAST, "cull_connected": True, "cull_busy": True},
    )
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            kernel_id = (await http.post("/api/kernels", json={})).json()["id"]
            client = await KernelClient.connect(srv.ws_url, kernel_id)
            msg_id = await client.execute("import time; time.sleep(30)")
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await client.receive(10)
            notices = [m for m in client.received if m.msg_type == "stream"]
            assert notices and "without activity" in notices[-1].content["text"]
            # the notice lands in the cell that was running
            assert notices[-1].parent_id == msg_id
            assert client.received[-1].msg_type == "status"
            assert client.received[-1].content["execution_state"] == "dead"
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
            assert kernel_id not in await _ids(http)
    finally:
        srv.stop()


async def test_activity_keeps_a_kernel_alive(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = JupyverseServer(tmp_path_factory.mktemp("cullactive"), kernels=FAST)
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            kernel_id = (await http.post("/api/kernels", json={})).json()["id"]
            client = await KernelClient.connect(srv.ws_url, kernel_id)
            # a long cell that prints: busy, and active, until it ends
            await client.run("import time\nfor i in range(6):\n    print(i); time.sleep(0.5)")
            await client.close()
            # the idle status at the end of the cell counts as activity
            assert kernel_id in await _ids(http)
            with anyio.fail_after(10):
                while kernel_id in await _ids(http):
                    await anyio.sleep(0.1)
    finally:
        srv.stop()
