"""Whole-server behaviour: upstream's Python API, and a stop that leaves nothing behind."""

from __future__ import annotations

import time

import anyio
import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import JupyverseServer, kernel_processes
from .kernel_client import KernelClient


@pytest.mark.anyio
async def test_python_api_registry_and_clean_stop(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = JupyverseServer(
        tmp_path_factory.mktemp("legacy"),
        extra_components={"legacy": {"type": "tests.support.legacy_api:LegacyApiComponent"}},
    )
    srv.start()
    try:
        with srv.client() as http:
            # kernels added through upstream's registry, before and after the app started
            with anyio.fail_after(10):
                while "legacy-after" not in [k["id"] for k in http.get("/api/kernels").json()]:
                    await anyio.sleep(0.1)
            models = {k["id"]: k for k in http.get("/api/kernels").json()}
            assert models["legacy-after"]["name"] == "python3"
            for kernel_id in ("legacy-before", "legacy-after"):
                client = await KernelClient.connect(srv.ws_url, kernel_id)
                _msgs, stdout = await client.run("print('served')")
                assert stdout == "served\n"
                await client.close()
            # and kernels and sessions of our own
            for i in range(3):
                response = http.post(
                    "/api/sessions", json={"path": f"n{i}.ipynb", "type": "notebook"}
                )
                assert response.status_code == 201
            assert http.post("/api/kernels", json={}).status_code == 201
            connected = await KernelClient.connect(srv.ws_url, response.json()["kernel"]["id"])
        assert len(kernel_processes(srv.runtime_dir)) == 5
        assert len(list(srv.runtime_dir.glob("kernel-*.json"))) == 5
        started = time.monotonic()
        assert srv.stop() == 0
        assert time.monotonic() - started < 15
        # uvicorn closes open sockets first, with 1012 (service restart): clients retry
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await connected.receive(5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    finally:
        srv.stop()
    assert kernel_processes(srv.runtime_dir) == []
    assert list(srv.runtime_dir.glob("kernel-*.json")) == []
    assert srv.server_tracebacks() == []
