"""External kernels: ipykernels started by the tests, served from a watched folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import JupyverseServer, free_port, serving
from .kernel_client import connected, run_once
from .ydoc_client import until

pytestmark = pytest.mark.anyio


def connection_info(kernel_name: str) -> dict[str, Any]:
    ports: set[int] = set()
    while len(ports) < 5:
        ports.add(free_port())
    shell, iopub, stdin, control, hb = sorted(ports)
    return {
        "shell_port": shell,
        "iopub_port": iopub,
        "stdin_port": stdin,
        "control_port": control,
        "hb_port": hb,
        "ip": "127.0.0.1",
        "key": uuid.uuid4().hex,
        "transport": "tcp",
        "signature_scheme": "hmac-sha256",
        "kernel_name": kernel_name,
    }


class ExternalKernel:
    """An ipykernel of the test's own: `python -m ipykernel_launcher -f FILE`."""

    def __init__(self, connection_file: Path, kernel_name: str) -> None:
        self.connection_file = connection_file
        self.info = connection_info(kernel_name)
        connection_file.write_text(json.dumps(self.info))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ipykernel_launcher", "-f", str(connection_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def ext_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyverseServer]:
    home = tmp_path_factory.mktemp("jupyverse-external")
    folder = home / "external"
    folder.mkdir()
    # Already there when the server starts: a running kernel and a malformed file.
    early = ExternalKernel(folder / "early.json", "ext-early")
    (folder / "broken.json").write_text("{not json")
    srv = JupyverseServer(
        home,
        kernels={
            "allow_external_kernels": True,
            "external_connection_dir": str(folder),
            "startup_timeout": 20,
        },
    )
    yield from serving(srv)
    early.stop()


@pytest.fixture
def folder(ext_server: JupyverseServer) -> Path:
    return ext_server.home / "external"


@pytest.fixture
def http(ext_server: JupyverseServer) -> Iterator[httpx.Client]:
    with ext_server.client() as client:
        yield client


@pytest.fixture
def started() -> Iterator[list[ExternalKernel]]:
    kernels: list[ExternalKernel] = []
    yield kernels
    for kernel in kernels:
        kernel.stop()


def listed(http: httpx.Client, name: str) -> dict[str, Any] | None:
    kernels = http.get("/api/kernels").json()
    return next((k for k in kernels if k["name"] == name), None)


async def idle_kernel(http: httpx.Client, name: str, timeout: float = 20) -> str:
    await until(
        lambda: (listed(http, name) or {}).get("execution_state") == "idle",
        timeout,
        f"{name} listed and idle",
    )
    model = listed(http, name)
    assert model is not None
    return str(model["id"])


def log_lines(server: JupyverseServer, text: str) -> list[str]:
    return [line for line in server.read_log().splitlines() if text in line]


async def test_files_there_at_start_are_served_and_malformed_ones_ignored(
    ext_server: JupyverseServer, http: httpx.Client
) -> None:
    kernel_id = await idle_kernel(http, "ext-early")
    assert await run_once(ext_server.ws_url, kernel_id, "print(6 * 7)") == "42\n"
    assert len(log_lines(ext_server, "broken.json")) == 1
    assert http.get("/api/status").status_code == 200


async def test_lifecycle_listed_used_and_removed_with_its_file(
    ext_server: JupyverseServer, http: httpx.Client, folder: Path, started: list[ExternalKernel]
) -> None:
    written = time.monotonic()
    kernel = ExternalKernel(folder / "life.json", "ext-life")
    started.append(kernel)
    await until(lambda: listed(http, "ext-life"), 30, "ext-life listed")
    # by the folder's polling (4 times a second), not at some later refresh; the bound leaves
    # room for a loaded machine
    assert time.monotonic() - written < 10, "listed within seconds of appearing"
    kernel_id = await idle_kernel(http, "ext-life")
    assert listed(http, "ext-life") == http.get(f"/api/kernels/{kernel_id}").json()

    async with connected(ext_server.ws_url, kernel_id) as client:
        _msgs, stdout = await client.run("print('hello from outside')")
        assert stdout == "hello from outside\n"
        # Its execution state is tracked as for our own kernels.
        msg_id = await client.execute("import time; time.sleep(1)")
        await until(lambda: listed(http, "ext-life")["execution_state"] == "busy", 30)  # type: ignore[index]
        await client.until_idle(msg_id)
        await until(lambda: listed(http, "ext-life")["execution_state"] == "idle", 30)  # type: ignore[index]

        # A session on it: deleting the session leaves the kernel listed and running.
        response = http.post(
            "/api/sessions",
            json={"path": "ext.ipynb", "type": "notebook", "name": "", "kernel": {"id": kernel_id}},
        )
        assert response.status_code == 201, response.text
        session = response.json()
        assert session["kernel"]["id"] == kernel_id
        assert http.delete(f"/api/sessions/{session['id']}").status_code == 204
        assert listed(http, "ext-life") is not None and kernel.alive()
        session = http.post(
            "/api/sessions",
            json={"path": "ext.ipynb", "type": "notebook", "name": "", "kernel": {"id": kernel_id}},
        ).json()

        # Its file removed: unlisted, its session closed, its WebSocket told, the kernel alive.
        kernel.connection_file.unlink()
        removed = time.monotonic()
        await until(lambda: listed(http, "ext-life") is None, 30, "ext-life unlisted")
        assert time.monotonic() - removed < 10
        assert http.get(f"/api/sessions/{session['id']}").status_code == 404
        states = []
        with pytest.raises(ConnectionClosed):
            while True:
                msg = await client.receive(timeout=30)
                if msg.msg_type == "status":
                    states.append(msg.content["execution_state"])
        assert "dead" in states
        assert client.ws.close_code == 1000
    time.sleep(0.5)
    assert kernel.alive(), "the plugin never stops a kernel it did not start"


