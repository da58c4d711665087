"""Hostile input on REST and on the kernel WebSocket: a clear 4xx or a dropped frame with a
log line; never a traceback to a client, never a connection, kernel or client taken down."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import JupyverseServer, serving
from tests.kernel_client import KernelClient, make_msg, pack_v1

pytestmark = pytest.mark.anyio

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's parser goes
DEEPISH = "[" * 900 + "]" * 900  # parses here, but deeper than any real message
BIG_INT = "7" * 5000  # over Python's 4300-digit limit
LONG_NAME = "n" * 300  # over the 255 bytes of a file name
SURROGATE = '"\\ud800"'  # a lone UTF-16 surrogate, escaped


@pytest.mark.parametrize(
    ("method", "url", "body", "status", "words"),
    [
        ("POST", "/api/kernels", DEEP, 400, "nested too deeply"),
        (
            "POST",
            "/api/sessions",
            '{"path": "a", "type": "notebook", "x": ' + DEEP + "}",
            400,
            "nested",
        ),
        ("POST", "/api/kernels", '{"name": ' + BIG_INT + "}", 400, "too many digits"),
        ("PATCH", "/api/sessions/s", '{"name": ' + BIG_INT + "}", 400, "too many digits"),
        ("POST", "/api/kernels", '{"name": ' + SURROGATE + "}", 400, "surrogate"),
        ("POST", "/api/sessions", '{"path": "a\\u0000b", "type": "notebook"}', 400, "NUL"),
        ("POST", "/api/kernels", '{"path": "a\\u0000b"}', 400, "NUL"),
        ("POST", "/api/sessions", json.dumps({"path": f"d/{LONG_NAME}", "type": "n"}), 400, "255"),
        ("POST", "/api/kernels", json.dumps({"path": LONG_NAME}), 400, "255 bytes"),
        ("PATCH", "/api/sessions/s", json.dumps({"path": f"{LONG_NAME}/x"}), 400, "255 bytes"),
        # no resource can have such a name
        ("GET", f"/kernelspecs/python3/{LONG_NAME}", None, 404, "255 bytes"),
        ("GET", f"/kernelspecs/{LONG_NAME}/logo-64x64.png", None, 404, "255 bytes"),
        ("GET", "/kernelspecs/python3/a%00b", None, 404, "NUL"),
        ("GET", f"/api/kernelspecs/{LONG_NAME}", None, 404, "not found"),
        ("POST", "/api/kernels", '{"name": 3}', 422, "name"),
    ],
)
def test_bad_rest_input_gets_a_4xx_with_a_message(
    server: JupyverseServer,
    client: httpx.Client,
    method: str,
    url: str,
    body: str | None,
    status: int,
    words: str,
) -> None:
    response = client.request(method, url, content=body)
    assert response.status_code == status, response.text[:500]
    message = response.json()["message"]
    assert words in message
    assert "Traceback" not in response.text and len(response.text) < 1000
    assert server.server_tracebacks() == []


@pytest.fixture(scope="module")
def small_bodies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyverseServer]:
    srv = JupyverseServer(tmp_path_factory.mktemp("small"), kernels={"max_body_bytes": 1000})
    yield from serving(srv)


def test_bodies_over_the_limit_get_413(small_bodies: JupyverseServer) -> None:
    padded = json.dumps({"path": "a.ipynb", "type": "notebook", "pad": "x" * 2000})
    with small_bodies.client() as client:
        response = client.post("/api/sessions", content=padded)
        assert response.status_code == 413
        assert "1000 bytes" in response.json()["message"]

        # no Content-Length: read up to the limit, no further
        def chunks() -> Iterator[bytes]:
            for _ in range(5):
                yield b"x" * 400

        response = client.post("/api/kernels", content=chunks())
        assert response.status_code == 413
        # under the limit, the body is read and validated as usual
        response = client.post("/api/sessions", content=json.dumps({"path": "a.ipynb"}))
        assert response.status_code == 400
        assert "type" in response.json()["message"]
    assert small_bodies.server_tracebacks() == []


# --- WebSocket frames ---------------------------------------------------------------------


def v1_frame(channel: str, parts: list[bytes]) -> bytes:
    """A v1 frame from raw parts (header, parent_header, metadata, content)."""
    return pack_v1([channel.encode(), *parts])


def legacy_binary(text: str) -> bytes:
    body = text.encode("utf-8", "surrogatepass")
    return struct.pack(">2I", 1, 8) + body


def request_parts(session: str, **raw: str) -> dict[str, str]:
    """The JSON texts of an execute_request, with some values replaced by raw JSON text."""
    msg = make_msg("execute_request", {"code": "print('bad')", "silent": False}, session)
    texts = {
        key: json.dumps(msg[key]) for key in ("header", "parent_header", "metadata", "content")
    }
    for key, value in raw.items():
        part, field = key.split("__")
        texts[part] = texts[part][:-1] + f', "{field}": {value}}}'
    return texts


BAD_VALUES: dict[str, dict[str, str]] = {
    "deep header": {"header__x": DEEP},
    "deepish header": {"header__x": DEEPISH},
    "big int in header": {"header__x": BIG_INT},
    "surrogate in header": {"header__msg_id": SURROGATE},
    "deep content": {"content__x": DEEP},
    "deepish content": {"content__x": DEEPISH},
    "big int in content": {"content__x": BIG_INT},
    "surrogate in parent": {"parent_header__msg_id": SURROGATE},
    "surrogate in metadata": {"metadata__x": SURROGATE},
    "surrogate in content": {"content__code": SURROGATE},
}


def bad_frames(protocol: str, session: str) -> list[Any]:
    frames: list[Any] = []
    for raw in BAD_VALUES.values():
        texts = request_parts(session, **raw)
        if protocol == "v1":
            frames.append(v1_frame("shell", [texts[k].encode() for k in texts]))
        else:
            message = "{" + ", ".join(f'"{k}": {v}' for k, v in texts.items())
            message += ', "channel": "shell"}'
            frames.append(message)
            frames.append(legacy_binary(message))
    return frames


@pytest.mark.parametrize("protocol", ["v1", "legacy"])
async def test_bad_frames_are_dropped_and_the_connection_goes_on(
    server: JupyverseServer, kernel: str, protocol: str
) -> None:
    sender = await KernelClient.connect(server.ws_url, kernel, protocol)
    bystander = await KernelClient.connect(server.ws_url, kernel)
    try:
        frames = bad_frames(protocol, sender.session_id)
        for number, frame in enumerate(frames):
            await sender.ws.send(frame)
            _msgs, stdout = await sender.run(f"print({number})", timeout=60)
            assert stdout == f"{number}\n"
        _msgs, stdout = await bystander.run("print('bystander')", timeout=60)
        assert stdout == "bystander\n"
    finally:
        await sender.close()
        await bystander.close()
    seen = bystander.received + sender.received
    assert not [m for m in seen if m.msg_type == "error"]
    assert not [m for m in seen if "Traceback" in str(m.content.get("text", ""))]
    assert not [m for m in seen if m.content.get("text") == "bad\n"]  # never ran
    log = server.read_log().splitlines()
    dropped = [line for line in log if kernel in line and "ignored a malformed frame" in line]
    assert len(dropped) == len(frames)
    assert not [line for line in log if f"[kernel {kernel[:8]}" in line and "Invalid" in line]
    assert server.server_tracebacks() == []
