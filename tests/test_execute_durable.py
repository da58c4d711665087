"""Server-side execution that loses nothing: the prompt JupyterLab 4.6 draws, outputs that land
with no page open (fps-yjs closes idle rooms after `document_cleanup_delay`, 1 s here), and
the jupyter-server-nbmodel request protocol, `input()` included.

A real jupyverse with fps-yjs, real ipykernels, real HTTP and real Y clients of the rooms.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import nbformat
import pytest

from .conftest import JupyverseServer, new_kernel, serving
from .test_execute import (
    execute,
    http_client,
    notebook_room,
    opened,
    queue,
    shared,
    stream,
    write_notebook,
    yjs_server,
)
from .ydoc_client import Notebook, room, until

pytestmark = pytest.mark.anyio

CLEANUP_DELAY = 1.0


def durable_server(home: Path) -> JupyverseServer:
    return yjs_server(home, {"document_cleanup_delay": CLEANUP_DELAY}, startup_timeout=30)


@pytest.fixture(scope="module")
def dserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyverseServer]:
    srv = durable_server(tmp_path_factory.mktemp("jupyverse-durable"))
    yield from serving(srv)


@pytest.fixture
def dkernel(dserver: JupyverseServer) -> Iterator[str]:
    with dserver.client() as client:
        yield from new_kernel(client)


def saved_cells(server: JupyverseServer, path: str) -> dict[str, Any]:
    # read while fps-contents writes it, the file may be empty or cut: nothing saved yet
    try:
        data = json.loads((server.root / path).read_text())
    except ValueError:
        return {}
    return {cell["id"]: cell for cell in data["cells"]}


def assert_valid(server: JupyverseServer, path: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        text = (server.root / path).read_text()
        try:
            json.loads(text)
            break
        except ValueError:  # caught in the middle of a save: read it again
            assert time.monotonic() < deadline, "the notebook stays unreadable"
            time.sleep(0.2)
    nbformat.validate(nbformat.reads(text, as_version=4))


# --- the prompt --------------------------------------------------------------------------


async def test_execution_state_is_running_while_queued_and_gone_after(
    dserver: JupyverseServer, dkernel: str
) -> None:
    cells = {"slow": "import time\ntime.sleep(1)", "next": "print('next')", "last": "1 + 1"}
    path = write_notebook(dserver.root, "prompt.ipynb", cells)
    async with notebook_room(dserver, path, len(cells)) as (doc_id, doc, nb, http):
        states = {cell_id: nb.watch_state(cell_id) for cell_id in cells}
        await queue(http, dkernel, doc_id, cells)
        # Run All: every queued cell shows [*] (JupyterLab 4.6 reads execution_state).
        await until(lambda: all(nb.state(c) == "running" for c in cells), what="all [*]")
        await until(lambda: all(nb.is_done(c) for c in cells), what="all done")
        for cell_id in cells:
            # Running from the moment it was queued, then removed: absent reads as idle.
            assert states[cell_id] == ["running", None], (cell_id, states[cell_id])
            assert nb.state(cell_id) is None
        assert [nb.json(c)["execution_count"] for c in cells] == [1, 2, 3]

        # A JupyterLab page writes execution_state "idle" when a cell gets its count:
        # the server takes it away again, so the saved notebook stays valid nbformat 4.
        with doc.transaction():
            nb.cell("next")["execution_state"] = "idle"
        await until(lambda: nb.state("next") is None, what="the page's idle state removed")

        def saved_done() -> bool:
            saved = saved_cells(dserver, path)
            return (
                bool(saved)
                and saved["last"]["execution_count"] == 3
                and all("execution_state" not in cell for cell in saved.values())
            )

        await until(saved_done, what="the notebook saved without execution_state")
        assert_valid(dserver, path)


# --- outputs with no page open -----------------------------------------------------------

PRINTER = (
    "import time\nfor i in range({n}):\n    print(f'line {{i}}', flush=True)\n    time.sleep(0.5)"
)


async def test_outputs_land_in_the_document_and_file_after_the_room_was_left(
    dserver: JupyverseServer, dkernel: str
) -> None:
    n = 12  # about 6 s: many times the room's cleanup delay
    cells = {"long": PRINTER.format(n=n), "after": "print('after')"}
    path = write_notebook(dserver.root, "durable.ipynb", cells)
    async with notebook_room(dserver, path, len(cells)) as (doc_id, doc, nb, http):
        await queue(http, dkernel, doc_id, cells)
        await until(lambda: nb.outputs("long"), what="the first line")
    # Every page left: fps-yjs would close the room after CLEANUP_DELAY, but cells run in it.
    expected = "".join(f"line {i}\n" for i in range(n))

    def saved_complete() -> dict[str, Any] | None:
        saved = saved_cells(dserver, path)
        done = saved and saved["after"]["execution_count"] == 2
        return saved if done else None

    saved = await until(saved_complete, timeout=60, what="every output saved")
    assert saved["long"]["outputs"] == [stream(expected)]
    assert saved["long"]["execution_count"] == 1
    assert saved["after"]["outputs"] == [stream("after\n")]
    assert_valid(dserver, path)
    # Once nothing runs in it, the room is left and fps-yjs closes it as usual.
    await until(
        lambda: f"Closing collaboration room: {doc_id}" in dserver.read_log(),
        timeout=30,
        what="the room closed after the run",
    )
    # The next visitor gets it all from the document fps-yjs loads anew.
    async with room(dserver, doc_id) as doc:
        nb = await opened(doc, len(cells))
        await until(lambda: nb.outputs("long") == [stream(expected)], what="outputs reopened")
        assert nb.json("long")["execution_count"] == 1 and nb.state("long") is None
    assert not dserver.server_tracebacks(), dserver.server_tracebacks()
    assert "BrokenResourceError" not in dserver.read_log()


async def test_a_cell_deleted_while_it_runs_is_logged_once(
    dserver: JupyverseServer, dkernel: str
) -> None:
    cells = {"doomed": PRINTER.format(n=4), "kept": "print('kept')"}
    path = write_notebook(dserver.root, "deleted.ipynb", cells)
    async with notebook_room(dserver, path, len(cells)) as (doc_id, doc, nb, http):
        await queue(http, dkernel, doc_id, cells)
        await until(lambda: nb.outputs("doomed"), what="the cell running")
        del nb.cells[0]
        await until(lambda: nb.is_done("kept"), what="the next cell ran")
        assert nb.outputs("kept") == [stream("kept\n")]
    log = dserver.read_log()
    assert len(re.findall(r"Cell doomed of \S+ was deleted", log)) == 1, log[-3000:]
    assert not dserver.server_tracebacks(), dserver.read_log()[-6000:]


# --- the jupyter-server-nbmodel protocol --------------------------------------------------


async def post_code(
    http: httpx.AsyncClient, kernel_id: str, code: str, **metadata: Any
) -> httpx.Response:
    body: dict[str, Any] = {"code": code}
    if metadata:
        body["metadata"] = metadata
    return await http.post(f"/api/kernels/{kernel_id}/execute", json=body)


async def poll(http: httpx.AsyncClient, url: str, timeout: float = 30) -> httpx.Response:
    """Poll a request until it is not pending (202) any more."""
    latest: list[httpx.Response] = []

    async def settled() -> bool:
        latest.append(await http.get(url))
        return latest[-1].status_code != 202

    end = time.monotonic() + timeout
    while not await settled():
        assert time.monotonic() < end, f"{url} still pending after {timeout} s"
        await anyio.sleep(0.1)
    return latest[-1]


async def queued(
    http: httpx.AsyncClient, kernel_id: str, code: str, **metadata: Any
) -> tuple[httpx.Response, str]:
    """`code` posted as a jupyter-server-nbmodel request, accepted (202): the response, and
    the URL of the request's result."""
    response = await post_code(http, kernel_id, code, **metadata)
    assert response.status_code == 202, response.text
    return response, response.headers["Location"]


