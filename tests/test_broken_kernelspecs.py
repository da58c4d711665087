"""A kernelspec whose kernel.json is broken: the others are served, the broken one answers
what is wrong and where, and its warning is logged once per change of the file."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import httpx

from .conftest import JupyverseServer


def _skips(server: JupyverseServer, name: str) -> int:
    return sum(
        1 for line in server.read_log().splitlines() if f"Skipping kernelspec {name}:" in line
    )


def _spec_file(server: JupyverseServer, name: str, text: str) -> Path:
    spec_dir = server.share / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec_file = spec_dir / "kernel.json"
    spec_file.write_text(text)
    return spec_file


def test_broken_kernelspec_says_what_and_where(
    client: httpx.Client, server: JupyverseServer
) -> None:
    name = f"broken-{uuid.uuid4().hex[:8]}"
    spec_file = _spec_file(server, name, '{"argv": ["python", "-m", "ipykernel_launcher",')
    listed = client.get("/api/kernelspecs").json()["kernelspecs"]
    assert "python3" in listed and name not in listed
    answers = [
        client.get(f"/api/kernelspecs/{name}"),
        client.post("/api/kernels", json={"name": name}),
        client.post(
            "/api/sessions",
            json={"path": "b.ipynb", "type": "notebook", "kernel": {"name": name}},
        ),
    ]
    for response in answers:
        # a misconfigured server, not a bad request nor an unknown name
        assert response.status_code == 500, response.text
        message = response.json()["message"]
        assert f"Kernel spec {name} is broken" in message
        assert str(spec_file) in message and "not valid JSON" in message
    assert name not in {k["name"] for k in client.get("/api/kernels").json()}
    # an unknown name is still a 404
    assert client.get(f"/api/kernelspecs/{name}-nope").status_code == 404

    # one warning for the file as it is, however many requests
    for _ in range(10):
        client.get("/api/kernelspecs")
        client.get(f"/api/kernelspecs/{name}")
    assert _skips(server, name) == 1
    assert server.read_log().count(str(spec_file)) == 1  # that warning, and nothing else

    # changed, still broken (a field missing): one more warning, saying the new problem
    _spec_file(server, name, json.dumps({"display_name": "No argv"}))
    response = client.get(f"/api/kernelspecs/{name}")
    assert response.status_code == 500
    assert "'argv' must be a non-empty list of strings" in response.json()["message"]
    for _ in range(5):
        client.get("/api/kernelspecs")
    assert _skips(server, name) == 2

    # fixed: listed and served
    _spec_file(
        server,
        name,
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Fixed",
                "language": "python",
            }
        ),
    )
    assert name in client.get("/api/kernelspecs").json()["kernelspecs"]
    assert client.get(f"/api/kernelspecs/{name}").json()["spec"]["display_name"] == "Fixed"
    assert _skips(server, name) == 2
    assert server.server_tracebacks() == []
