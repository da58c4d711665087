"""What a hostile client or page tries: foreign origins, rebound Host names, stolen replies."""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import JupyverseServer, serving
from tests.kernel_client import KernelClient, connected, make_msg

pytestmark = pytest.mark.anyio

EVIL = "http://evil.example"


async def upgrade_status(server: JupyverseServer, kernel_id: str, headers: dict[str, str]) -> int:
    """The HTTP status a WebSocket upgrade request gets (101 when accepted), sent by hand so
    that any Host and Origin can be given."""
    return await upgrade_status_with_query(server, kernel_id, "", headers)


async def upgrade_status_with_query(
    server: JupyverseServer, kernel_id: str, query: str, headers: dict[str, str]
) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    lines = {
        "Host": f"127.0.0.1:{server.port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
        "Sec-WebSocket-Version": "13",
        **headers,
    }
    target = f"/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}&{query}"
    request = f"GET {target} HTTP/1.1\r\n"
    request += "".join(f"{key}: {value}\r\n" for key, value in lines.items()) + "\r\n"
    try:
        writer.write(request.encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
    return int(status_line.split()[1])


async def wait_for_log(server: JupyverseServer, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.read_log():
        assert time.monotonic() < deadline, f"never logged: {text}"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyverseServer]:
    """A server whose operator lets some origins and host names in, both ways: the plugin's
    options and jupyverse's own --allow-origin."""
    srv = JupyverseServer(
        tmp_path_factory.mktemp("open"),
        kernels={
            "allow_origin": ["http://trusted.example"],
            "allow_origin_pat": r"https://[a-z]+\.lab\.example$",
            "local_hostnames": ["localhost", "notebook.internal"],
        },
    )
    srv.config["component"]["allow_origin"] = ["http://jupyverse-cors.example"]
    yield from serving(srv)


async def test_foreign_origin_is_refused(server: JupyverseServer, kernel: str) -> None:
    assert await upgrade_status(server, kernel, {"Origin": EVIL}) == 403
    with server.client() as client:
        for method, url in [
            ("POST", "/api/kernels"),
            ("POST", f"/api/kernels/{kernel}/restart"),
            ("DELETE", f"/api/kernels/{kernel}"),
            ("POST", "/api/sessions"),
        ]:
            response = client.request(method, url, headers={"Origin": EVIL}, json={})
            assert response.status_code == 403, (method, url, response.text)
            assert "Origin 'http://evil.example'" in response.json()["detail"]
        # reading changes nothing, and a foreign page cannot read the answer (no CORS)
        assert client.get("/api/kernels", headers={"Origin": EVIL}).status_code == 200
        assert client.get(f"/api/kernels/{kernel}").status_code == 200  # still there
    log = server.read_log()
    assert f"403 WebSocket /api/kernels/{kernel}/channels" in log
    assert "403 DELETE" in log
    assert server.server_tracebacks() == []


async def test_own_origin_and_no_origin_are_allowed(server: JupyverseServer, kernel: str) -> None:
    assert await upgrade_status(server, kernel, {"Origin": server.url}) == 101
    assert await upgrade_status(server, kernel, {}) == 101
    async with connected(server.ws_url, kernel, origin=server.url) as own:
        _msgs, stdout = await own.run("print('own origin')")
        assert stdout == "own origin\n"
    with server.client() as client:
        response = client.post("/api/kernels", headers={"Origin": server.url}, json={})
        assert response.status_code == 201, response.text
        assert client.delete(f"/api/kernels/{response.json()['id']}").status_code == 204


async def test_foreign_host_is_refused_on_a_loopback_address(
    server: JupyverseServer, kernel: str
) -> None:
    rebound = f"evil.example:{server.port}"
    assert await upgrade_status(server, kernel, {"Host": rebound}) == 403
    with server.client() as client:
        response = client.get("/api/kernels", headers={"Host": rebound})
        assert response.status_code == 403
        assert "Host 'evil.example" in response.json()["detail"]
        for local in (
            f"localhost:{server.port}",
            f"127.0.0.1:{server.port}",
            f"[::1]:{server.port}",
        ):
            assert client.get("/api/kernels", headers={"Host": local}).status_code == 200
    assert "403 GET /api/kernels" in server.read_log()


async def test_options_let_listed_origins_and_hosts_in(open_server: JupyverseServer) -> None:
    with open_server.client() as client:
        response = client.post("/api/kernels", json={})
        assert response.status_code == 201, response.text
        kernel = response.json()["id"]
        try:
            for origin in (
                "http://trusted.example",
                "http://jupyverse-cors.example",
                "https://team.lab.example",
            ):
                assert await upgrade_status(open_server, kernel, {"Origin": origin}) == 101
                interrupt = client.post(
                    f"/api/kernels/{kernel}/interrupt", headers={"Origin": origin}
                )
                assert interrupt.status_code == 204, (origin, interrupt.text)
            for origin in (EVIL, "https://evil.example.lab.example.com"):
                assert await upgrade_status(open_server, kernel, {"Origin": origin}) == 403
            host = {"Host": f"notebook.internal:{open_server.port}"}
            assert await upgrade_status(open_server, kernel, host) == 101
            assert client.get("/api/kernels", headers=host).status_code == 200
            trusted = await KernelClient.connect(
                open_server.ws_url, kernel, origin="http://trusted.example"
            )
            try:
                _msgs, stdout = await trusted.run("print('trusted')", timeout=60)
                assert stdout == "trusted\n"
            finally:
                await trusted.close()
        finally:
            client.delete(f"/api/kernels/{kernel}")
    assert open_server.server_tracebacks() == []


async def test_a_reused_msg_id_does_not_steal_the_reply(
    server: JupyverseServer, kernel: str, tmp_path: Path
) -> None:
    flag = tmp_path / "go"
    async with (
        connected(server.ws_url, kernel) as alice,
        connected(server.ws_url, kernel) as mallory,
    ):
        # Alice's cell waits for the test, so that her request is pending for sure.
        code = (
            "import os, time\n"
            f"while not os.path.exists({str(flag)!r}): time.sleep(0.02)\n"
            "print('alice done')"
        )
        alice_id = await alice.execute(code)
        # Mallory sees the msg_id on iopub (the busy status of Alice's cell) and reuses it.
        await mallory.until(lambda m: m.msg_type == "status" and m.parent_id == alice_id)
        stolen = make_msg("execute_request", {"code": "print('mallory')"}, mallory.session_id)
        stolen["header"]["msg_id"] = alice_id
        await mallory.send(stolen)
        await wait_for_log(server, f"its msg_id {alice_id} is taken")
        flag.write_text("")
        # the reply (shell) and the idle status (iopub) may come in either order
        await alice.until(
            lambda _m: (
                {"execute_reply", "status"}
                <= {
                    m.msg_type
                    for m in alice.received
                    if m.parent_id == alice_id
                    and (m.msg_type != "status" or m.content["execution_state"] == "idle")
                }
            ),
            60,
        )
        replies = [m for m in alice.received if m.msg_type == "execute_reply"]
        assert [m.parent_id for m in replies] == [alice_id]
        assert replies[0].content["status"] == "ok"
        assert "alice done\n" in [m.content.get("text") for m in alice.received]
        # Mallory's next request is answered after anything her stolen one would have got.
        _msgs, stdout = await mallory.run("print('mallory again')", 60)
        assert stdout == "mallory again\n"
        assert not [m for m in mallory.received if m.channel == "shell" and m.parent_id == alice_id]
        assert not [m for m in mallory.received if m.content.get("text") == "mallory\n"]


async def test_replies_never_follow_the_session_field(server: JupyverseServer, kernel: str) -> None:
    async with (
        connected(server.ws_url, kernel) as alice,
        connected(server.ws_url, kernel) as mallory,
    ):
        # A request naming Alice's session in its header is still Mallory's.
        forged = make_msg("kernel_info_request", {}, alice.session_id)
        await mallory.send(forged)
        forged_id = forged["header"]["msg_id"]
        await mallory.until(
            lambda m: m.msg_type == "kernel_info_reply" and m.parent_id == forged_id
        )
        _msgs, _stdout = await alice.run("print('alice')")
        assert not [m for m in alice.received if m.channel == "shell" and m.parent_id == forged_id]


def test_no_origin_check_for_clients_without_one(server: JupyverseServer) -> None:
    # Scripts and non-browser clients send no Origin: they are let through (as the
    # reference server does), their Host is still checked.
    response = httpx.post(f"{server.url}/api/sessions", json={}, timeout=30)
    assert response.status_code == 400  # reached the handler: a body error, not a 403


async def test_a_token_does_not_skip_the_origin_check(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # Jupyter Server lets token-authenticated requests through whatever their origin; a
    # token in a URL can leak (history, logs, Referer), so here it does not.
    srv = JupyverseServer(tmp_path_factory.mktemp("token"), auth="token")
    srv.start()
    try:
        with srv.client() as client:
            response = client.post("/api/kernels", json={})
            assert response.status_code == 201, response.text
            kernel = response.json()["id"]
            refused = client.post("/api/kernels", json={}, headers={"Origin": EVIL})
            assert refused.status_code == 403
            url_token = {"Origin": EVIL}
            status = await upgrade_status_with_query(srv, kernel, "token=secret", url_token)
            assert status == 403
            assert await upgrade_status_with_query(srv, kernel, "token=secret", {}) == 101
            client.delete(f"/api/kernels/{kernel}")
    finally:
        srv.stop()
    assert srv.server_tracebacks() == []
