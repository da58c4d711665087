"""The kernel WebSocket: v1 and legacy protocols, routing, isolation and bad input."""

from __future__ import annotations

import json
import struct
import uuid

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .conftest import JupyverseServer
from .kernel_client import V1, KernelClient, connected, make_msg

pytestmark = pytest.mark.anyio

ECHO_TARGET = """
def _echo_target(comm, open_msg):
    @comm.on_msg
    def _echo(msg):
        comm.send(msg["content"]["data"], buffers=msg["buffers"])
get_ipython().kernel.comm_manager.register_target("echo", _echo_target)
"""


@pytest.mark.parametrize("protocol", ["v1", "legacy"])
async def test_execute_round_trip(server: JupyverseServer, kernel: str, protocol: str) -> None:
    async with connected(server.ws_url, kernel, protocol) as client:
        assert client.ws.subprotocol == (V1 if protocol == "v1" else None)
        msg_id = await client.execute("print(6*7)")
        msgs = await client.until_idle(msg_id)
        types = [(m.channel, m.msg_type) for m in msgs if m.parent_id == msg_id]
        assert ("iopub", "execute_input") in types
        assert ("iopub", "stream") in types
        # (the kernel's own start-up output, if any, has no parent)
        stream = next(m for m in msgs if m.msg_type == "stream" and m.parent_id == msg_id)
        assert stream.content == {"name": "stdout", "text": "42\n"}
        if ("shell", "execute_reply") not in types:
            msgs += await client.until(lambda m: m.msg_type == "execute_reply")
        reply = next(m for m in msgs if m.msg_type == "execute_reply")
        assert reply.channel == "shell" and reply.content["status"] == "ok"


@pytest.mark.parametrize("protocol", ["v1", "legacy"])
async def test_binary_buffers_both_ways(
    server: JupyverseServer, kernel: str, protocol: str
) -> None:
    async with connected(server.ws_url, kernel, protocol) as client:
        await client.run(ECHO_TARGET)
        comm_id = uuid.uuid4().hex
        await client.request("comm_open", {"comm_id": comm_id, "target_name": "echo", "data": {}})
        payload = bytes(range(256)) * 1000
        msg = make_msg("comm_msg", {"comm_id": comm_id, "data": {"x": 1}}, client.session_id)
        await client.send(msg, [payload, b"second"])
        got = await client.until(lambda m: m.msg_type == "comm_msg")
        echo = got[-1]
        assert echo.channel == "iopub"
        assert echo.content["data"] == {"x": 1}
        assert [bytes(b) for b in echo.buffers] == [payload, b"second"]


async def test_legacy_frames_carry_ids_and_default_to_shell(
    server: JupyverseServer, kernel: str
) -> None:
    async with connected(server.ws_url, kernel, "legacy") as client:
        msg = make_msg("kernel_info_request", {}, client.session_id)
        del msg["channel"]  # no channel means shell
        await client.ws.send(json.dumps(msg))
        raw = await _recv_until(client, lambda d: d["msg_type"] == "kernel_info_reply")
        assert raw["channel"] == "shell"
        assert raw["msg_id"] == raw["header"]["msg_id"]
        assert raw["parent_header"]["msg_id"] == msg["header"]["msg_id"]
        assert raw["buffers"] == []


async def _recv_until(client: KernelClient, predicate: object) -> dict:
    with anyio.fail_after(20):
        while True:
            data = json.loads(await client.ws.recv())
            if predicate(data):  # type: ignore[operator]
                return data


async def test_connections_are_counted(server: JupyverseServer, kernel: str) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        first = await KernelClient.connect(server.ws_url, kernel)
        second = await KernelClient.connect(server.ws_url, kernel, "legacy")
        assert (await http.get(f"/api/kernels/{kernel}")).json()["connections"] == 2
        await first.close()
        await second.close()
        with anyio.fail_after(30):
            while (await http.get(f"/api/kernels/{kernel}")).json()["connections"] != 0:
                await anyio.sleep(0.05)
    assert server.server_tracebacks() == []


async def test_unknown_kernel_is_closed_with_a_reason(server: JupyverseServer) -> None:
    missing = str(uuid.uuid4())
    client = await KernelClient.connect(server.ws_url, missing)
    with pytest.raises(ConnectionClosed) as closed:
        await client.receive(30)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4004
    assert missing in closed.value.rcvd.reason


async def test_replies_go_to_the_requester_iopub_to_all(
    server: JupyverseServer, kernel: str
) -> None:
    async with (
        connected(server.ws_url, kernel) as alice,
        connected(server.ws_url, kernel, "legacy") as bob,
    ):
        msg_id = await alice.execute("print('hello')")
        alice_msgs = await alice.until(lambda m: m.msg_type == "execute_reply")
        alice_msgs += (
            await alice.until_idle(msg_id)
            if not any(
                m.msg_type == "status"
                and m.parent_id == msg_id
                and m.content["execution_state"] == "idle"
                for m in alice_msgs
            )
            else []
        )
        bob_msgs = await bob.until_idle(msg_id)
        assert any(m.msg_type == "stream" for m in bob_msgs)
        # Bob's own request proves his socket is current; Alice's reply never reaches him.
        info_id = await bob.request("kernel_info_request", {})
        bob_msgs += await bob.until(lambda m: m.msg_type == "kernel_info_reply")
        assert bob_msgs[-1].parent_id == info_id
        assert not [m for m in bob_msgs if m.msg_type == "execute_reply"]