async def test_nbmodel_request_result_is_handed_out_once(
    dserver: JupyverseServer, dkernel: str
) -> None:
    async with http_client(dserver) as http:
        response, url = await queued(http, dkernel, "print('hello')\n6 * 7")
        assert re.fullmatch(rf"/api/kernels/{dkernel}/requests/[0-9a-f-]{{36}}", url)
        assert response.headers["Access-Control-Expose-Headers"] == "Location"
        body = response.json()
        assert body["request_url"] == url and url.endswith(body["request_id"])
        assert body["request_status"] == "queued" and body["pending"] is True
        assert json.loads(body["outputs"]) == []
        listed = (await http.get(f"/api/kernels/{dkernel}/execute")).json()
        assert listed["kernel_id"] == dkernel
        assert [r["request_id"] for r in listed["requests"]] == [body["request_id"]]

        done = await poll(http, url)
        assert done.status_code == 200, done.text
        result = done.json()
        assert result["status"] == "ok" and result["execution_count"] == 1
        assert json.loads(result["outputs"]) == [
            stream("hello\n"),
            {
                "output_type": "execute_result",
                "data": {"text/plain": "42"},
                "metadata": {},
                "execution_count": 1,
            },
        ]
        again = await http.get(url)
        assert again.status_code == 404 and "handed out" in again.json()["message"]
        listed = (await http.get(f"/api/kernels/{dkernel}/execute")).json()
        assert listed["requests"] == []
        missing = await post_code(http, "no-such-kernel", "1")
        assert missing.status_code == 404 and "no-such-kernel" in missing.json()["message"]
        bad = await http.post(f"/api/kernels/{dkernel}/execute", json={"code": 1})
        assert bad.status_code == 422


