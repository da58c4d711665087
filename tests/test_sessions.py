"""REST: sessions, as JupyterLab uses them (create, reuse, switch kernel, share, delete)."""

from __future__ import annotations

import json
import uuid

import anyio
import httpx
import pytest

from .conftest import JupyverseServer


def _create(client: httpx.Client, path: str, **body: object) -> dict:
    response = client.post("/api/sessions", json={"path": path, "type": "notebook", **body})
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/api/sessions/{response.json()['id']}"
    return response.json()


def _kernel_ids(client: httpx.Client) -> set[str]:
    return {k["id"] for k in client.get("/api/kernels").json()}


def test_session_lifecycle(client: httpx.Client) -> None:
    path = f"{uuid.uuid4().hex}.ipynb"
    session = _create(client, path, name=path, kernel={"name": "python3"})
    assert session["path"] == path and session["type"] == "notebook"
    assert session["notebook"] == {"path": path, "name": path}
    kernel_id = session["kernel"]["id"]
    assert session["kernel"]["name"] == "python3"
    assert (
        client.get(f"/api/sessions/{session['id']}").json()
        == client.get(f"/api/sessions/{session['id']}").json()
    )
    assert session["id"] in [s["id"] for s in client.get("/api/sessions").json()]
    # the same path gives back the live session
    again = _create(client, path, kernel={"name": "python3"})
    assert again["id"] == session["id"] and again["kernel"]["id"] == kernel_id
    # rename and change type
    renamed = client.patch(
        f"/api/sessions/{session['id']}", json={"path": "new.ipynb", "name": "new.ipynb"}
    )
    assert renamed.status_code == 200
    assert renamed.json()["path"] == "new.ipynb" and renamed.json()["kernel"]["id"] == kernel_id
    console = client.patch(f"/api/sessions/{session['id']}", json={"type": "console"})
    assert console.json()["type"] == "console" and "notebook" not in console.json()
    assert client.delete(f"/api/sessions/{session['id']}").status_code == 204
    assert client.get(f"/api/sessions/{session['id']}").status_code == 404
    assert kernel_id not in _kernel_ids(client)


def test_switch_kernel_by_name_and_by_id(client: httpx.Client) -> None:
    session = _create(client, f"{uuid.uuid4().hex}.ipynb")
    first = session["kernel"]["id"]
    by_name = client.patch(f"/api/sessions/{session['id']}", json={"kernel": {"name": "python3"}})
    assert by_name.status_code == 200, by_name.text
    second = by_name.json()["kernel"]["id"]
    assert second != first
    assert first not in _kernel_ids(client)  # the old kernel, used by nobody, is shut down
    other = client.post("/api/kernels", json={}).json()["id"]
    by_id = client.patch(
        f"/api/sessions/{session['id']}", json={"kernel": {"id": other, "name": "ignored"}}
    )
    assert by_id.json()["kernel"]["id"] == other
    assert second not in _kernel_ids(client)
    client.delete(f"/api/sessions/{session['id']}")
    assert other not in _kernel_ids(client)


def test_shared_kernel_lives_until_last_session(client: httpx.Client) -> None:
    first = _create(client, f"{uuid.uuid4().hex}.ipynb")
    kernel_id = first["kernel"]["id"]
    second = _create(client, f"{uuid.uuid4().hex}.ipynb", kernel={"id": kernel_id})
    assert second["kernel"]["id"] == kernel_id
    assert client.delete(f"/api/sessions/{first['id']}").status_code == 204
    assert kernel_id in _kernel_ids(client)
    assert client.get(f"/api/sessions/{second['id']}").status_code == 200
    assert client.delete(f"/api/sessions/{second['id']}").status_code == 204
    assert kernel_id not in _kernel_ids(client)


def test_deleting_a_kernel_removes_its_sessions(client: httpx.Client) -> None:
    session = _create(client, f"{uuid.uuid4().hex}.ipynb")
    assert client.delete(f"/api/kernels/{session['kernel']['id']}").status_code == 204
    assert client.get(f"/api/sessions/{session['id']}").status_code == 404
    assert session["id"] not in [s["id"] for s in client.get("/api/sessions").json()]


