"""Remote kernels through a real Jupyter Kernel Gateway, next to local kernels."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import JupyverseServer, free_port, new_kernel, running, serving
from .gateway_support import HungGateway, KernelGateway, TcpProxy
from .kernel_client import V1, KernelClient, Msg, make_msg
from .test_websocket import ECHO_TARGET

pytestmark = pytest.mark.anyio

TOKEN = "secret"  # jupyverse's own token (tests.support.token_auth), never the gateway's


class Jupyverse(JupyverseServer):
    """A jupyverse with variables of its own in its environment."""

    def __init__(self, home: Path, extra_env: dict[str, str] | None = None, **kwargs: Any):
        super().__init__(home, **kwargs)
        self.extra_env = extra_env or {}

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, **self.extra_env}


def gateway_server(home: Path, gateway: dict[str, Any], **kwargs: Any) -> Jupyverse:
    kernels = {"providers": ["spec", "gateway"], "gateway": gateway, **kwargs.pop("kernels", {})}
    return Jupyverse(home, kernels=kernels, auth="token", **kwargs)


@pytest.fixture(scope="module")
def kg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelGateway]:
    gateway = KernelGateway(tmp_path_factory.mktemp("kernel-gateway"))
    yield from serving(gateway)


@pytest.fixture(scope="module")
def adopted(kg: KernelGateway) -> str:
    """A kernel started on the gateway before jupyverse."""
    return kg.start_kernel()


@pytest.fixture(scope="module")
def gw(
    kg: KernelGateway, adopted: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Jupyverse]:
    srv = gateway_server(
        tmp_path_factory.mktemp("jupyverse-gateway"),
        kg.config(env={"KERNEL_TEAM": "blue"}, retry_interval=0.2),
        extra_env={"KERNEL_EXTRA": "extra", "NOT_A_KERNEL_VAR": "no"},
        kernels={"require_yjs": True},
        yjs=True,
    )
    yield from serving(srv)


@pytest.fixture
def http(gw: Jupyverse) -> Iterator[httpx.Client]:
    with gw.client() as client:
        yield client


@pytest.fixture
def gw_kernel(http: httpx.Client) -> Iterator[str]:
    yield from new_kernel(http, "gw-python3")


async def connect(srv: JupyverseServer, kernel_id: str, protocol: str = "v1") -> KernelClient:
    # jupyverse's token in the URL, as a browser sends it: the gateway would refuse it.
    return await KernelClient.connect(srv.ws_url, kernel_id, protocol, token=TOKEN)


def wait_for(predicate: Any, timeout: float = 20, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def stderr(msgs: list[Msg]) -> str:
    return "".join(m.content["text"] for m in msgs if m.msg_type == "stream")


# --- kernelspecs --------------------------------------------------------------------------


def test_kernelspecs_local_and_gateway(http: httpx.Client, kg: KernelGateway) -> None:
    specs = http.get("/api/kernelspecs").json()
    assert specs["default"] == "python3"
    local, remote = specs["kernelspecs"]["python3"], specs["kernelspecs"]["gw-python3"]
    assert local["spec"]["display_name"] == "Python 3 (ipykernel)"
    assert remote["spec"]["display_name"] == "Python 3 (ipykernel) (gateway)"
    assert remote["spec"]["metadata"]["fps_kernels"] == {
        "provider": "gateway",
        "gateway_name": "python3",
    }
    assert "fps_kernels" not in local["spec"]["metadata"]
    assert remote["resources"]["logo-64x64"] == "/kernelspecs/gw-python3/logo-64x64.png"
    logo = http.get(remote["resources"]["logo-64x64"])
    assert logo.status_code == 200 and logo.headers["content-type"] == "image/png"
    original = httpx.get(f"{kg.url}/kernelspecs/python3/logo-64x64.png", headers=kg.headers)
    assert logo.content == original.content
    assert http.get("/api/kernelspecs/gw-python3").json()["name"] == "gw-python3"
    assert http.get("/kernelspecs/gw-python3/kernel.json").status_code == 404
    missing = http.post("/api/kernels", json={"name": "gw-nope"})
    assert missing.status_code == 404, missing.text
    assert missing.json()["message"] == "Kernel spec gw-nope not found"


def test_exclusive_mode_keeps_the_gateway_names(
    kg: KernelGateway, tmp_path: Path, adopted: str
) -> None:
    with running(gateway_server(tmp_path, kg.config(mode="exclusive"))) as (srv,):
        with srv.client() as http:
            specs = http.get("/api/kernelspecs").json()
            assert list(specs["kernelspecs"]) == ["python3"]
            spec = specs["kernelspecs"]["python3"]["spec"]
            assert spec["display_name"] == "Python 3 (ipykernel)"
            assert spec["metadata"]["fps_kernels"]["provider"] == "gateway"
            assert specs["default"] == "python3"
            kernel = http.post("/api/kernels", json={}).json()
            assert kernel["name"] == "python3"
            assert kernel["id"] in [k["id"] for k in kg.kernels()]
            assert http.delete(f"/api/kernels/{kernel['id']}").status_code == 204
    # An adopted kernel is left running when jupyverse stops.
    assert adopted in [k["id"] for k in kg.kernels()]


# --- kernels over REST --------------------------------------------------------------------


def test_kernels_already_on_the_gateway_are_adopted(http: httpx.Client, adopted: str) -> None:
    model = http.get(f"/api/kernels/{adopted}").json()
    assert model["name"] == "gw-python3"
    assert model["id"] == adopted


def test_rest_lifecycle_with_the_gateways_ids(http: httpx.Client, kg: KernelGateway) -> None:
    response = http.post("/api/kernels", json={"name": "gw-python3"})
    assert response.status_code == 201, response.text
    kernel_id = response.json()["id"]
    assert response.headers["location"] == f"/api/kernels/{kernel_id}"
    assert kernel_id in [k["id"] for k in kg.kernels()]
    wait_for(
        lambda: http.get(f"/api/kernels/{kernel_id}").json()["execution_state"] == "idle",
        what="idle",
    )
    assert kernel_id in [k["id"] for k in http.get("/api/kernels").json()]
    assert http.post(f"/api/kernels/{kernel_id}/interrupt").status_code == 204
    restarted = http.post(f"/api/kernels/{kernel_id}/restart")
    assert restarted.status_code == 200 and restarted.json()["id"] == kernel_id
    assert restarted.json()["execution_state"] == "idle"  # it answered, as local ones do
    assert http.delete(f"/api/kernels/{kernel_id}").status_code == 204
    assert kernel_id not in [k["id"] for k in kg.kernels()]
    assert http.get(f"/api/kernels/{kernel_id}").status_code == 404
    assert http.get("/api/status").json()["kernels"] >= 1  # the adopted one


def test_server_side_execution_is_for_local_kernels(http: httpx.Client, gw_kernel: str) -> None:
    response = http.post(
        f"/api/kernels/{gw_kernel}/execute",
        json={"document_id": "json:notebook:x", "cell_id": "y"},
    )
    assert response.status_code == 409, response.text
    assert "needs a local kernel" in response.json()["message"]


# --- sessions and the kernel WebSocket ----------------------------------------------------


@pytest.mark.parametrize("protocol", ["v1", "legacy"])
async def test_session_runs_code_on_the_gateway(
    gw: Jupyverse, kg: KernelGateway, protocol: str
) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers=gw.headers, timeout=60) as http:
        response = await http.post(
            "/api/sessions",
            json={
                "path": f"{protocol}.ipynb",
                "type": "notebook",
                "kernel": {"name": "gw-python3"},
            },
        )
        assert response.status_code == 201, response.text
        session = response.json()
        kernel_id = session["kernel"]["id"]
        assert session["kernel"]["name"] == "gw-python3"
        assert kernel_id in [k["id"] for k in kg.kernels()]
        client = await connect(gw, kernel_id, protocol)
        try:
            assert client.ws.subprotocol == (V1 if protocol == "v1" else None)
            code = (
                "import os; print(os.environ['KERNEL_USERNAME'], os.environ.get('KERNEL_TEAM'),"
                " os.environ.get('KERNEL_EXTRA'), os.environ.get('NOT_A_KERNEL_VAR'))"
            )
            msgs, stdout = await client.run(code)
            assert stdout == "tester blue extra None\n"
            assert ("shell", "execute_reply") in [(m.channel, m.msg_type) for m in msgs] or (
                await client.until(lambda m: m.msg_type == "execute_reply")
            )
            model = (await http.get(f"/api/kernels/{kernel_id}")).json()
            assert model["connections"] == 1
            msg_id = await client.execute("import time; time.sleep(1.5)")
            await client.until(lambda m: m.content.get("execution_state") == "busy")
            assert (await http.get(f"/api/kernels/{kernel_id}")).json()["execution_state"] == (
                "busy"
            )
            await client.until_idle(msg_id)
            assert (await http.get(f"/api/kernels/{kernel_id}")).json()["execution_state"] == (
                "idle"
            )
        finally:
            await client.close()
        assert (await http.delete(f"/api/sessions/{session['id']}")).status_code == 204
    assert kernel_id not in [k["id"] for k in kg.kernels()]
    assert gw.server_tracebacks() == []


@pytest.mark.parametrize("protocol", ["v1", "legacy"])
async def test_8_mib_binary_comm_echo(gw: Jupyverse, gw_kernel: str, protocol: str) -> None:
    client = await connect(gw, gw_kernel, protocol)
    try:
        await client.run(ECHO_TARGET)
        comm_id = uuid.uuid4().hex
        await client.request("comm_open", {"comm_id": comm_id, "target_name": "echo", "data": {}})
        payload = uuid.uuid4().bytes * (512 * 1024)  # 8 MiB
        msg = make_msg("comm_msg", {"comm_id": comm_id, "data": {"n": 8}}, client.session_id)
        await client.send(msg, [payload, b"\x00\x01\xff"])
        echo = (await client.until(lambda m: m.msg_type == "comm_msg", timeout=60))[-1]
        assert echo.content["data"] == {"n": 8}
        assert len(echo.buffers) == 2 and bytes(echo.buffers[1]) == b"\x00\x01\xff"
        assert hashlib.sha256(bytes(echo.buffers[0])).digest() == hashlib.sha256(payload).digest()
    finally:
        await client.close()


async def test_delete_closes_the_clients(gw: Jupyverse, gw_kernel: str) -> None:
    client = await connect(gw, gw_kernel)
    await client.run("1")
    async with httpx.AsyncClient(base_url=gw.url, headers=gw.headers, timeout=60) as http:
        assert (await http.delete(f"/api/kernels/{gw_kernel}")).status_code == 204
    msgs, close_code = await client.until_closed(10)
    assert close_code == 1000
    assert any(m.content.get("execution_state") == "dead" for m in msgs)


# --- errors -------------------------------------------------------------------------------


def test_bad_token_and_no_gateway_are_clear_errors(kg: KernelGateway, tmp_path: Path) -> None:
    bad = gateway_server(tmp_path / "bad", kg.config(auth_token="wrong"))
    gone = gateway_server(tmp_path / "gone", {"url": f"http://127.0.0.1:{free_port()}"})
    with running(bad, gone):
        with bad.client() as http:
            specs = http.get("/api/kernelspecs").json()["kernelspecs"]
            assert "python3" in specs and "gw-python3" not in specs  # local ones still work
            for path, body in [
                ("/api/kernels", {"name": "gw-python3"}),
                (
                    "/api/sessions",
                    {"path": "a.ipynb", "type": "notebook", "kernel": {"name": "gw-python3"}},
                ),
            ]:
                response = http.post(path, json=body)
                assert response.status_code == 502, response.text
                message = response.json()["message"]
                assert "401 Unauthorized" in message and "auth_token" in message, message
                assert kg.url in message
            assert bad.server_tracebacks() == []
        with gone.client() as http:
            response = http.post("/api/kernels", json={"name": "gw-python3"})
            assert response.status_code == 503, response.text
            assert "cannot be reached" in response.json()["message"]


# --- the gateway connection -------------------------------------------------------------


async def test_dropped_gateway_connection_is_reestablished(
    kg: KernelGateway, tmp_path: Path
) -> None:
    proxy = TcpProxy(kg.port)
    srv = gateway_server(tmp_path, kg.config(url=proxy.url, retry_interval=0.2))
    with running(proxy, srv):
        async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=60) as http:
            kernel_id = (await http.post("/api/kernels", json={"name": "gw-python3"})).json()["id"]
            client = await connect(srv, kernel_id)
            try:
                _msgs, stdout = await client.run("x = 6 * 7; print(x)")
                assert stdout == "42\n"
                await anyio.to_thread.run_sync(proxy.cut, 1.0)
                msgs = await client.until(lambda m: "Reconnected" in m.content.get("text", ""))
                assert "Lost the connection to the kernel gateway" in stderr(msgs)
                # Same kernel, same state: x is still there.
                _msgs, stdout = await client.run("print(x)")
                assert stdout == "42\n"
            finally:
                await client.close()
            await http.delete(f"/api/kernels/{kernel_id}")


async def test_gateway_restart_mid_session(tmp_path: Path) -> None:
    kg = KernelGateway(tmp_path / "kg")
    srv = gateway_server(
        tmp_path / "jupyverse", kg.config(retry_interval=0.25, retry_interval_max=1, retry_max=60)
    )
    with running(kg, srv):
        async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=60) as http:
            body = {"path": "a.ipynb", "type": "notebook", "kernel": {"name": "gw-python3"}}
            session = (await http.post("/api/sessions", json=body)).json()
            kernel_id = session["kernel"]["id"]
            client = await connect(srv, kernel_id)
            _msgs, stdout = await client.run("print('before')")
            assert stdout == "before\n"

            await anyio.to_thread.run_sync(kg.stop)
            msgs = await client.until(lambda m: "Lost the connection" in m.content.get("text", ""))
            assert "reconnecting" in stderr(msgs)
            # While the gateway is away: clear errors, local kernels unaffected.
            response = await http.post("/api/kernels", json={"name": "gw-python3"})
            assert response.status_code == 503, response.text
            assert "cannot be reached" in response.json()["message"]
            response = await http.post(f"/api/kernels/{kernel_id}/restart")
            assert response.status_code == 503, response.text
            model = (await http.get(f"/api/kernels/{kernel_id}")).json()
            assert "Kernel gateway problem" in model["reason"]
            late = await connect(srv, kernel_id)  # a new client is told why it cannot be served
            with pytest.raises(ConnectionClosed) as refused:
                await late.receive(10)
            assert refused.value.rcvd is not None and refused.value.rcvd.code == 1011
            assert "cannot be reached" in refused.value.rcvd.reason
            local = (await http.post("/api/kernels", json={"name": "python3"})).json()["id"]
            await http.delete(f"/api/kernels/{local}")

            await anyio.to_thread.run_sync(kg.start)  # same port and token; no kernels
            got, close_code = await client.until_closed(30)
            assert "no longer exists on the kernel gateway" in stderr(got)
            assert any(m.content.get("execution_state") == "dead" for m in got)
            assert close_code == 1000
            assert (await http.get(f"/api/kernels/{kernel_id}")).status_code == 404
            assert (await http.get(f"/api/sessions/{session['id']}")).status_code == 404

            # Recovery: a new session gets a new kernel on the gateway that came back.
            body["path"] = "b.ipynb"
            response = await http.post("/api/sessions", json=body)
            assert response.status_code == 201, response.text
            client = await connect(srv, response.json()["kernel"]["id"])
            _msgs, stdout = await client.run("print('after')")
            assert stdout == "after\n"
            await client.close()


def test_kernels_culled_by_the_gateway_are_forgotten(tmp_path: Path) -> None:
    kg = KernelGateway(tmp_path / "kg")
    # Long enough that the gateway cannot cull the kernel before the session's POST has
    # answered, even on a loaded machine.
    kg.start(
        (
            "--MappingKernelManager.cull_idle_timeout=10",
            "--MappingKernelManager.cull_interval=1",
        )
    )
    # jupyverse's own culling would not touch it: the gateway culls its kernels.
    srv = gateway_server(
        tmp_path / "jupyverse", kg.config(poll_interval=0.5), kernels={"cull_idle_timeout": 600}
    )
    srv.start()
    try:
        with srv.client() as http:
            body = {"path": "a.ipynb", "type": "notebook", "kernel": {"name": "gw-python3"}}
            session = http.post("/api/sessions", json=body).json()
            kernel_id = session["kernel"]["id"]
            wait_for(lambda: kernel_id not in [k["id"] for k in kg.kernels()], 60, "culled")
            wait_for(
                lambda: http.get(f"/api/kernels/{kernel_id}").status_code == 404, 30, "forgotten"
            )
            assert http.get(f"/api/sessions/{session['id']}").status_code == 404
            assert http.get("/api/sessions").json() == []
    finally:
        srv.stop()
        kg.stop()


# --- a gateway that does not answer -------------------------------------------------------

#: Seconds a listing may take with a gateway that does not answer: it waits about 1 s for the
#: gateway; generous for a loaded machine, far below the gateway's request timeout.
LISTING_BOUND = 5.0
LISTINGS = ("/api/kernelspecs", "/api/kernels", "/api/sessions", "/api/status")


async def timed_listings(http: httpx.AsyncClient) -> dict[str, Any]:
    """Every listing, twice (the first may wait for the gateway, the next not at all), each
    answering within LISTING_BOUND; the last answers."""
    answers: dict[str, Any] = {}
    for _ in range(2):
        for path in LISTINGS:
            start = time.monotonic()
            response = await http.get(path)
            took = time.monotonic() - start
            assert response.status_code == 200, response.text
            assert took < LISTING_BOUND, f"GET {path} took {took:.1f} s"
            answers[path] = response.json()
    return answers


async def run_on_a_local_kernel(srv: JupyverseServer, http: httpx.AsyncClient) -> None:
    body = {"path": "local.ipynb", "type": "notebook", "kernel": {"name": "python3"}}
    response = await http.post("/api/sessions", json=body)
    assert response.status_code == 201, response.text
    session = response.json()
    client = await connect(srv, session["kernel"]["id"])
    try:
        _msgs, stdout = await client.run("print('local', 6 * 7)")
        assert stdout == "local 42\n"
    finally:
        await client.close()
    assert (await http.delete(f"/api/sessions/{session['id']}")).status_code == 204


def assert_came_up(srv: JupyverseServer) -> None:
    log = srv.read_log()
    assert "Timeout waiting for the root component" not in log
    assert "did not answer within 1 s: going on without it" in log, log[-3000:]
    assert srv.process is not None and srv.process.poll() is None


async def test_a_gateway_that_never_answers_holds_nothing_up(tmp_path: Path) -> None:
    hung = HungGateway()
    srv = gateway_server(tmp_path, {"url": hung.url, "request_timeout": 3})
    with running(hung, srv):
        assert_came_up(srv)
        assert hung.accepted >= 1
        async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=60) as http:
            answers = await timed_listings(http)
            specs = answers["/api/kernelspecs"]["kernelspecs"]
            assert "python3" in specs and not any(name.startswith("gw-") for name in specs)
            await run_on_a_local_kernel(srv, http)
            response = await http.post("/api/kernels", json={"name": "gw-python3"})
            assert response.status_code == 504, response.text
            assert "does not answer" in response.json()["message"]
        assert srv.server_tracebacks() == []


async def test_a_stopped_gateway_holds_nothing_up_and_comes_back(tmp_path: Path) -> None:
    kg = KernelGateway(tmp_path / "kg")
    kg.start()
    home = tmp_path / "jupyverse"
    srv = gateway_server(home, kg.config(retry_interval=0.25))
    later: Jupyverse | None = None
    try:
        srv.start()
        async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=60) as http:
            body = {"path": "a.ipynb", "type": "notebook", "kernel": {"name": "gw-python3"}}
            response = await http.post("/api/sessions", json=body)
            assert response.status_code == 201, response.text
            session = response.json()
            kernel_id = session["kernel"]["id"]
            client = await connect(srv, kernel_id)
            await client.run("x = 6 * 7")
            await client.close()

            await anyio.to_thread.run_sync(kg.pause)
            # Listings within a second of the last look answer from it: the gateway is seen
            # not to answer once a listing asks it again (each listing stays fast meanwhile).
            deadline = time.monotonic() + 30
            while True:
                answers = await timed_listings(http)
                model = next(k for k in answers["/api/kernels"] if k["id"] == kernel_id)
                if "reason" in model or time.monotonic() > deadline:
                    break
                await anyio.sleep(0.5)
            assert {"python3", "gw-python3"} <= set(answers["/api/kernelspecs"]["kernelspecs"])
            assert "does not answer" in model.get("reason", ""), model
            listed = next(s for s in answers["/api/sessions"] if s["id"] == session["id"])
            assert "does not answer" in listed["kernel"].get("reason", ""), listed
            start = time.monotonic()
            response = await http.delete(f"/api/kernels/{kernel_id}")
            assert time.monotonic() - start < LISTING_BOUND
            assert response.status_code == 504, response.text  # and the kernel stays
            assert "does not answer" in response.json()["message"]
            await run_on_a_local_kernel(srv, http)

            await anyio.to_thread.run_sync(kg.resume)
            deadline = time.monotonic() + 30
            while "reason" in (await http.get(f"/api/kernels/{kernel_id}")).json():
                assert time.monotonic() < deadline, "the reason stayed"
                await anyio.sleep(0.2)
            client = await connect(srv, kernel_id)
            try:
                _msgs, stdout = await client.run("print(x)")
                assert stdout == "42\n"
            finally:
                await client.close()
        srv.stop()  # deletes the kernel it started: the gateway answers again

        # A start while the gateway is stopped: up at once, with the kernelspecs it gave last.
        await anyio.to_thread.run_sync(kg.pause)
        later = gateway_server(home, kg.config())
        later.start()
        assert_came_up(later)
        async with httpx.AsyncClient(base_url=later.url, headers=later.headers, timeout=60) as http:
            answers = await timed_listings(http)
            specs = answers["/api/kernelspecs"]["kernelspecs"]
            assert specs["gw-python3"]["spec"]["display_name"] == "Python 3 (ipykernel) (gateway)"
            await run_on_a_local_kernel(later, http)
            await anyio.to_thread.run_sync(kg.resume)
            body = {"path": "b.ipynb", "type": "notebook", "kernel": {"name": "gw-python3"}}
            response = await http.post("/api/sessions", json=body)
            assert response.status_code == 201, response.text
            client = await connect(later, response.json()["kernel"]["id"])
            try:
                _msgs, stdout = await client.run("print('after')")
                assert stdout == "after\n"
            finally:
                await client.close()
        assert later.server_tracebacks() == [] and srv.server_tracebacks() == []
    finally:
        kg.resume()
        if later is not None:
            later.stop()
        srv.stop()
        kg.stop()


# --- messages over the gateway's size limit -----------------------------------------------


@pytest.mark.parametrize(
    ("checked", "protocol"), [("here", "legacy"), ("gateway", "v1"), ("gateway", "legacy")]
)
async def test_a_message_too_large_for_the_gateway_is_never_resent(
    kg: KernelGateway, tmp_path: Path, checked: str, protocol: str
) -> None:
    # "gateway": no check here, Kernel Gateway refuses it (close code 1009, as Enterprise
    # Gateway does: both keep Tornado's 10 MiB limit).
    limit = {"max_message_bytes": 0} if checked == "gateway" else {}
    with running(gateway_server(tmp_path, kg.config(retry_interval=0.2, **limit))) as (srv,):
        async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers, timeout=60) as http:
            response = await http.post("/api/kernels", json={"name": "gw-python3"})
            assert response.status_code == 201, response.text
            kernel_id = response.json()["id"]
            client = await connect(srv, kernel_id, protocol)
            other = await connect(srv, kernel_id, protocol)
            await client.run("x = 6 * 7")
            code = "s = '" + "a" * (12 << 20) + "'"  # 12 MiB
            big = make_msg("execute_request", {"code": code, "silent": False}, client.session_id)
            await client.send(big)
            msgs, close_code = await client.until_closed(30)
            assert close_code == 1009
            notices = [m for m in msgs if "too large for the kernel gateway" in stderr([m])]
            assert len(notices) == 1, stderr(msgs)
            assert notices[0].parent_id == big["header"]["msg_id"]  # in the cell that sent it
            why = "over the gateway's limit" if checked == "here" else "closed with 1009"
            assert why in stderr(notices)

            # The kernel, its other client and new connections go on.
            _msgs, stdout = await other.run("print(x)")
            assert stdout == "42\n"
            await other.close()
            again = await connect(srv, kernel_id, protocol)
            _msgs, stdout = await again.run("print(x + 1)")
            assert stdout == "43\n"
            await again.close()
            assert (await http.delete(f"/api/kernels/{kernel_id}")).status_code == 204
        log = srv.read_log()
        assert log.count("is too large for the kernel gateway") == 1, log[-3000:]
        assert "reconnecting" not in log
        assert srv.server_tracebacks() == []