async def test_delete_sends_shutdown_request_and_forgets_it(
    ext_server: JupyverseServer, http: httpx.Client, folder: Path, started: list[ExternalKernel]
) -> None:
    kernel = ExternalKernel(folder / "delete.json", "ext-delete")
    started.append(kernel)
    kernel_id = await idle_kernel(http, "ext-delete")
    assert http.delete(f"/api/kernels/{kernel_id}").status_code == 204
    assert listed(http, "ext-delete") is None
    await until(lambda: not kernel.alive(), 30, "the kernel exiting on shutdown_request")
    assert kernel.process.returncode == 0  # it shut down, it was not killed
    # Its file is still there (ipykernel did not write it), yet it stays forgotten.
    assert kernel.connection_file.exists()
    time.sleep(1)
    assert listed(http, "ext-delete") is None
    kernel.connection_file.unlink()


async def test_malformed_and_partial_files_are_ignored_until_valid(
    ext_server: JupyverseServer, http: httpx.Client, folder: Path, started: list[ExternalKernel]
) -> None:
    good = connection_info("ext-ok")
    bad_files = {
        "array.json": "[1, 2]",
        "empty.json": "",
        "nokey.json": json.dumps({k: v for k, v in good.items() if k != "key"}),
        "noname.json": json.dumps({k: v for k, v in good.items() if k != "kernel_name"}),
        "noports.json": json.dumps({"key": "k", "kernel_name": "ext-bad"}),
        "badport.json": json.dumps({**good, "shell_port": 70000}),
        "badscheme.json": json.dumps({**good, "signature_scheme": "md5"}),
        "notes.txt": "just some notes",
    }
    for name, content in bad_files.items():
        (folder / name).write_text(content)
    (folder / "binary.bin").write_bytes(bytes(range(256)) * 10)
    (folder / "adir.json").mkdir()

    # A kernel's file written in several steps into the folder.
    kernel = ExternalKernel(ext_server.home / "partial-source.json", "ext-partial")
    started.append(kernel)
    text = json.dumps(kernel.info)
    partial = folder / "partial.json"
    partial.write_text(text[: len(text) // 2])
    # seen by the watcher (and logged) before it changes again
    await until(
        lambda: log_lines(ext_server, "partial.json until it is a valid"), 30, "partial.json seen"
    )
    partial.write_text(json.dumps({"key": kernel.info["key"], "kernel_name": "ext-partial"}))
    time.sleep(1.5)  # a few polls of the folder: still invalid, still not served
    assert listed(http, "ext-partial") is None
    partial.write_text(text)
    kernel_id = await idle_kernel(http, "ext-partial")

    stdout = await run_once(ext_server.ws_url, kernel_id, "print('whole at last')")
    assert stdout == "whole at last\n"
    names = {k["name"] for k in http.get("/api/kernels").json()}
    assert not names & {"ext-ok", "ext-bad"}
    bad_names = [*bad_files, "binary.bin", "partial.json"]
    await until(
        lambda: all(log_lines(ext_server, f"{n} until it is a valid") for n in bad_names),
        30,
        "every bad file seen",
    )
    for name in bad_names:
        assert len(log_lines(ext_server, f"{name} until it is a valid")) == 1, name
    assert not log_lines(ext_server, "adir.json")
    assert not log_lines(ext_server, "Traceback")
    for name in [*bad_files, "binary.bin", "partial.json"]:
        (folder / name).unlink()
    (folder / "adir.json").rmdir()
    await until(lambda: listed(http, "ext-partial") is None, 30, "ext-partial unlisted")