async def test_nbmodel_input_in_a_kernels_first_request(
    dserver: JupyverseServer, dkernel: str
) -> None:
    async with http_client(dserver) as http:
        _response, url = await queued(http, dkernel, "answer = input('Age:')\nanswer")
        waiting = await poll(http, url)
        assert waiting.status_code == 300, waiting.text
        assert waiting.headers["Location"] == f"/api/kernels/{dkernel}/input"
        body = waiting.json()
        assert body["input_request"] == {"prompt": "Age:", "password": False}
        assert body["parent_header"]["msg_type"] == "input_request"
        # Polled again while it waits: the same answer, nothing handed out.
        assert (await http.get(url)).status_code == 300
        reply = await http.post(f"/api/kernels/{dkernel}/input", json={"input": "42"})
        assert reply.status_code == 201, reply.text
        done = await poll(http, url)
        assert done.status_code == 200, done.text
        outputs = json.loads(done.json()["outputs"])
        assert outputs[-1]["data"] == {"text/plain": "'42'"}
        nothing = await http.post(f"/api/kernels/{dkernel}/input", json={"input": "x"})
        assert nothing.status_code == 409 and "not waiting" in nothing.json()["message"]


async def test_nbmodel_stop_on_error_and_streaming_into_the_cell(
    dserver: JupyverseServer, dkernel: str
) -> None:
    cells = {"fails": "1 / 0", "skipped": "print('never')"}
    path = write_notebook(dserver.root, "nbmodel.ipynb", cells)
    async with notebook_room(dserver, path, len(cells)) as (doc_id, doc, nb, http):
        urls = []
        for cell_id, code in cells.items():
            _response, url = await queued(
                http,
                dkernel,
                code,
                cell_id=cell_id,
                document_id=doc_id,
                document_path=path,
                record_timing=False,
            )
            urls.append(url)
        failed = await poll(http, urls[0])
        assert failed.status_code == 200 and failed.json()["status"] == "error"
        assert json.loads(failed.json()["outputs"])[0]["ename"] == "ZeroDivisionError"
        cancelled = await poll(http, urls[1])
        assert cancelled.status_code == 500, cancelled.text
        assert "earlier" in cancelled.json()["message"]
        # The outputs went into the shared cell as well, with its count and no [*] left.
        await until(lambda: nb.is_done("fails") and nb.is_done("skipped"), what="cells done")
        assert nb.outputs("fails")[0]["ename"] == "ZeroDivisionError"
        assert nb.json("fails")["execution_count"] == 1
        assert nb.state("fails") is None and nb.state("skipped") is None


