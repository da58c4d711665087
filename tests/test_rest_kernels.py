"""REST: kernelspecs, kernels and status, against a real server and real kernels."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import httpx

from .conftest import JupyverseServer, kernel_pid, kernel_processes

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def wait_until_idle(client: httpx.Client, kernel_id: str, timeout: float = 60) -> None:
    """POST answers at launch: the process may still be between fork and exec."""
    deadline = time.monotonic() + timeout
    while client.get(f"/api/kernels/{kernel_id}").json()["execution_state"] != "idle":
        assert time.monotonic() < deadline, f"kernel {kernel_id} not idle within {timeout} s"
        time.sleep(0.1)


def test_kernelspecs_listed_with_resources(client: httpx.Client, server: JupyverseServer) -> None:
    response = client.get("/api/kernelspecs")
    assert response.status_code == 200
    body = response.json()
    assert body["default"] == "python3"
    specs = body["kernelspecs"]
    assert "python3" in specs and "exits" in specs
    # broken ones are skipped, with a log line
    assert "broken" not in specs and "notjson" not in specs
    assert "Skipping kernelspec broken" in server.read_log()
    python3 = specs["python3"]
    assert python3["name"] == "python3"
    assert python3["spec"]["language"] == "python"
    assert python3["spec"]["argv"][-1] == "{connection_file}"
    assert python3["resources"]["logo-64x64"] == "/kernelspecs/python3/logo-64x64.png"


def test_one_kernelspec(client: httpx.Client) -> None:
    response = client.get("/api/kernelspecs/python3")
    assert response.status_code == 200
    assert response.json()["spec"]["display_name"]
    missing = client.get("/api/kernelspecs/nope")
    assert missing.status_code == 404
    assert missing.json()["message"] == "Kernel spec nope not found"


def test_kernelspec_resource_files(client: httpx.Client, server: JupyverseServer) -> None:
    logo = client.get("/kernelspecs/python3/logo-64x64.png")
    assert logo.status_code == 200
    assert logo.headers["content-type"] == "image/png"
    assert logo.content.startswith(b"\x89PNG")
    spec_dir = server.share / "kernels" / "exits"
    (server.home / "secret.txt").write_text("secret")
    link = spec_dir / "logo-link.png"
    if not link.exists():
        os.symlink(server.home / "secret.txt", link)
    for path in [
        "/kernelspecs/python3/nothere.png",
        "/kernelspecs/nope/logo-64x64.png",
        "/kernelspecs/python3/..",
        "/kernelspecs/python3/%2e%2e",
        "/kernelspecs/exits/..%2F..%2Fsecret.txt",
        "/kernelspecs/exits/%2Fetc%2Fpasswd",
        "/kernelspecs/exits/logo-link.png",
        "/kernelspecs/exits/kernel.json%00",
    ]:
        response = client.get(path)
        assert response.status_code == 404, (path, response.status_code, response.text[:200])
        assert b"secret" not in response.content and b"root:" not in response.content


def test_start_kernel_answers_201_with_location(client: httpx.Client) -> None:
    response = client.post("/api/kernels", json={"name": "python3"})
    assert response.status_code == 201, response.text
    model = response.json()
    try:
        assert response.headers["location"] == f"/api/kernels/{model['id']}"
        assert set(model) >= {"id", "name", "last_activity", "execution_state", "connections"}
        assert model["name"] == "python3"
        assert ISO_Z.match(model["last_activity"])
        # answered at launch, as jupyter_server does; then tracked from iopub without any
        # client: once the kernel answered, it is idle
        assert model["execution_state"] == "starting"
        deadline = time.monotonic() + 60
        while model["execution_state"] == "starting" and time.monotonic() < deadline:
            time.sleep(0.05)
            model = client.get(f"/api/kernels/{model['id']}").json()
        assert model["execution_state"] == "idle"
        assert model["connections"] == 0
        listed = client.get("/api/kernels").json()
        assert model["id"] in [k["id"] for k in listed]
        assert client.get(f"/api/kernels/{model['id']}").json()["id"] == model["id"]
    finally:
        assert client.delete(f"/api/kernels/{model['id']}").status_code == 204
    assert client.get(f"/api/kernels/{model['id']}").status_code == 404


def test_start_without_body_uses_default(client: httpx.Client) -> None:
    response = client.post("/api/kernels")
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "python3"
    client.delete(f"/api/kernels/{response.json()['id']}")


def test_client_supplied_kernel_id(client: httpx.Client) -> None:
    kernel_id = str(uuid.uuid4())
    response = client.post("/api/kernels", json={"kernel_id": kernel_id})
    assert response.status_code == 201
    assert response.json()["id"] == kernel_id
    again = client.post("/api/kernels", json={"kernel_id": kernel_id})
    assert again.status_code == 409 and kernel_id in again.json()["message"]
    client.delete(f"/api/kernels/{kernel_id}")
    bad = client.post("/api/kernels", json={"kernel_id": "not-a-uuid"})
    assert bad.status_code == 422 and "kernel_id" in bad.json()["message"]


def test_start_kernel_errors(client: httpx.Client) -> None:
    unknown = client.post("/api/kernels", json={"name": "nope"})
    assert unknown.status_code == 404
    assert unknown.json()["message"] == "Kernel spec nope not found"
    invalid = client.post(
        "/api/kernels", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert invalid.status_code == 400
    assert invalid.json()["message"] == "Invalid JSON in body of request"
    not_object = client.post("/api/kernels", json=[1, 2])
    assert not_object.status_code == 400 and "object" in not_object.json()["message"]
    ill_typed = client.post("/api/kernels", json={"name": 3})
    assert ill_typed.status_code == 422 and "name" in ill_typed.json()["message"]


def test_unknown_kernel_is_404_everywhere(client: httpx.Client) -> None:
    kernel_id = str(uuid.uuid4())
    for method, path in [
        ("GET", f"/api/kernels/{kernel_id}"),
        ("DELETE", f"/api/kernels/{kernel_id}"),
        ("POST", f"/api/kernels/{kernel_id}/interrupt"),
        ("POST", f"/api/kernels/{kernel_id}/restart"),
        ("GET", "/api/kernels/not-even-an-id"),
    ]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.headers["content-type"] == "application/json"
        assert "Kernel does not exist" in response.json()["message"]


def test_failed_starts_answer_fast_and_leave_nothing(
    client: httpx.Client, server: JupyverseServer
) -> None:
    before = set(os.listdir(server.runtime_dir))
    started = time.monotonic()
    response = client.post("/api/kernels", json={"name": "nosuchbinary"})
    assert response.status_code == 500, response.text
    assert "Could not launch" in response.json()["message"]
    assert time.monotonic() - started < 4
    # A kernel that runs but exits is `dead` with the reason, and stays listed until deleted
    # (POST answers at launch, as jupyter_server does). One that never answers: see
    # test_instant_start.py.
    response = client.post("/api/kernels", json={"name": "exits"})
    assert response.status_code == 201, response.text
    kernel_id = response.json()["id"]
    deadline = time.monotonic() + 60
    while (model := client.get(f"/api/kernels/{kernel_id}").json())[
        "execution_state"
    ] != "dead" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model["execution_state"] == "dead", model
    assert "exited with code 3" in model["reason"] and "boom" in model["reason"]
    # nothing of it survives but its listing
    assert set(os.listdir(server.runtime_dir)) == before
    assert client.delete(f"/api/kernels/{kernel_id}").status_code == 204
    assert all(k["name"] != "exits" for k in client.get("/api/kernels").json())


def _cmdline_has(proc: Path, text: str) -> bool:
    try:
        return text.encode() in (proc / "cmdline").read_bytes()
    except OSError:
        return False


def test_interrupt_and_restart(client: httpx.Client, kernel: str, server: JupyverseServer) -> None:
    assert client.post(f"/api/kernels/{kernel}/interrupt").status_code == 204
    pids = kernel_processes(server.runtime_dir)
    response = client.post(f"/api/kernels/{kernel}/restart")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == kernel
    assert response.json()["execution_state"] == "idle"
    after = kernel_processes(server.runtime_dir)
    assert len(after) == len(pids)
    assert set(after) != set(pids)


def test_status(client: httpx.Client, kernel: str) -> None:
    response = client.get("/api/status")
    assert response.status_code == 200
    status = response.json()
    assert set(status) == {"connections", "kernels", "last_activity", "started"}
    assert status["kernels"] >= 1
    assert ISO_Z.match(status["last_activity"]) and ISO_Z.match(status["started"])


def test_kernel_cwd_and_environment(client: httpx.Client, server: JupyverseServer) -> None:
    (server.root / "sub").mkdir(exist_ok=True)
    response = client.post(
        "/api/sessions",
        json={"path": "sub/deeper/x.ipynb", "type": "notebook", "name": "x.ipynb"},
    )
    assert response.status_code == 201, response.text
    session = response.json()
    kernel_id = session["kernel"]["id"]
    try:
        wait_until_idle(client, kernel_id)
        pid = kernel_pid(server.runtime_dir, kernel_id)
        assert os.readlink(f"/proc/{pid}/cwd") == str((server.root / "sub").resolve())
        env = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
            if "=" in item
        )
        assert env["JPY_PARENT_PID"] == str(server.process.pid)  # type: ignore[union-attr]
        assert env["JPY_SESSION_NAME"] == str((server.root / "sub/deeper/x.ipynb").resolve())
        # its own process group
        assert os.getpgid(pid) == pid
        connection_file = server.runtime_dir / f"kernel-{kernel_id}.json"
        assert oct(connection_file.stat().st_mode & 0o777) == "0o600"
    finally:
        client.delete(f"/api/sessions/{session['id']}")
    escaping = client.post("/api/kernels", json={"path": "../../../etc/x.ipynb"})
    assert escaping.status_code == 201
    try:
        wait_until_idle(client, escaping.json()["id"])
        pid = kernel_pid(server.runtime_dir, escaping.json()["id"])
        assert os.readlink(f"/proc/{pid}/cwd") == str(server.root.resolve())
    finally:
        client.delete(f"/api/kernels/{escaping.json()['id']}")
