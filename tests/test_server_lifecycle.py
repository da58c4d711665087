"""Whole-server behaviour: upstream's Python API, and a stop that leaves nothing behind."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anyio
import pytest

from fps_kernels.kernel_driver.ownership import OWNER_KEY, process_start

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
            with anyio.fail_after(30):
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
        assert time.monotonic() - started < 25  # bounded, even on a loaded machine
        # uvicorn closes open sockets first, with 1012 (service restart): clients retry
        _msgs, close_code = await connected.until_closed(30)
        assert close_code == 1012
    finally:
        srv.stop()
    assert kernel_processes(srv.runtime_dir) == []
    assert list(srv.runtime_dir.glob("kernel-*.json")) == []
    assert srv.server_tracebacks() == []


def test_stale_connection_files_of_a_killed_server_are_removed_at_the_next_start(
    tmp_path: Path,
) -> None:
    first = JupyverseServer(tmp_path)
    first.start()
    try:
        with first.client() as http:
            for i in range(2):
                response = http.post(
                    "/api/sessions", json={"path": f"n{i}.ipynb", "type": "notebook"}
                )
                assert response.status_code == 201, response.text
            assert http.post("/api/kernels", json={}).status_code == 201
            # every kernel up (its process runs ipykernel) before the server is killed
            deadline = time.monotonic() + 60
            while len(kernel_processes(first.runtime_dir)) < 3:
                assert time.monotonic() < deadline, "3 kernel processes"
                time.sleep(0.1)
        assert first.process is not None
        server_pid = first.process.pid
        first.process.kill()
        first.process.wait()
    finally:
        first.stop()
    # The kernels see their parent gone and exit by themselves; their files stay.
    deadline = time.monotonic() + 30
    while kernel_processes(first.runtime_dir):
        assert time.monotonic() < deadline, "the kernels exiting after their server was killed"
        time.sleep(0.1)
    stale = sorted(first.runtime_dir.glob("kernel-*.json"))
    assert len(stale) == 3
    owner = json.loads(stale[0].read_text())[OWNER_KEY]
    assert owner["pid"] == server_pid  # the mark names the server that wrote it

    # Not ours: jupyter_server's (same naming, no mark), and one of ours whose server is alive
    # (this test's process stands for it).
    foreign = first.runtime_dir / "kernel-0a1b2c3d-jupyter-server.json"
    foreign.write_text(json.dumps({"shell_port": 1, "key": "k", "kernel_name": "python3"}))
    alive = first.runtime_dir / "kernel-alive-server.json"
    me = {"pid": os.getpid(), "start": process_start(os.getpid())}
    alive.write_text(json.dumps({"shell_port": 1, "key": "k", OWNER_KEY: me}))
    # a server of ours that is gone although its pid is taken again (another start time)
    reused = first.runtime_dir / "kernel-reused-pid.json"
    reused.write_text(json.dumps({"key": "k", OWNER_KEY: {**me, "start": "other-boot:1"}}))

    second = JupyverseServer(tmp_path)
    second.start()
    try:
        assert not [path for path in stale if path.exists()]
        assert not reused.exists()
        assert foreign.exists() and alive.exists()
        assert "Removed 4 stale connection file(s)" in second.read_log()
        with second.client() as http:
            assert http.post("/api/kernels", json={}).status_code == 201
    finally:
        assert second.stop() == 0
    assert sorted(p.name for p in second.runtime_dir.glob("kernel-*.json")) == sorted(
        [foreign.name, alive.name]
    )
    assert second.server_tracebacks() == []
