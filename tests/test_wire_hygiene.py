"""Messages from a kernel whose signature is missing, wrong or replayed are dropped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
import zmq
import zmq.asyncio

from fps_kernels.kernel_driver.connection import PortAllocator, new_connection_info
from fps_kernels.kernel_driver.signing import Signer
from fps_kernels.kernel_driver.wire import join_frames, make_message_parts, unpack
from fps_kernels.kernel_server.server import KernelServer

pytestmark = pytest.mark.anyio


class FakeKernel:
    """Just enough of a kernel: answers kernel_info, publishes what the test says."""

    def __init__(self, info: Any) -> None:
        self.context = zmq.asyncio.Context()
        self.signer = Signer(info.key)
        self.shell = self.context.socket(zmq.ROUTER)
        self.shell.bind(info.url("shell"))
        self.iopub = self.context.socket(zmq.PUB)
        self.iopub.bind(info.url("iopub"))
        self.others = [self.context.socket(zmq.ROUTER) for _ in ("control", "stdin")]
        for sock, channel in zip(self.others, ("control", "stdin"), strict=True):
            sock.bind(info.url(channel))

    async def serve_kernel_info(self) -> None:
        while True:
            frames = await self.shell.recv_multipart()
            identity, rest = frames[0], frames[2:]
            parent = unpack(rest[1])
            _id, parts = make_message_parts("kernel_info_reply", {"status": "ok"}, "k", parent)
            await self.shell.send_multipart([identity, *join_frames(parts, [], self.signer)])
            await self.publish(self.status("idle", parent))

    @staticmethod
    def status(state: str, parent: dict[str, Any]) -> list[bytes]:
        return make_message_parts("status", {"execution_state": state}, "k", parent)[1]

    async def publish(self, parts: list[bytes], signature: bytes | None = None) -> list[bytes]:
        frames = join_frames(parts, [], self.signer)
        if signature is not None:
            frames[1] = signature
        await self.iopub.send_multipart(frames)
        return frames

    def close(self) -> None:
        for sock in (self.shell, self.iopub, *self.others):
            sock.close(linger=0)
        self.context.term()


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Wait for an event with a deadline of seconds (the machine may be loaded)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_bad_signatures_are_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    info = new_connection_info(PortAllocator())
    kernel = FakeKernel(info)
    responder = asyncio.create_task(kernel.serve_kernel_info())
    server = KernelServer(connection_cfg=info.model_dump(), write_connection_file=False)
    try:
        await asyncio.wait_for(server.start(launch_kernel=False), 10)
        execute = {"msg_id": "e1", "msg_type": "execute_request"}
        busy = await kernel.publish(kernel.status("busy", execute))
        await _until(lambda: server.execution_state == "busy", "the busy status")
        caplog.set_level(logging.WARNING)
        idle = kernel.status("idle", execute)
        await kernel.publish(idle, signature=b"")  # unsigned
        await kernel.publish(idle, signature=b"0" * 64)  # wrong
        await kernel.iopub.send_multipart(busy)  # replayed

        def reasons() -> str:
            return " ".join(r.getMessage() for r in caplog.records)

        # Messages are read in order: once the last one is logged, all three were handled.
        await _until(lambda: "duplicate signature" in reasons(), "the replayed one logged")
        assert server.execution_state == "busy"
        assert "unsigned message" in reasons()
        assert "invalid signature" in reasons()
        await kernel.publish(idle)
        await _until(lambda: server.execution_state == "idle", "the idle status")
    finally:
        await server.stop()
        responder.cancel()
        kernel.close()