def indexed_path(server: JupyverseServer, file_id: str) -> str | None:
    """Where fps-contents' file-id index says the file `file_id` is now."""
    with closing(sqlite3.connect(f"file:{server.root / '.fileid.db'}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT path FROM fileids WHERE id = ?", (file_id,)).fetchone()
    return None if row is None else str(row[0])


def index_caught_up(server: JupyverseServer, path: str) -> bool:
    """Whether fps-contents' file-id index has seen the file's last change (its mtime)."""
    with closing(sqlite3.connect(f"file:{server.root / '.fileid.db'}?mode=ro", uri=True)) as db:
        row = db.execute("SELECT mtime FROM fileids WHERE path = ?", (path,)).fetchone()
    return row is not None and row[0] == (server.root / path).stat().st_mtime


async def index_settled(server: JupyverseServer) -> None:
    """Return once fps-contents' file-id index has handled every file event until now: a
    marker file renamed now is followed (events come in order) and the index is alive."""
    marker = write_notebook(server.root, f"marker-{time.monotonic_ns()}.ipynb", {"m": ""})
    file_id = shared(server, marker).split(":", 2)[2]
    (server.root / marker).rename(server.root / f"moved-{marker}")
    await until(lambda: indexed_path(server, file_id) == f"moved-{marker}", what="the index")


@pytest.fixture
def rserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyverseServer]:
    """A server of its own: once fps-contents' file-id watcher has stopped (see below), it
    follows no rename for the rest of the server's life."""
    srv = durable_server(tmp_path_factory.mktemp("jupyverse-rename"))
    # There before the server: indexed at its start, so that no event of its creation comes
    # in one batch with the changes a test makes to it.
    write_notebook(srv.root, "old.ipynb", {"a": "1"})
    yield from serving(srv)


async def test_a_notebook_renamed_while_a_cell_runs_is_saved_under_its_new_name(
    rserver: JupyverseServer, tmp_path: Path
) -> None:
    # fps-contents 0.6.4 tells a rename from a deletion by the modification time its index
    # holds for the old path: a rename within moments of a save (before its watcher recorded
    # the save) is taken for a deletion, the file id resolves to nothing, and fps-yjs saves no
    # more (README, "Renaming a notebook while fps-yjs saves it"). The cell therefore waits
    # between its first line and the rest, and the rename happens in that quiet gap, once the
    # index has seen the last save; what is tested is this plugin's part: outputs written after
    # the rename reach the file under its new name.
    go = tmp_path / "go"
    code = (
        "import os, time\nprint('line 0', flush=True)\n"
        f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.1)\n"
        "for i in range(1, 8):\n    print(f'line {i}', flush=True)\n    time.sleep(0.5)"
    )
    path = write_notebook(rserver.root, "before.ipynb", {"long": code})
    doc_id = shared(rserver, path)
    file_id = doc_id.split(":", 2)[2]
    async with room(rserver, doc_id) as doc, http_client(rserver) as http:
        nb = await opened(doc, 1)
        response = await http.post("/api/kernels", json={"name": "python3"})
        assert response.status_code == 201, response.text
        assert (await execute(http, response.json()["id"], doc_id, "long")).status_code == 202
        await until(lambda: nb.outputs("long"), what="the cell's first line")
        await until(
            lambda: saved_cells(rserver, "before.ipynb").get("long", {}).get("outputs"),
            what="the first line saved",
        )
        await until(lambda: index_caught_up(rserver, "before.ipynb"), what="the index")
        # The save's last events too (a write may come in two batches of events).
        await index_settled(rserver)
        response = await http.patch("/api/contents/before.ipynb", json={"path": "after.ipynb"})
        assert response.status_code == 200, response.text
        await until(lambda: indexed_path(rserver, file_id) == "after.ipynb", what="the rename")
        go.touch()
    expected = "".join(f"line {i}\n" for i in range(8))

    def saved_complete() -> bool:
        if not (rserver.root / "after.ipynb").exists():
            return False
        saved = saved_cells(rserver, "after.ipynb")
        return bool(saved) and saved["long"]["execution_count"] == 1

    await until(saved_complete, timeout=60, what="the outputs saved under the new name")
    assert saved_cells(rserver, "after.ipynb")["long"]["outputs"] == [stream(expected)]
    assert_valid(rserver, "after.ipynb")
    assert not (rserver.root / "before.ipynb").exists()
    assert not rserver.server_tracebacks(), rserver.read_log()[-6000:]


