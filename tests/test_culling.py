"""Culling idle kernels with the four options, and telling their clients why."""

from __future__ import annotations

import time
from datetime import datetime

import anyio
import httpx
import pytest

from .conftest import JupyverseServer, started
from .kernel_client import KernelClient

pytestmark = pytest.mark.anyio

# Culling windows sized for a busy 2-core machine: each kernel that must not be culled gets its
# client (or its busy cell) right after its own start, so only a WebSocket connect has to fit in
# CULL_TIMEOUT, never a kernel start; every wait is for an event, with deadlines of tens of seconds.
CULL_TIMEOUT = 5.0
CULL_INTERVAL = 0.5
FAST = {"cull_idle_timeout": CULL_TIMEOUT, "cull_interval": CULL_INTERVAL}
CULLED_WITHIN = CULL_TIMEOUT + 60  # the cull itself, plus a shutdown on a loaded machine


async def _start(http: httpx.AsyncClient) -> str:
    return str((await http.post("/api/kernels", json={})).json()["id"])


async def _ids(http: httpx.AsyncClient) -> set[str]:
    return {k["id"] for k in (await http.get("/api/kernels")).json()}


async def _until_gone(http: httpx.AsyncClient, kernel_id: str) -> None:
    with anyio.fail_after(CULLED_WITHIN):
        while kernel_id in await _ids(http):
            await anyio.sleep(0.1)


async def test_default_culling_spares_connected_and_busy_kernels(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    srv = JupyverseServer(tmp_path_factory.mktemp("cull"), kernels=FAST)
    async with started(srv) as http:
        connected = await _start(http)
        client = await KernelClient.connect(srv.ws_url, connected)
        busy = await _start(http)
        worker = await KernelClient.connect(srv.ws_url, busy)
        msg_id = await worker.execute("import time; time.sleep(600)")
        await worker.until(lambda m: m.msg_type == "execute_input" and m.parent_id == msg_id)
        await worker.close()
        # Started last, so the other two have been without activity at least as long.
        created = time.monotonic()
        session = (
            await http.post("/api/sessions", json={"path": "idle.ipynb", "type": "notebook"})
        ).json()
        idle = session["kernel"]["id"]
        await _until_gone(http, idle)
        # not before cull_idle_timeout without activity
        assert time.monotonic() - created >= CULL_TIMEOUT - 0.1
        # its session went with it, at once
        assert (await http.get(f"/api/sessions/{session['id']}")).status_code == 404
        # The other two were as idle as `idle`, for longer: a few more culling passes
        # (the pass that culled `idle` may not have reached them yet) must spare them.
        await anyio.sleep(max(3.0, 4 * CULL_INTERVAL))
        assert {connected, busy} <= await _ids(http)
        assert (await http.get(f"/api/kernels/{busy}")).json()["execution_state"] == "busy"
        await client.close()
        await _until_gone(http, connected)
        assert busy in await _ids(http)
        log = srv.read_log()
        assert f"Culling kernel {idle}" in log and f"Culling kernel {busy}" not in log


async def test_cull_connected_and_busy_tell_clients(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    srv = JupyverseServer(
        tmp_path_factory.mktemp("cullall"),
        kernels={**FAST, "cull_connected": True, "cull_busy": True},
    )
    async with started(srv) as http:
        kernel_id = await _start(http)
        client = await KernelClient.connect(srv.ws_url, kernel_id)
        msg_id = await client.execute("import time; time.sleep(600)")
        _msgs, close_code = await client.until_closed(CULLED_WITHIN)
        notices = [m for m in client.received if m.msg_type == "stream"]
        assert notices and "without activity" in notices[-1].content["text"]
        # the notice lands in the cell that was running
        assert notices[-1].parent_id == msg_id
        assert client.received[-1].msg_type == "status"
        assert client.received[-1].content["execution_state"] == "dead"
        assert close_code == 1000
        assert kernel_id not in await _ids(http)


async def test_activity_keeps_a_kernel_alive(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = JupyverseServer(tmp_path_factory.mktemp("cullactive"), kernels=FAST)
    async with started(srv) as http:
        kernel_id = await _start(http)
        client = await KernelClient.connect(srv.ws_url, kernel_id)
        # A cell that prints for longer than cull_idle_timeout: busy, and active, until it
        # ends; without the activity counted, it would be culled as soon as it is idle.
        steps = int(CULL_TIMEOUT / 0.5) + 4
        msgs, _ = await client.run(
            f"import time\nfor i in range({steps}):\n    print(i); time.sleep(0.5)", timeout=60
        )
        await client.close()
        # the idle status at the end of the cell counts as activity
        ended = datetime.fromisoformat(msgs[-1].header["date"])
        model = (await http.get(f"/api/kernels/{kernel_id}")).json()
        assert datetime.fromisoformat(model["last_activity"]) >= ended
        assert kernel_id in await _ids(http)
        await _until_gone(http, kernel_id)
