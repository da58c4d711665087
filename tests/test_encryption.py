"""CurveZMQ between the server and its kernels (transport_encryption)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from .conftest import JupyverseServer, started, write_kernelspec
from .kernel_client import KernelClient

pytestmark = pytest.mark.anyio


async def _iopub_messages(info: dict, curve: bool, seconds: float) -> int:
    """How many iopub messages a plain ZMQ client holding the HMAC key gets."""
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.LINGER, 0)
    if curve:
        public, secret = zmq.curve_keypair()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = info["curve_publickey"].encode()
    sock.connect(f"tcp://127.0.0.1:{info['iopub_port']}")
    count = 0
    try:
        while True:
            if not await sock.poll(seconds * 1000):
                return count
            await sock.recv_multipart()
            count += 1
    finally:
        sock.close()
        context.term()


def _encrypting_server(home: Path, mode: str) -> JupyverseServer:
    """A server (not started) with transport_encryption `mode`, and the kernelspec "plain":
    ipykernel, that declares no encryption support."""
    srv = JupyverseServer(home, kernels={"transport_encryption": mode})
    write_kernelspec(
        srv.share,
        "plain",
        {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "No encryption declared",
            "language": "python",
        },
    )
    return srv


async def test_auto_encrypts_kernels_that_support_curve(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    srv = _encrypting_server(tmp_path_factory.mktemp("curve"), "auto")
    async with started(srv) as http:
        kernel_id = (await http.post("/api/kernels", json={"name": "python3"})).json()["id"]
        info = json.loads((srv.runtime_dir / f"kernel-{kernel_id}.json").read_text())
        assert info["curve_publickey"] and info["curve_secretkey"]
        client = await KernelClient.connect(srv.ws_url, kernel_id)
        _msgs, stdout = await client.run("print('over curve')")
        assert stdout == "over curve\n"
        # a plain client with the HMAC key only hears nothing while the kernel talks
        msg_id = await client.execute("for i in range(50): print(i)")
        eavesdropped = await _iopub_messages(info, curve=False, seconds=1.5)
        await client.until_idle(msg_id)
        assert eavesdropped == 0
        await client.close()
        plain = (await http.post("/api/kernels", json={"name": "plain"})).json()["id"]
        plain_info = json.loads((srv.runtime_dir / f"kernel-{plain}.json").read_text())
        assert "curve_publickey" not in plain_info
        # the same eavesdropper does hear an unencrypted kernel: the check above can fail
        client = await KernelClient.connect(srv.ws_url, plain)
        await client.run("pass")
        msg_id = await client.execute("import time\nfor i in range(20): print(i); time.sleep(0.05)")
        heard = await _iopub_messages(plain_info, curve=False, seconds=1.5)
        await client.until_idle(msg_id)
        await client.close()
        assert heard > 0


async def test_required_refuses_kernels_without_curve(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    srv = _encrypting_server(tmp_path_factory.mktemp("curvereq"), "required")
    async with started(srv) as http:
        refused = await http.post("/api/kernels", json={"name": "plain"})
        assert refused.status_code == 500
        assert "CurveZMQ" in refused.json()["message"]
        assert list(srv.runtime_dir.glob("kernel-*.json")) == []
        ok = await http.post("/api/kernels", json={"name": "python3"})
        assert ok.status_code == 201