async def test_nbmodel_input_over_curve_encrypted_sockets(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    srv = JupyverseServer(
        tmp_path_factory.mktemp("durable-curve"),
        kernels={"require_yjs": True, "transport_encryption": "required"},
        yjs=True,
    )
    srv.start()
    try:
        async with http_client(srv) as http:
            response = await http.post("/api/kernels", json={"name": "python3"})
            assert response.status_code == 201, response.text
            kernel_id = response.json()["id"]
            response = await post_code(http, kernel_id, "input('Curve? ')")
            url = response.headers["Location"]
            waiting = await poll(http, url)
            assert waiting.status_code == 300, waiting.text
            assert waiting.json()["input_request"]["prompt"] == "Curve? "
            reply = await http.post(f"/api/kernels/{kernel_id}/input", json={"input": "yes"})
            assert reply.status_code == 201
            done = await poll(http, url)
            assert json.loads(done.json()["outputs"])[-1]["data"] == {"text/plain": "'yes'"}
    finally:
        srv.stop()
    assert not srv.server_tracebacks(), srv.read_log()[-6000:]


def ran(nb: Notebook, count: int) -> bool:
    return bool(nb.is_done("c")) and nb.json("c")["execution_count"] == count


async def test_a_stopped_file_index_is_told_once(rserver: JupyverseServer) -> None:
    # fps-contents 0.6.4's file-id task ends on a file changed, then renamed, in one batch of
    # events (README, "Renaming a notebook while fps-yjs saves it"); the plugin looks at it
    # each time it joins a room for a server-side cell.
    await index_settled(rserver)  # its watcher runs: it starts after the server answers
    doomed = rserver.root / "old.ipynb"
    doomed.write_text(doomed.read_text() + " ")
    doomed.rename(rserver.root / "moved.ipynb")
    warning = "file-id index stopped following file changes"
    name = write_notebook(rserver.root, "cells.ipynb", {"c": "print('ran')"})
    async with notebook_room(rserver, name, 1) as (doc_id, doc, nb, http):
        response = await http.post("/api/kernels", json={"name": "python3"})
        assert response.status_code == 201, response.text
        kernel_id = response.json()["id"]
        deadline = time.monotonic() + 60
        runs = 0
        # Until fps-contents has handled the rename's events, the task still runs.
        while warning not in rserver.read_log() or runs < 2:
            assert time.monotonic() < deadline, "no warning within 60 s"
            assert (await execute(http, kernel_id, doc_id, "c")).status_code == 202
            runs += 1
            await until(partial(ran, nb, runs), what=f"run {runs}")
    assert rserver.read_log().count(warning) == 1
