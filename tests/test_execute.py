"""Server-side execution: POST /api/kernels/{id}/execute writes into the shared notebook.

A real jupyverse with fps-yjs, a real ipykernel, and a Y-document client connected to the
notebook's collaboration room as JupyterLab connects: every assertion is on what arrives in
that client's document, or in the notebook file fps-yjs saves.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import nbformat
import pytest
from pycrdt import Doc, Map, Text

from .conftest import JupyverseServer, new_kernel, serving
from .ydoc_client import Notebook, document_id, room, until

pytestmark = pytest.mark.anyio


def yjs_server(home: Path, yjs: dict[str, Any] | None = None, **kernels: Any) -> JupyverseServer:
    """A server (not started) with fps-yjs, saving 0.2 s after a change (`yjs`: more of its
    options), and the kernels plugin requiring it (`kernels`: more of its options)."""
    return JupyverseServer(
        home,
        kernels={"require_yjs": True, **kernels},
        yjs=True,
        extra_components={"yjs": {"type": "yjs", "document_save_delay": 0.2, **(yjs or {})}},
    )


@pytest.fixture(scope="module")
def yserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyverseServer]:
    yield from serving(yjs_server(tmp_path_factory.mktemp("jupyverse-yjs"), startup_timeout=30))


@pytest.fixture
def ykernel(yserver: JupyverseServer) -> Iterator[str]:
    with yserver.client() as client:
        yield from new_kernel(client)


def write_notebook(root: Path, name: str, cells: dict[str, str], markdown: str = "") -> str:
    nb_cells: list[dict[str, Any]] = [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": cell_id,
            "metadata": {},
            "outputs": [],
            "source": source,
        }
        for cell_id, source in cells.items()
    ]
    if markdown:
        nb_cells.append({"cell_type": "markdown", "id": markdown, "metadata": {}, "source": "#"})
    notebook = {
        "cells": nb_cells,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (root / name).write_text(json.dumps(notebook))
    return name


async def execute(
    http: httpx.AsyncClient, kernel_id: str, doc_id: str, cell_id: str
) -> httpx.Response:
    return await http.post(
        f"/api/kernels/{kernel_id}/execute", json={"document_id": doc_id, "cell_id": cell_id}
    )


async def run_cell(
    http: httpx.AsyncClient, nb: Notebook, kernel_id: str, doc_id: str, cell_id: str
) -> list[Any]:
    """Execute one cell and wait until it ran (running, then idle); its outputs."""
    statuses = nb.watch_status(cell_id)
    response = await execute(http, kernel_id, doc_id, cell_id)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    await until(lambda: statuses[-2:] == ["running", "idle"], what=f"{cell_id} run")
    return nb.outputs(cell_id)


def stream(text: str, name: str = "stdout") -> dict[str, Any]:
    return {"output_type": "stream", "name": name, "text": text}


def display(data: dict[str, Any]) -> dict[str, Any]:
    return {"output_type": "display_data", "data": data, "metadata": {}}


def http_client(server: JupyverseServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30)


def shared(server: JupyverseServer, path: str) -> str:
    with server.client() as client:
        return document_id(client, path)


async def opened(doc: Doc, count: int) -> Notebook:
    nb = Notebook(doc)
    await until(lambda: len(nb.cells) == count, what="the notebook's cells")
    return nb


@asynccontextmanager
async def notebook_room(
    server: JupyverseServer, path: str, count: int
) -> AsyncIterator[tuple[str, Doc, Notebook, httpx.AsyncClient]]:
    """The notebook at `path` open in its room as a page opens it, once its `count` cells
    came: its document id, Y document and cells, and an HTTP client of the server."""
    doc_id = shared(server, path)
    async with room(server, doc_id) as doc, http_client(server) as http:
        yield doc_id, doc, await opened(doc, count), http


async def queue(
    http: httpx.AsyncClient, kernel_id: str, doc_id: str, cell_ids: Iterable[str]
) -> None:
    """Asks the kernel to run `cell_ids`, in order, each request accepted (202)."""
    for cell_id in cell_ids:
        response = await execute(http, kernel_id, doc_id, cell_id)
        assert response.status_code == 202, response.text


def error_of(output: dict[str, Any]) -> tuple[str, str]:
    assert output["output_type"] == "error", output
    assert isinstance(output["traceback"], list)
    return output["ename"], output["evalue"]


# --- without Yjs, and bad requests ---------------------------------------------------------


def test_without_yjs_execute_answers_409(client: httpx.Client, kernel: str) -> None:
    response = client.post(
        f"/api/kernels/{kernel}/execute", json={"document_id": "json:notebook:x", "cell_id": "c"}
    )
    assert response.status_code == 409
    assert "require_yjs" in response.json()["message"]


async def test_unknown_kernel_document_or_cell_is_404(
    yserver: JupyverseServer, ykernel: str
) -> None:
    path = write_notebook(yserver.root, "bad.ipynb", {"c1": "1"}, markdown="md")
    async with notebook_room(yserver, path, 2) as (doc_id, doc, nb, http):
        response = await execute(http, "no-such-kernel", doc_id, "c1")
        assert response.status_code == 404 and "no-such-kernel" in response.json()["message"]
        response = await execute(http, ykernel, "json:notebook:nope", "c1")
        assert response.status_code == 404 and "json:notebook:nope" in response.json()["message"]
        response = await execute(http, ykernel, doc_id, "no-such-cell")
        assert response.status_code == 404 and "no-such-cell" in response.json()["message"]
        response = await http.post(f"/api/kernels/{ykernel}/execute", json={"cell_id": "c1"})
        assert response.status_code == 400 and "document_id" in response.json()["message"]
        response = await execute(http, ykernel, doc_id, "md")
        assert response.status_code == 202 and response.json()["status"] == "skipped"


# --- outputs -------------------------------------------------------------------------------

OUTPUT_CELLS = {
    "prints": 'print("hello")\nprint("world")',
    "mixed": "import sys\n"
    'print("out1", flush=True)\n'
    'print("err1", file=sys.stderr, flush=True)\n'
    'print("out2", flush=True)',
    "terminal": "import sys\n"
    "for i in range(3):\n"
    '    sys.stdout.write(f"\\r{i}/2")\n'
    "    sys.stdout.flush()\n"
    'print(" done")\n'
    'print("abc\\bd")',
    "results": "from IPython.display import display, update_display, clear_output\n"
    'display({"text/plain": "shown", "text/html": "<b>shown</b>"}, raw=True)\n'
    "6 * 7",
    "empty": "   \n",
    "error": "1 / 0",
    "clear": 'print("gone")\nclear_output()\nprint("kept")',
    "clear_wait": 'print("old", flush=True)\nclear_output(wait=True)\nprint("new")',
    "clear_wait_last": 'print("stays", flush=True)\nclear_output(wait=True)',
    "display_one": 'handle = display("one", display_id="dd")',
    "display_two": 'display("two", display_id="dd")\nupdate_display("three", display_id="dd")',
    "input": 'input("name? ")',
}


async def test_every_kind_of_output_as_jupyterlab_writes_it(
    yserver: JupyverseServer, ykernel: str
) -> None:
    path = write_notebook(yserver.root, "outputs.ipynb", OUTPUT_CELLS)
    async with notebook_room(yserver, path, len(OUTPUT_CELLS)) as (doc_id, doc, nb, http):
        got: dict[str, list[Any]] = {}
        for cell_id in OUTPUT_CELLS:
            if cell_id == "empty":
                response = await execute(http, ykernel, doc_id, cell_id)
                assert response.status_code == 202
                continue
            started = time.monotonic()
            got[cell_id] = await run_cell(http, nb, ykernel, doc_id, cell_id)
            if cell_id == "input":
                assert time.monotonic() - started < 10, "input() must fail fast"
        three = display({"text/plain": "'three'"})
        expected = {
            "prints": [stream("hello\nworld\n")],
            "mixed": [stream("out1\n"), stream("err1\n", "stderr"), stream("out2\n")],
            "terminal": [stream("2/2 done\nabd\n")],
            "results": [
                display({"text/plain": "shown", "text/html": "<b>shown</b>"}),
                {
                    "output_type": "execute_result",
                    "data": {"text/plain": "42"},
                    "metadata": {},
                    "execution_count": 4,
                },
            ],
            "clear": [stream("kept\n")],
            "clear_wait": [stream("new\n")],
            "clear_wait_last": [stream("stays\n")],
            "display_one": [three],
            "display_two": [three],
        }
        for cell_id, outputs in expected.items():
            assert got[cell_id] == outputs or nb.outputs(cell_id) == outputs, (
                cell_id,
                nb.outputs(cell_id),
            )
        assert nb.outputs("display_one") == [three]  # updated by the next cell
        assert [error_of(o)[0] for o in got["error"]] == ["ZeroDivisionError"]
        ename, evalue = error_of(got["input"][0])
        assert ename == "StdinNotImplementedError" and "input" in evalue
        assert nb.outputs("empty") == [] and nb.json("empty")["execution_count"] is None
        counts = [nb.json(c)["execution_count"] for c in OUTPUT_CELLS if c != "empty"]
        assert counts == list(range(1, len(OUTPUT_CELLS)))

        # fps-yjs saves the document: the file holds the same outputs, nbformat 4 only.
        def saved() -> tuple[dict[str, Any], str] | None:
            # read while fps-contents writes it, the file may be empty or cut: not saved yet
            text = (yserver.root / path).read_text()
            try:
                data = json.loads(text)
            except ValueError:
                return None
            cells = {cell["id"]: cell for cell in data["cells"]}
            return (cells, text) if cells["input"]["outputs"] else None

        cells, text = await until(saved, what="the notebook saved")
        nbformat.validate(nbformat.reads(text, as_version=4))
        for cell_id in OUTPUT_CELLS:
            assert cells[cell_id]["outputs"] == nb.outputs(cell_id), cell_id
            assert "execution_status" not in cells[cell_id]
        assert cells["prints"]["outputs"] == [stream("hello\nworld\n")]


# --- order, interrupt, restart, death -----------------------------------------------------


async def test_run_all_runs_in_order_and_stops_after_an_error(
    yserver: JupyverseServer, ykernel: str
) -> None:
    cells = {
        "slow": 'import time\ntime.sleep(5)\norder = ["slow"]',
        "fast": 'order.append("fast")',
        "show": "print(order)",
        "fails": 'raise ValueError("stop here")',
        "skipped": 'print("never")',
    }
    path = write_notebook(yserver.root, "order.ipynb", cells)
    async with notebook_room(yserver, path, len(cells)) as (doc_id, doc, nb, http):
        started = time.monotonic()
        await queue(http, ykernel, doc_id, cells)
        # well under the slow cell's 5 s, even on a loaded machine
        assert time.monotonic() - started < 4, "answers come when queued, not when run"
        # Queued cells show as running, as JupyterLab shows them ([*]).
        await until(lambda: all(nb.status(c) == "running" for c in cells), what="all queued")
        await until(lambda: nb.is_done("skipped"), what="the last cell done")
        assert nb.outputs("show") == [stream("['slow', 'fast']\n")]
        assert error_of(nb.outputs("fails")[0]) == ("ValueError", "stop here")
        # As in JupyterLab (stop_on_error), the kernel aborts what was queued after an error.
        assert nb.outputs("skipped") == [] and nb.json("skipped")["execution_count"] is None
        assert [nb.json(c)["execution_count"] for c in cells] == [1, 2, 3, 4, None]


SLEEPER = 'import time\nprint("sleeping", flush=True)\ntime.sleep(60)'


async def test_interrupt_stops_the_running_cell(yserver: JupyverseServer, ykernel: str) -> None:
    cells = {"sleep": SLEEPER, "after": 'print("after")'}
    path = write_notebook(yserver.root, "interrupt.ipynb", cells)
    async with notebook_room(yserver, path, 2) as (doc_id, doc, nb, http):
        await queue(http, ykernel, doc_id, cells)
        await until(lambda: nb.outputs("sleep"), what="the cell running")
        assert nb.status("sleep") == "running"
        response = await http.post(f"/api/kernels/{ykernel}/interrupt")
        assert response.status_code == 204
        await until(lambda: nb.is_done("sleep") and nb.is_done("after"), timeout=30)
        outputs = nb.outputs("sleep")
        assert outputs[0] == stream("sleeping\n")
        assert error_of(outputs[-1])[0] == "KeyboardInterrupt"
        assert nb.outputs("after") == []  # aborted by the kernel, as in JupyterLab
        assert await run_cell(http, nb, ykernel, doc_id, "after") == [stream("after\n")]


async def test_restart_ends_running_and_queued_cells_and_later_cells_use_the_new_kernel(
    yserver: JupyverseServer, ykernel: str
) -> None:
    cells = {"sleep": SLEEPER, "queued": 'print("queued")', "fresh": 'print("fresh")'}
    path = write_notebook(yserver.root, "restart.ipynb", cells)
    async with notebook_room(yserver, path, 3) as (doc_id, doc, nb, http):
        assert await run_cell(http, nb, ykernel, doc_id, "fresh") == [stream("fresh\n")]
        await queue(http, ykernel, doc_id, ("sleep", "queued"))
        await until(lambda: nb.outputs("sleep"), what="the cell running")
        response = await http.post(f"/api/kernels/{ykernel}/restart")
        assert response.status_code == 200, response.text
        await until(lambda: nb.is_done("sleep") and nb.is_done("queued"), timeout=30)
        running = nb.outputs("sleep")
        assert running[0] == stream("sleeping\n")
        assert error_of(running[1])[0] == "KernelRestarted"
        assert "running" in error_of(running[1])[1]
        ename, evalue = error_of(nb.outputs("queued")[0])
        assert ename == "KernelRestarted" and "not run" in evalue
        # The next cell runs on the new kernel: its first execution.
        assert await run_cell(http, nb, ykernel, doc_id, "fresh") == [stream("fresh\n")]
        assert nb.json("fresh")["execution_count"] == 1


async def test_kernel_death_marks_the_running_cell(yserver: JupyverseServer, ykernel: str) -> None:
    cells = {"die": 'print("bye", flush=True)\nimport os\nos._exit(1)', "next": "print(1)"}
    path = write_notebook(yserver.root, "death.ipynb", cells)
    async with notebook_room(yserver, path, 2) as (doc_id, doc, nb, http):
        outputs = await run_cell(http, nb, ykernel, doc_id, "die")
        assert error_of(outputs[-1])[0] == "DeadKernelError", outputs
        # The kernel was restarted by the server (autorestart): cells run again.
        with yserver.client() as client:
            await until(
                lambda: client.get(f"/api/kernels/{ykernel}").json()["execution_state"] == "idle",
                what="the kernel restarted",
            )
        assert await run_cell(http, nb, ykernel, doc_id, "next") == [stream("1\n")]


# --- widgets -------------------------------------------------------------------------------


async def test_a_widget_made_by_server_side_cells_is_shared(
    yserver: JupyverseServer, ykernel: str
) -> None:
    cells = {
        "create": "from ypywidgets_textual.switch import Switch\nswitch = Switch()\nswitch",
        "toggle": "switch.toggle()",
    }
    path = write_notebook(yserver.root, "widget.ipynb", cells)
    async with notebook_room(yserver, path, 2) as (doc_id, doc, nb, http):
        await run_cell(http, nb, ykernel, doc_id, "create")
        widget = nb.cell("create")["outputs"][0]
        assert isinstance(widget, Doc), nb.outputs("create")
        async with room(yserver, f"ywidget:{widget.guid}") as widget_doc:
            attrs = widget_doc.get("_attrs", type=Map)
            model_name = widget_doc.get("_model_name", type=Text)
            await until(lambda: str(model_name) == "Switch", what="the widget's model")
            assert attrs.get("value") in (None, False)
            await run_cell(http, nb, ykernel, doc_id, "toggle")
            await until(lambda: attrs.get("value") is True, what="the switch toggled")