async def test_stdin_reaches_only_the_requester(server: JupyverseServer, kernel: str) -> None:
    async with connected(server.ws_url, kernel) as alice, connected(server.ws_url, kernel) as bob:
        msg_id = await alice.execute("print('got', input('name? '))", allow_stdin=True)
        request = (await alice.until(lambda m: m.msg_type == "input_request"))[-1]
        assert request.channel == "stdin" and request.content["prompt"] == "name? "
        reply = make_msg("input_reply", {"value": "ada"}, alice.session_id, "stdin")
        reply["parent_header"] = request.header
        await alice.send(reply)
        msgs = await alice.until_idle(msg_id)
        assert any(m.msg_type == "stream" and "got ada" in m.content["text"] for m in msgs)
        bob_msgs = await bob.until_idle(msg_id)
        assert not [m for m in bob_msgs if m.msg_type == "input_request"]


async def test_bad_frames_are_logged_and_harmless(server: JupyverseServer, kernel: str) -> None:
    v1 = await KernelClient.connect(server.ws_url, kernel)
    legacy = await KernelClient.connect(server.ws_url, kernel, "legacy")
    bystander = await KernelClient.connect(server.ws_url, kernel)
    try:
        lying = struct.pack("<7Q", 6, 56, 61, 9999, 99999, 999999, 9999999) + b"shell{}"
        for frame in [b"", b"garbage", struct.pack("<Q", 2**63), lying, "text on v1"]:
            await v1.ws.send(frame)
        for frame in [
            "{not json",
            "[1,2]",
            '{"header": {}}',
            '{"header": 3}',
            b"\x00\x00\x00\x09xx",
        ]:
            await legacy.ws.send(frame)
        # messages clients may not send
        for channel in ("iopub", "bogus"):
            await v1.send(make_msg("execute_request", {"code": "1/0"}, v1.session_id, channel))
        # everyone still works
        for client in (v1, legacy, bystander):
            _msgs, stdout = await client.run("print('still here')")
            assert stdout == "still here\n"
    finally:
        for client in (v1, legacy, bystander):
            await client.close()
    log = server.read_log()
    assert "ignored a malformed frame" in log
    assert "may not send on channel 'iopub'" in log
    assert "may not send on channel 'bogus'" in log
    assert server.server_tracebacks() == []


async def test_same_session_id_replaces_the_stale_socket(
    server: JupyverseServer, kernel: str
) -> None:
    session_id = uuid.uuid4().hex
    old = await KernelClient.connect(server.ws_url, kernel, session_id=session_id)
    new = await KernelClient.connect(server.ws_url, kernel, session_id=session_id)
    _msgs, close_code = await old.until_closed(30)
    assert close_code == 1000
    _msgs, stdout = await new.run("print(1)")
    assert stdout == "1\n"
    await new.close()


async def test_a_client_that_does_not_read_stalls_nobody(
    server: JupyverseServer, kernel: str
) -> None:
    async with (
        connected(server.ws_url, kernel, max_queue=1),  # never reads
        connected(server.ws_url, kernel) as reader,
    ):
        with anyio.fail_after(60):
            _msgs, stdout = await reader.run("for i in range(20000): print(i)", timeout=60)
        lines = stdout.splitlines()
        assert lines == [str(i) for i in range(20000)]


async def test_interrupt_over_rest_reaches_running_code(
    server: JupyverseServer, kernel: str
) -> None:
    async with connected(server.ws_url, kernel) as client:
        msg_id = await client.execute("import time; print('sleeping', flush=True); time.sleep(60)")
        await client.until(lambda m: m.msg_type == "stream" and m.parent_id == msg_id)
        async with httpx.AsyncClient(base_url=server.url) as http:
            response = await http.post(f"/api/kernels/{kernel}/interrupt")
            assert response.status_code == 204
        msgs = await client.until(lambda m: m.msg_type == "error", timeout=10)
        assert msgs[-1].content["ename"] == "KeyboardInterrupt"


async def test_restart_keeps_the_socket(server: JupyverseServer, kernel: str) -> None:
    async with connected(server.ws_url, kernel) as client:
        await client.run("x = 1")
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            assert (await http.post(f"/api/kernels/{kernel}/restart")).status_code == 200
        _msgs, stdout = await client.run("print('x' in dir())")
        assert stdout == "False\n"


async def test_auth_is_checked_before_the_upgrade(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = JupyverseServer(tmp_path_factory.mktemp("auth"), auth="token")
    srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            assert (await http.get("/api/kernels")).status_code == 403
            assert (
                await http.post("/api/kernels", headers={"Authorization": "token reader"})
            ).status_code == 403
            response = await http.post("/api/kernels", headers=srv.headers)
            assert response.status_code == 201
            kernel_id = response.json()["id"]
            for token in (None, "wrong", "reader"):
                with pytest.raises(InvalidStatus) as refused:
                    await KernelClient.connect(srv.ws_url, kernel_id, token=token)
                assert refused.value.response.status_code == 403
            client = await KernelClient.connect(srv.ws_url, kernel_id, token="secret")
            _msgs, stdout = await client.run("print('authorised')")
            assert stdout == "authorised\n"
            await client.close()
    finally:
        srv.stop()


async def test_deleting_a_kernel_tells_its_clients(server: JupyverseServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        kernel_id = (await http.post("/api/kernels", json={})).json()["id"]
        client = await KernelClient.connect(server.ws_url, kernel_id)
        await client.run("pass")
        assert (await http.delete(f"/api/kernels/{kernel_id}")).status_code == 204
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await client.receive(30)
    assert any(
        m.msg_type == "status" and m.content["execution_state"] == "dead" for m in client.received
    )
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