def test_client_supplied_kernel_id_starts_that_kernel(client: httpx.Client) -> None:
    kernel_id = str(uuid.uuid4())
    session = _create(client, f"{uuid.uuid4().hex}.ipynb", kernel={"id": kernel_id})
    assert session["kernel"]["id"] == kernel_id
    client.delete(f"/api/sessions/{session['id']}")


@pytest.mark.parametrize(
    "body, status, words",
    [
        (None, 400, "No JSON data provided"),
        (b"{nope", 400, "Invalid JSON in body of request"),
        ([], 400, "must be a JSON object"),
        ({}, 400, "Missing field in JSON data: path"),
        ({"path": "a.ipynb"}, 400, "Missing field in JSON data: type"),
        ({"path": 3, "type": "notebook"}, 422, "path"),
        ({"path": "a.ipynb", "type": "notebook", "kernel": "python3"}, 422, "kernel"),
        ({"path": "a.ipynb", "type": "notebook", "kernel": {"id": "nope"}}, 422, "kernel.id"),
        ({"path": "z.ipynb", "type": "notebook", "kernel": {"name": "nope"}}, 404, "nope"),
    ],
)
def test_create_session_errors(client: httpx.Client, body: object, status: int, words: str) -> None:
    if body is None:
        response = client.post("/api/sessions")
    elif isinstance(body, bytes):
        response = client.post("/api/sessions", content=body)
    else:
        response = client.post("/api/sessions", json=body)
    assert response.status_code == status, response.text
    assert words in response.json()["message"]


def test_session_errors(client: httpx.Client) -> None:
    missing = str(uuid.uuid4())
    for method in ("GET", "DELETE"):
        response = client.request(method, f"/api/sessions/{missing}")
        assert response.status_code == 404 and missing in response.json()["message"]
    response = client.patch(f"/api/sessions/{missing}", json={"path": "x"})
    assert response.status_code == 404 and missing in response.json()["message"]
    session = _create(client, f"{uuid.uuid4().hex}.ipynb")
    try:
        unknown = str(uuid.uuid4())
        response = client.patch(f"/api/sessions/{session['id']}", json={"kernel": {"id": unknown}})
        assert response.status_code == 404 and unknown in response.json()["message"]
        response = client.patch(f"/api/sessions/{session['id']}", json={"kernel": {"name": "nope"}})
        assert response.status_code == 404 and "nope" in response.json()["message"]
        assert client.patch(f"/api/sessions/{session['id']}").status_code == 400
        assert client.patch(f"/api/sessions/{session['id']}", json={"name": 1}).status_code == 422
        # the session is unharmed by all of that
        assert (
            client.get(f"/api/sessions/{session['id']}").json()["kernel"]["id"]
            == session["kernel"]["id"]
        )
    finally:
        client.delete(f"/api/sessions/{session['id']}")


@pytest.mark.anyio
async def test_concurrent_session_creations(server: JupyverseServer) -> None:
    """10 notebooks opened at once all get a working kernel, with distinct ports."""
    results: list[dict] = []
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

        async def create(i: int) -> None:
            response = await client.post(
                "/api/sessions", json={"path": f"c{i}-{uuid.uuid4().hex}.ipynb", "type": "notebook"}
            )
            assert response.status_code == 201, response.text
            results.append(response.json())

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(create, i)
        same_path = f"same-{uuid.uuid4().hex}.ipynb"
        same: list[dict] = []

        async def create_same() -> None:
            response = await client.post(
                "/api/sessions", json={"path": same_path, "type": "notebook"}
            )
            same.append(response.json())

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(create_same)
        assert len({s["id"] for s in same}) == 1
        ports = []
        files = list(server.runtime_dir.glob("kernel-*.json"))
        assert len(files) >= 11
        for path in files:
            info = json.loads(path.read_text())
            ports += [info[f"{c}_port"] for c in ("shell", "iopub", "stdin", "control", "hb")]
        assert len(ports) == len(set(ports))
        # POST answers while kernels start: each must come up (idle) on its own
        with anyio.fail_after(120):
            for session in results + same[:1]:
                kernel_url = f"/api/kernels/{session['kernel']['id']}"
                while (await client.get(kernel_url)).json()["execution_state"] != "idle":
                    await anyio.sleep(0.1)
        for session in results + same[:1]:
            await client.delete(f"/api/sessions/{session['id']}")
