"""The gateway provider and the provider registry, in-process, with a mocked gateway."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from fps_kernels.config import KernelsPluginConfig
from fps_kernels.errors import (
    GatewayError,
    GatewayTimeout,
    GatewayUnavailable,
    KernelspecNotFound,
)
from fps_kernels.gateway import provider as gateway_module
from fps_kernels.gateway.client import GatewayClient, GatewayRefused, gateway_message
from fps_kernels.gateway.config import GatewayConfig
from fps_kernels.gateway.kernel import _size
from fps_kernels.gateway.peek import OUTPUT, header_of, peek_legacy, peek_v1
from fps_kernels.gateway.provider import GatewayProvider
from fps_kernels.gateway.remembered import RememberedSpecs
from fps_kernels.kernel_driver.wire import make_message_parts
from fps_kernels.kernel_server.framing import (
    encode_legacy_binary,
    encode_legacy_text,
    encode_v1,
)
from fps_kernels.kernel_server.registry import KernelEntry, KernelRegistry
from fps_kernels.launchers import KernelRequest
from fps_kernels.providers import enabled_providers
from fps_kernels.providers.base import KernelProvider, KernelType, ProviderContext
from fps_kernels.registry import Registry
from fps_kernels.routes import error_response

from .conftest import free_port

ANSWER_BOUND = 5.0  # seconds: ANSWER_WAIT (1 s) on a loaded machine, far below a timeout

pytestmark = pytest.mark.anyio

SPECS = {
    "default": "python3",
    "kernelspecs": {
        "python3": {
            "name": "python3",
            "spec": {"display_name": "Python 3 (ipykernel)", "language": "python"},
            "resources": {"logo-64x64": "/kernelspecs/python3/logo-64x64.png"},
        },
        "bad/name": {"name": "bad/name", "spec": {"display_name": "x"}},
    },
}


class Host:
    """What a provider sees of the registry."""

    def __init__(self) -> None:
        self._kernels: dict[str, KernelEntry] = {}
        self.detached: list[str] = []

    @property
    def kernels(self) -> Mapping[str, KernelEntry]:
        return self._kernels

    def adopt(self, kernel_id: str, entry: KernelEntry) -> None:
        self._kernels[kernel_id] = entry

    async def detach_kernel(self, kernel_id: str, notice: str) -> None:
        self.detached.append(kernel_id)


class FakeGateway:
    """An httpx transport answering like Kernel Gateway, recording what it was asked; while
    `hung`, it accepts requests and never answers."""

    def __init__(self, post_delay: float = 0.0, hung: bool = False) -> None:
        self.post_delay = post_delay
        self.requests: list[tuple[str, str, Any]] = []
        self.hung = hung
        self.kernels: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.method, request.url.path, body))
        while self.hung:
            await asyncio.sleep(0.05)
        if request.method == "GET" and request.url.path == "/api/kernelspecs":
            return httpx.Response(200, json=SPECS)
        if request.method == "GET" and request.url.path == "/api/kernels":
            return httpx.Response(200, json=self.kernels)
        if request.method == "POST" and request.url.path == "/api/kernels":
            await asyncio.sleep(self.post_delay)
            return httpx.Response(201, json={"id": "late-kernel", "name": "python3"})
        if request.method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(404, json={"reason": "Not Found", "message": ""})

    def deleted(self) -> list[str]:
        return [path.rsplit("/", 1)[-1] for method, path, _ in self.requests if method == "DELETE"]


def provider(
    transport: Any,
    monkeypatch: pytest.MonkeyPatch | None = None,
    state_dir: Path | None = None,
    **options: Any,
) -> GatewayProvider:
    url = options.pop("url", None) or f"http://127.0.0.1:{free_port()}"  # no WebSockets there
    config = KernelsPluginConfig(gateway={"url": url, "auth_token": "t0k", **options})
    context = ProviderContext(name="gateway", config=config, host=Host(), root_dir=Path.cwd())
    return GatewayProvider(context, transport=httpx.MockTransport(transport), state_dir=state_dir)


@pytest.fixture(autouse=True)
def _runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernelspecs the providers keep go to the test's own directory."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))


# --- frames -------------------------------------------------------------------------------


def _parts(msg_type: str, content: dict[str, Any], parent_type: str = "") -> list[bytes]:
    parent = {"msg_id": "p1", "msg_type": parent_type} if parent_type else {}
    return make_message_parts(msg_type, content, "s", parent)[1]


def test_peek_v1_and_legacy_read_status_and_nothing_more() -> None:
    busy = _parts("status", {"execution_state": "busy"}, "execute_request")
    for glance in (
        peek_v1(encode_v1("iopub", busy)),
        peek_legacy(encode_legacy_text("iopub", busy, "m", "status")),
        peek_legacy(encode_legacy_binary("iopub", busy, [b"\x00\xff" * 10], "m", "status")),
    ):
        assert glance is not None
        assert (glance.channel, glance.msg_type, glance.state) == ("iopub", "status", "busy")
        assert glance.parent_msg_type == "execute_request"
        assert glance.parent_header["msg_id"] == "p1"
    reply = _parts("execute_reply", {"status": "ok"}, "execute_request")
    assert peek_v1(encode_v1("shell", reply)).channel == "shell"  # type: ignore[union-attr]
    stream = peek_v1(encode_v1("iopub", _parts("stream", {"text": "x"}, "execute_request")))
    assert stream is not None and (stream.msg_type, stream.state) == ("stream", None)
    assert peek_legacy("x" * 70_000) is OUTPUT
    for garbage in (b"", b"\x01" * 7, b"\xff" * 64):
        assert peek_v1(garbage) is None
        assert peek_legacy(garbage) is None
    assert peek_legacy("not json") is None


# --- errors -------------------------------------------------------------------------------


def test_gateway_messages_keep_the_gateways_words() -> None:
    traceback = "Traceback...\n  File x\njupyter_client.kernelspec.NoSuchKernel: No such kernel"
    body = {"reason": "Internal Server Error", "message": "Unknown server error"}
    assert (
        gateway_message(500, "Internal Server Error", {**body, "traceback": traceback})
        == "jupyter_client.kernelspec.NoSuchKernel: No such kernel"
    )
    assert gateway_message(404, "Not Found", {"message": "Kernel does not exist: x"}) == (
        "Kernel does not exist: x"
    )
    assert gateway_message(401, "Unauthorized", {"reason": "Unauthorized", "message": ""}) == (
        "Unauthorized"
    )
    assert gateway_message(502, "Bad Gateway", None, "<html>proxy error</html>\n...") == (
        "<html>proxy error</html>"
    )


async def test_transport_problems_become_503_and_504() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def deny(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"reason": "Unauthorized", "message": ""})

    config = GatewayConfig(url="http://gw.example:8888")
    for handler, kind, status, words in [
        (refuse, GatewayUnavailable, 503, "cannot be reached: Connection refused"),
        (stall, GatewayTimeout, 504, "does not answer (GET /api/kernels: ReadTimeout)"),
        (deny, GatewayRefused, 502, "with 401 Unauthorized (check kernels.gateway.auth_token"),
    ]:
        client = GatewayClient(config, httpx.MockTransport(handler))
        with pytest.raises(GatewayError) as raised:
            await client.request("GET", "/api/kernels")
        assert type(raised.value) is kind
        assert words in raised.value.message
        assert "http://gw.example:8888" in raised.value.message
        assert error_response(raised.value).status_code == status
        await client.close()


async def test_the_gateway_token_is_sent_and_nothing_else() -> None:
    seen: list[httpx.Headers] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(200, json=[])

    config = GatewayConfig(
        url="http://gw:1", auth_token="abc", auth_scheme="Bearer", headers={"X-Team": "blue"}
    )
    client = GatewayClient(config, httpx.MockTransport(record))
    await client.get_json("/api/kernels")
    await client.close()
    assert seen[0]["authorization"] == "Bearer abc" and seen[0]["x-team"] == "blue"
    assert "cookie" not in seen[0]


# --- the provider -------------------------------------------------------------------------


async def test_names_in_merged_and_exclusive_modes() -> None:
    merged = provider(FakeGateway())
    types = await merged.kernelspecs()
    assert list(types) == ["gw-python3"]  # "bad/name" is not a usable name
    spec = types["gw-python3"]
    assert spec.spec["display_name"] == "Python 3 (ipykernel) (gateway)"
    assert spec.spec["metadata"]["fps_kernels"] == {
        "provider": "gateway",
        "gateway_name": "python3",
    }
    assert spec.resources == {"logo-64x64": "logo-64x64.png"}
    assert merged.claims("gw-anything") and not merged.claims("python3")
    assert merged.default_kernel() is None
    exclusive = provider(FakeGateway(), mode="exclusive", display_name_suffix="!")
    types = await exclusive.kernelspecs()
    assert list(types) == ["python3"]
    assert types["python3"].spec["display_name"] == "Python 3 (ipykernel)"
    assert exclusive.claims("anything") and exclusive.default_kernel() == "python3"
    for p in (merged, exclusive):
        await p.close()


async def test_kernel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KERNEL_NAMESPACE", "team-a")
    monkeypatch.setenv("SPARK_OPTS", "--x")
    monkeypatch.setenv("OTHER", "no")
    monkeypatch.delenv("KERNEL_USERNAME", raising=False)
    p = provider(
        FakeGateway(),
        pass_env=["KERNEL_*", "SPARK_*"],
        env={"KERNEL_IMAGE": "py:3.11", "KERNEL_USERNAME": "fallback"},
        launch_timeout=90,
        send_working_dir=True,
    )
    kernel_id = str(uuid.uuid4())
    env = p.kernel_env(KernelRequest(kernel_id, "gw-python3", cwd="/nb", username="alice"))
    assert env == {
        "KERNEL_NAMESPACE": "team-a",
        "SPARK_OPTS": "--x",
        "KERNEL_IMAGE": "py:3.11",
        "KERNEL_USERNAME": "alice",
        "KERNEL_LAUNCH_TIMEOUT": "90",
        "KERNEL_ID": kernel_id,
        "KERNEL_WORKING_DIR": "/nb",
    }
    # No jupyverse user (no authentication): the configured one; no uuid4: no KERNEL_ID.
    env = p.kernel_env(KernelRequest(str(uuid.uuid1()), "gw-python3"))
    assert env["KERNEL_USERNAME"] == "fallback" and "KERNEL_ID" not in env
    await p.close()


async def test_a_launch_that_times_out_leaves_no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway_module, "LAUNCH_PAD", 0.0)
    gateway = FakeGateway(post_delay=0.5)
    p = provider(gateway, launch_timeout=0.1)
    asked = str(uuid.uuid4())
    with pytest.raises(GatewayTimeout) as raised:
        await p.launch(KernelRequest(asked, "gw-python3", username="bob"))
    assert "did not start a python3 kernel within 0.1 s" in raised.value.message
    post = next(body for method, _, body in gateway.requests if method == "POST")
    assert post["name"] == "python3"
    assert post["env"]["KERNEL_ID"] == asked and post["env"]["KERNEL_USERNAME"] == "bob"
    await p.close()  # waits for the late answer
    # The kernel that came late is deleted, and so is the id Enterprise Gateway would use.
    assert gateway.deleted() == ["late-kernel", asked]


async def test_a_kernel_that_cannot_be_reached_is_deleted() -> None:
    gateway = FakeGateway()
    p = provider(gateway, connect_timeout=2)
    with pytest.raises(GatewayUnavailable):
        await p.launch(KernelRequest(str(uuid.uuid4()), "gw-python3"))
    await p.close()
    assert gateway.deleted() == ["late-kernel"]


async def test_unknown_names_ask_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    p = provider(FakeGateway())
    with pytest.raises(KernelspecNotFound):
        await p.launch(KernelRequest(str(uuid.uuid4()), "gw-nope"))
    await p.close()


# --- which providers, and their names -----------------------------------------------------


def test_enabled_providers() -> None:
    installed = ["spec", "pyimport", "external", "gateway", "zeta", "alpha"]
    default = KernelsPluginConfig()
    assert enabled_providers(default, installed) == ["spec", "alpha", "zeta"]
    config = KernelsPluginConfig(allow_external_kernels=True, gateway={"url": "http://gw:1"})
    assert enabled_providers(config, installed) == ["spec", "external", "gateway", "alpha", "zeta"]
    config = KernelsPluginConfig(
        providers=["pyimport", "spec", "gateway"],
        gateway={"url": "http://gw:1", "mode": "exclusive"},
    )
    assert enabled_providers(config, installed) == ["gateway"]
    config = KernelsPluginConfig(providers=["zeta", "spec"], allow_external_kernels=True)
    assert enabled_providers(config, installed) == ["zeta", "spec"]
    with pytest.raises(ValueError, match="no '/'"):
        GatewayConfig(url="http://gw:1", name_prefix="gw/")
    with pytest.raises(ValueError, match="must start with"):
        GatewayConfig(url="gw:1")


class Listing(KernelProvider):
    def __init__(self, name: str, types: dict[str, str], claims: str = "") -> None:
        config = KernelsPluginConfig()
        super().__init__(ProviderContext(name=name, config=config, host=Host()))
        self.types = {n: KernelType(n, {"display_name": d}) for n, d in types.items()}
        self.prefix = claims

    async def kernelspecs(self) -> dict[str, KernelType]:
        return self.types

    def claims(self, kernel_name: str) -> bool:
        return bool(self.prefix) and kernel_name.startswith(self.prefix)

    async def launch(self, request: KernelRequest) -> Any:
        raise NotImplementedError


async def test_registry_merges_kernel_types(tmp_path: Path) -> None:
    first = Listing("first", {"python3": "local", "a": "A"})
    second = Listing("second", {"python3": "hidden", "x-b": "B", "x/c": "bad"}, claims="x-")
    registry = Registry(KernelsPluginConfig(), KernelRegistry(), tmp_path, [first, second])
    specs = await registry.kernelspecs()
    assert {n: t.spec["display_name"] for n, t in specs.items()} == {
        "python3": "local",
        "a": "A",
        "x-b": "B",
    }
    assert registry.default_kernel(list(specs)) == "python3"
    assert registry.default_kernel(["a", "x-b"]) == "a"
    assert (await registry._provider_for("x-b"))[1] is second
    assert (await registry._provider_for("x-unlisted"))[1] is second
    with pytest.raises(KernelspecNotFound):
        await registry._provider_for("nope")


# --- a gateway that does not answer -------------------------------------------------------


async def timed(awaitable: Any) -> tuple[Any, float]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await awaitable
    return result, loop.time() - start


async def test_a_hung_gateway_holds_nothing_up(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    healthy = FakeGateway()
    first = provider(healthy, state_dir=tmp_path, url=url)
    await first.start()
    assert list(await first.kernelspecs()) == ["gw-python3"]
    kernel = first._kernel("k1", "gw-python3", "python3")
    healthy.kernels = [{"id": "k1", "name": "python3", "execution_state": "idle"}]
    healthy.hung = True
    _, took = await timed(first.refresh(max_age=0))
    assert took < ANSWER_BOUND
    assert "does not answer" in kernel.activity.reason, kernel.activity.reason
    assert kernel.activity.reason.startswith("Kernel gateway problem: The kernel gateway at")
    # A look that already hangs is not waited for again.
    _, took = await timed(first.kernelspecs())
    assert took < ANSWER_BOUND and list(await first.kernelspecs()) == ["gw-python3"]
    with pytest.raises(GatewayTimeout, match="does not answer"):
        await first.resource(first._types["gw-python3"], "logo-64x64.png")
    deletes = len(healthy.deleted())
    with pytest.raises(GatewayTimeout, match="does not answer"):
        await kernel.terminate()  # at once: a DELETE would hang
    assert len(healthy.deleted()) == deletes
    healthy.hung = False  # it answers again: the reason goes
    await first.refresh(max_age=0)
    deadline = asyncio.get_running_loop().time() + 10
    while kernel.activity.reason and asyncio.get_running_loop().time() < deadline:
        await first.refresh(max_age=0)
        await asyncio.sleep(0.1)
    assert kernel.activity.reason == ""
    await first.stop()
    await first.close()

    # A new start while the gateway hangs: within a second or so, with the kernelspecs the
    # gateway gave last (kept on disk for its URL).
    hung = FakeGateway(hung=True)
    second = provider(hung, state_dir=tmp_path, url=url)
    _, took = await timed(second.start())
    assert took < ANSWER_BOUND
    types, took = await timed(second.kernelspecs())
    assert took < ANSWER_BOUND and list(types) == ["gw-python3"]
    assert types["gw-python3"].spec["display_name"] == "Python 3 (ipykernel) (gateway)"
    _, took = await timed(second.refresh())
    assert took < ANSWER_BOUND
    await second.stop()
    await second.close()  # the looks still waiting are cancelled


async def test_remembered_kernelspecs_are_checked(tmp_path: Path) -> None:
    remembered = RememberedSpecs(tmp_path, "http://gw:1")
    assert remembered.load() is None
    remembered.save(SPECS)
    assert remembered.path.stat().st_mode & 0o777 == 0o600
    assert RememberedSpecs(tmp_path, "http://gw:1").load() == SPECS
    assert RememberedSpecs(tmp_path, "http://gw:2").load() is None  # another gateway's file
    other = RememberedSpecs(tmp_path, "http://gw:2")
    other.path.write_text(json.dumps({"url": "http://gw:1", "kernelspecs": SPECS}))
    assert other.load() is None  # not written for this URL
    remembered.path.write_text("{broken")
    assert RememberedSpecs(tmp_path, "http://gw:1").load() is None
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


async def test_enterprise_gateways_unauthorized_user_is_said_once() -> None:
    words = (
        "User 'root' is not authorized to start kernel 'Python 3'. Ensure KERNEL_USERNAME is "
        "set to an appropriate value and retry the request."
    )

    def refuse(request: httpx.Request) -> httpx.Response:
        # What Enterprise Gateway answers: the words as the reason phrase and in the body.
        return httpx.Response(
            403,
            json={"reason": words, "message": ""},
            extensions={"reason_phrase": words.encode()},
        )

    client = GatewayClient(GatewayConfig(url="http://eg:8888"), httpx.MockTransport(refuse))
    with pytest.raises(GatewayRefused) as raised:
        await client.request("POST", "/api/kernels", json={})
    await client.close()
    message = raised.value.message
    assert message.count("is not authorized") == 1, message
    assert message.startswith("The kernel gateway at http://eg:8888 answered POST /api/kernels")
    assert "403 Forbidden: User 'root'" in message
    assert message.endswith("e.g. --set kernels.gateway.env.KERNEL_USERNAME=NAME)"), message
    assert "auth_token" not in message


def test_the_header_of_a_refused_message_and_frame_sizes() -> None:
    msg_id, parts = make_message_parts("execute_request", {"code": "x" * 100}, "s", {})
    v1 = encode_v1("shell", parts)
    assert header_of(v1, True)["msg_id"] == msg_id
    text = encode_legacy_text("shell", parts, msg_id, "execute_request")
    assert header_of(text, False)["msg_id"] == msg_id
    binary = encode_legacy_binary("shell", parts, [b"buffer"], msg_id, "comm_msg")
    assert header_of(binary, False)["msg_id"] == msg_id
    assert header_of(b"junk", True) == {} and header_of("junk", False) == {}
    assert _size("é" * 10, 100) == 10  # small: not encoded
    assert _size("é" * 10, 30) == 20  # may be over: its UTF-8 bytes
    assert _size(b"x" * 7, 1) == 7
