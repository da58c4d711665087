"""The workloads, each measurable over every way (direct ZMQ or one of the WebSocket ways)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import httpx
from clients import DirectConn, KernelConn, Msg, RawConn, WsConn, WsProtocol
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.session import Session
from serverproc import JupyverseProcess, free_port, rss_mib

#: Seed of the deterministic, incompressible payloads: the kernel and the bench both build them.
PAYLOAD_SEED = 20240901
READY_ATTEMPTS = 20


class CheckFailed(Exception):
    """Data arrived wrong or incomplete: a correctness failure, not just a slow run."""


class BenchError(Exception):
    """A measurement could not be made (an error answer, a closed socket...)."""


@dataclass(frozen=True)
class Way:
    name: str
    kind: Literal["direct", "raw", "ws", "floor"]
    protocol: WsProtocol = "v1"
    deflate: bool = False


DIRECT = Way("direct", "direct")
RAW_ZMQ = Way("raw-zmq", "raw")
WS_V1 = Way("ws-v1", "ws", "v1")
WS_LEGACY = Way("ws-legacy", "ws", "legacy")
WS_V1_DEFLATE = Way("ws-v1+deflate", "ws", "v1", deflate=True)
WS_LEGACY_DEFLATE = Way("ws-legacy+deflate", "ws", "legacy", deflate=True)
BASIC_WAYS = (DIRECT, WS_V1, WS_LEGACY)
ALL_WAYS = (DIRECT, RAW_ZMQ, WS_V1, WS_LEGACY, WS_V1_DEFLATE, WS_LEGACY_DEFLATE)
#: bench/floor_bridge.py: the least a bridge does on this stack (workload a only)
WS_FLOOR = Way("ws-floor", "floor", "v1")
FLOOR_BRIDGE = Path(__file__).with_name("floor_bridge.py")


@dataclass(frozen=True)
class Sizes:
    executes: int = 200
    flood_lines: int = 20_000
    flush_lines: int = 5_000
    transfer_mib: int = 32
    fanout_clients: int = 10
    fanout_lines: int = 5_000
    concurrent_kernels: int = 10


def payload(size: int) -> bytes:
    return random.Random(PAYLOAD_SEED).randbytes(size)


# Run in the kernel before the comm workloads; registering a target again just replaces it.
KERNEL_SETUP = """
import hashlib as _bench_hashlib, random as _bench_random
if globals().get("_bench_blob_size") != {size}:
    _bench_blob = _bench_random.Random({seed}).randbytes({size})
    _bench_blob_size = {size}
    _bench_blob_sha = _bench_hashlib.sha256(_bench_blob).hexdigest()

def _bench_echo_target(comm, open_msg):
    comm.on_msg(lambda msg: comm.send(msg["content"]["data"], buffers=msg["buffers"]))

def _bench_source_target(comm, open_msg):
    comm.on_msg(lambda msg: comm.send({{"sha256": _bench_blob_sha}}, buffers=[_bench_blob]))

get_ipython().kernel.comm_manager.register_target("bench_echo", _bench_echo_target)
get_ipython().kernel.comm_manager.register_target("bench_source", _bench_source_target)
"""


@dataclass
class Bench:
    """What every measurement needs: the server, its kernel, the direct kernel, the sizes."""

    server: JupyverseProcess
    http: httpx.AsyncClient
    sizes: Sizes
    #: one kernel per WebSocket way, so that no way's traffic reaches another way's clients
    ws_kernels: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    direct_km: AsyncKernelManager | None = None
    #: the raw ZMQ way's kernel (its own, as every way has)
    raw_km: AsyncKernelManager | None = None
    managers: list[AsyncKernelManager] = field(default_factory=list)
    kernel_log: IO[bytes] | None = None
    transfer_payload: bytes = b""
    transfer_sha: str = ""
    #: floor bridges running (workload a): stopped by pid when their round ends, or at exit
    floors: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop_floors(self) -> None:
        for process in self.floors:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.floors.clear()

    # --- kernels ---------------------------------------------------------------------------

    async def start_direct_kernel(self) -> AsyncKernelManager:
        km = AsyncKernelManager(kernel_name="python3")
        # tracked before it starts, so a start cut short by a timeout is still cleaned up
        self.managers.append(km)
        out = self.kernel_log or subprocess.DEVNULL
        await km.start_kernel(stdout=out, stderr=out)
        return km

    @staticmethod
    def direct_client(km: AsyncKernelManager) -> DirectConn:
        """A client of its own, as every browser tab has its own WebSocket session.

        km.client() alone shares the manager's Session, whose id is also the shell socket's
        ZMQ identity: a second such client takes the first one's routing over.
        """
        session = Session(key=km.session.key, signature_scheme=km.session.signature_scheme)
        return DirectConn.open(km.client(session=session))

    async def stop_direct_kernel(self, km: AsyncKernelManager) -> None:
        if await km.is_alive():
            await km.shutdown_kernel(now=False)
        if km in self.managers:
            self.managers.remove(km)

    async def stop_stray_direct_kernels(self) -> None:
        """Every direct kernel but the shared ones goes (after a failed measurement)."""
        await self.stop_all_direct_kernels(keep=(self.direct_km, self.raw_km))

    async def stop_all_direct_kernels(
        self, keep: tuple[AsyncKernelManager | None, ...] = ()
    ) -> None:
        for km in [m for m in self.managers if m not in keep]:
            try:
                await asyncio.wait_for(km.shutdown_kernel(now=True), 15)
            except Exception as error:  # cleanup goes on whatever one kernel does
                print(f"  could not stop a direct kernel: {error!r}")
            self.managers.remove(km)

    async def post_kernel(self) -> str:
        response = await self.http.post("/api/kernels", json={"name": "python3"})
        if response.status_code != 201:
            raise BenchError(f"POST /api/kernels: {response.status_code} {response.text[:200]}")
        return str(response.json()["id"])

    async def delete_kernel(self, kernel_id: str) -> None:
        response = await self.http.delete(f"/api/kernels/{kernel_id}")
        if response.status_code not in (204, 404):
            raise BenchError(f"DELETE /api/kernels: {response.status_code} {response.text[:200]}")

    async def delete_stray_kernels(self) -> None:
        """Every server kernel but the shared one goes: a failed run must not leave any."""
        response = await self.http.get("/api/kernels")
        keep = set(self.ws_kernels.values())
        ids = [k["id"] for k in response.json() if k["id"] not in keep]
        await asyncio.gather(*(self.delete_kernel(i) for i in ids))

    # --- connections -----------------------------------------------------------------------

    async def connect(self, way: Way, index: int = 0) -> KernelConn:
        """Client number `index` of the kernel of `way`, known to receive iopub.

        A WebSocket client comes back with the same session_id every time, as JupyterLab
        does when it reconnects: the server keeps a closed connection's mailbox for a while
        (offline_buffer_seconds), and a new id per measurement would leave dozens of offline
        mailboxes fed with every message of the later measurements.
        """
        conn: KernelConn
        if way.kind == "direct":
            assert self.direct_km is not None
            conn = self.direct_client(self.direct_km)
        elif way.kind == "raw":
            assert self.raw_km is not None
            conn = RawConn(self.raw_km.get_connection_info(session=False))
        else:
            conn = await WsConn.open(
                self.server.ws_url,
                self.ws_kernels[way.name],
                way.protocol,
                way.deflate,
                session=f"bench-{self.run_id}-{way.name}-{index}",
            )
        try:
            await ensure_iopub(conn)
        except BaseException:
            await conn.close()
            raise
        return conn


async def ensure_iopub(conn: KernelConn) -> None:
    """kernel_info until its reply and its iopub status arrive.

    A ZMQ SUB socket misses what is published before its subscription reaches the kernel,
    so the direct clients need this before anything is measured; it costs the WebSocket
    ways one round trip.
    """
    for _ in range(READY_ATTEMPTS):
        msg_id = await conn.send("shell", "kernel_info_request", {})
        try:
            # a kernel still starting answers within its startup_timeout (60 s)
            await asyncio.wait_for(conn.reply_to(msg_id), 90)
        except asyncio.TimeoutError:
            raise BenchError("no kernel_info_reply within 90 s") from None
        try:
            await asyncio.wait_for(iopub_until_idle(conn, msg_id), 1.0)
            return
        except asyncio.TimeoutError:
            continue
    raise BenchError("iopub never delivered the status of a kernel_info_request")


async def iopub_until_idle(conn: KernelConn, parent_id: str) -> list[Msg]:
    """The iopub messages caused by `parent_id`, up to and including its idle status."""
    got = []
    while True:
        msg = await conn.next_iopub()
        if msg.parent_id != parent_id:
            continue
        got.append(msg)
        if msg.msg_type == "status" and msg.content.get("execution_state") == "idle":
            return got


async def iopub_comm_msg(conn: KernelConn, comm_id: str) -> Msg:
    while True:
        msg = await conn.next_iopub()
        if msg.msg_type == "comm_msg" and msg.content.get("comm_id") == comm_id:
            return msg


def execute_content(code: str) -> dict[str, Any]:
    return {"code": code, "silent": False, "store_history": True, "allow_stdin": False}


async def run_cell(conn: KernelConn, code: str) -> list[Msg]:
    """Execute and wait for both the execute_reply and the idle status."""
    msg_id = await conn.send("shell", "execute_request", execute_content(code))
    msgs = await iopub_until_idle(conn, msg_id)
    reply = await conn.reply_to(msg_id)
    if reply.content.get("status") != "ok":
        raise BenchError(f"cell failed: {reply.content.get('evalue') or reply.content}")
    return msgs


def stream_text(msgs: list[Msg], name: str = "stdout") -> str:
    return "".join(
        m.content.get("text", "")
        for m in msgs
        if m.msg_type == "stream" and m.content.get("name") == name
    )


def check_lines(text: str, count: int, who: str = "") -> None:
    expected = "".join(f"{i}\n" for i in range(count))
    if text == expected:
        return
    got = text.splitlines()
    first_bad = next((i for i, line in enumerate(got) if line != str(i)), min(len(got), count))
    raise CheckFailed(
        f"{who}got {len(got)} of {count} lines, first wrong or missing line is #{first_bad}"
    )


# --- a. execute round trip ---------------------------------------------------------------


async def roundtrip(bench: Bench, ways: tuple[Way, ...]) -> dict[str, dict[str, float]]:
    """One round of every way at once: fresh kernels, then `executes` iterations that each
    time one round trip per way, the ways in turn (a drift of the machine's speed hits every
    way alike); each way's median, in ms.

    Fresh kernels every round: two kernels started alike run `pass` at speeds a few per cent
    apart for their whole life (measured: 4-7 %), which a comparison within 5 % cannot keep.
    """
    started = await asyncio.gather(
        *(_fresh_kernel(bench, way) for way in ways), return_exceptions=True
    )
    kernels = [k for k in started if isinstance(k, _Fresh)]
    conns: list[KernelConn] = []
    try:
        for error in started:
            if isinstance(error, BaseException):
                raise error
        for way, kernel in zip(ways, kernels, strict=True):
            conns.append(await _connect_fresh(bench, way, kernel))
        for _ in range(10):  # warm the paths up; not measured
            for conn in conns:
                await run_cell(conn, "pass")
        times: list[list[float]] = [[] for _ in ways]
        for i in range(bench.sizes.executes):
            for k in range(len(ways)):
                index = (i + k) % len(ways)
                start = time.perf_counter()
                await run_cell(conns[index], "pass")
                times[index].append(time.perf_counter() - start)
    finally:
        for conn in conns:
            await conn.close()
        await asyncio.gather(*(_drop_kernel(bench, kernel) for kernel in kernels))
    return {
        way.name: {"rtt_ms": statistics.median(t) * 1000}
        for way, t in zip(ways, times, strict=True)
    }


@dataclass
class _Fresh:
    """A kernel of one round: on the server (`kernel_id`), or direct (`km`), then maybe
    behind the floor bridge (`floor`, on `port`)."""

    kernel_id: str = ""
    km: AsyncKernelManager | None = None
    floor: subprocess.Popen[bytes] | None = None
    port: int = 0


async def _fresh_kernel(bench: Bench, way: Way) -> _Fresh:
    if way.kind == "ws":
        return _Fresh(kernel_id=await bench.post_kernel())
    fresh = _Fresh(km=await bench.start_direct_kernel())
    if way.kind == "floor":
        assert fresh.km is not None
        fresh.port = free_port()
        command = [sys.executable, str(FLOOR_BRIDGE), str(fresh.port), fresh.km.connection_file]
        out = bench.kernel_log or subprocess.DEVNULL
        fresh.floor = subprocess.Popen(command, stdout=out, stderr=out)
        bench.floors.append(fresh.floor)
    return fresh


async def _connect_fresh(bench: Bench, way: Way, fresh: _Fresh) -> KernelConn:
    conn: KernelConn
    if fresh.kernel_id:
        conn = await WsConn.open(bench.server.ws_url, fresh.kernel_id, way.protocol, way.deflate)
    elif fresh.floor is not None:
        conn = await _floor_conn(fresh)
    elif way.kind == "raw":
        assert fresh.km is not None
        conn = RawConn(fresh.km.get_connection_info(session=False))
    else:
        assert fresh.km is not None
        conn = bench.direct_client(fresh.km)
    try:
        await ensure_iopub(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


async def _floor_conn(fresh: _Fresh) -> KernelConn:
    """A v1 client of the floor bridge, once it listens (it starts in about a second)."""
    assert fresh.floor is not None
    for _ in range(300):
        if fresh.floor.poll() is not None:
            raise BenchError(f"the floor bridge exited ({fresh.floor.returncode})")
        try:
            return await WsConn.open(f"ws://127.0.0.1:{fresh.port}", "floor", "v1", False)
        except OSError:
            await asyncio.sleep(0.1)
    raise BenchError("the floor bridge did not listen within 30 s")


async def _drop_kernel(bench: Bench, fresh: _Fresh) -> None:
    if fresh.floor is not None:
        fresh.floor.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(fresh.floor.wait), 10)
        except asyncio.TimeoutError:
            fresh.floor.kill()
            await asyncio.to_thread(fresh.floor.wait, 10)
        bench.floors.remove(fresh.floor)
    if fresh.kernel_id:
        await bench.delete_kernel(fresh.kernel_id)
    elif fresh.km is not None:
        await bench.stop_direct_kernel(fresh.km)


# --- b. output flood ---------------------------------------------------------------------


async def _flood(bench: Bench, way: Way, lines: int, flush: bool) -> dict[str, float]:
    code = f"for i in range({lines}): print(i{', flush=True' if flush else ''})"
    conn = await bench.connect(way)
    try:
        start = time.perf_counter()
        msgs = await run_cell(conn, code)
        elapsed = time.perf_counter() - start
    finally:
        await conn.close()
    check_lines(stream_text(msgs), lines)
    count = len(msgs) + 1  # the iopub messages and the execute_reply
    return {"lines_per_s": lines / elapsed, "msgs_per_s": count / elapsed, "msgs": count}


async def flood(bench: Bench, way: Way) -> dict[str, float]:
    return await _flood(bench, way, bench.sizes.flood_lines, flush=False)


async def flood_flush(bench: Bench, way: Way) -> dict[str, float]:
    return await _flood(bench, way, bench.sizes.flush_lines, flush=True)


# --- c. and d. 32 MiB over a comm --------------------------------------------------------


async def _prepare_comm(bench: Bench, conn: KernelConn, target: str) -> str:
    """Define the comm targets in the kernel and open a comm to `target`; its comm_id."""
    size = len(bench.transfer_payload)
    await run_cell(conn, KERNEL_SETUP.format(size=size, seed=PAYLOAD_SEED))
    comm_id = uuid.uuid4().hex
    content = {"comm_id": comm_id, "target_name": target, "data": {}}
    open_id = await conn.send("shell", "comm_open", content)
    # the comm exists in the kernel once its comm_open has been handled
    await iopub_until_idle(conn, open_id)
    return comm_id


async def _close_comm(conn: KernelConn, comm_id: str) -> None:
    await conn.send("shell", "comm_close", {"comm_id": comm_id, "data": {}})


def _check_buffer(msg: Msg, expected_sha: str) -> None:
    if not msg.buffers:
        raise CheckFailed("the comm message came back without its buffer")
    digest = hashlib.sha256(msg.buffers[0]).hexdigest()
    if digest != expected_sha:
        raise CheckFailed(
            f"sha256 mismatch: got {digest[:16]}… ({len(msg.buffers[0])} bytes), "
            f"expected {expected_sha[:16]}…"
        )


async def echo(bench: Bench, way: Way) -> dict[str, float]:
    conn = await bench.connect(way)
    try:
        comm_id = await _prepare_comm(bench, conn, "bench_echo")
        tag = uuid.uuid4().hex
        start = time.perf_counter()
        await conn.send(
            "shell",
            "comm_msg",
            {"comm_id": comm_id, "data": {"tag": tag}},
            [bench.transfer_payload],
        )
        reply = await iopub_comm_msg(conn, comm_id)
        elapsed = time.perf_counter() - start
        _check_buffer(reply, bench.transfer_sha)
        if reply.content.get("data", {}).get("tag") != tag:
            raise CheckFailed("the echo carries another message's data")
        await _close_comm(conn, comm_id)
    finally:
        await conn.close()
    return {"mib_per_s": len(bench.transfer_payload) / 2**20 / elapsed}


async def kernel_to_client(bench: Bench, way: Way) -> dict[str, float]:
    conn = await bench.connect(way)
    try:
        comm_id = await _prepare_comm(bench, conn, "bench_source")
        start = time.perf_counter()
        await conn.send("shell", "comm_msg", {"comm_id": comm_id, "data": {"send": True}})
        msg = await iopub_comm_msg(conn, comm_id)
        elapsed = time.perf_counter() - start
        _check_buffer(msg, bench.transfer_sha)
        if msg.content.get("data", {}).get("sha256") != bench.transfer_sha:
            raise CheckFailed("the kernel's payload is not the one the bench expects")
        await _close_comm(conn, comm_id)
    finally:
        await conn.close()
    return {"mib_per_s": len(bench.transfer_payload) / 2**20 / elapsed}


# --- e. one kernel, many clients ---------------------------------------------------------


async def fanout(bench: Bench, way: Way) -> dict[str, float]:
    lines, clients = bench.sizes.fanout_lines, bench.sizes.fanout_clients
    conns: list[KernelConn] = []
    try:
        for index in range(clients):
            conns.append(await bench.connect(way, index))
        runner = conns[0]
        start = time.perf_counter()
        msg_id = await runner.send(
            "shell",
            "execute_request",
            execute_content(f"for i in range({lines}): print(i, flush=True)"),
        )
        received = await asyncio.gather(*(iopub_until_idle(c, msg_id) for c in conns))
        await runner.reply_to(msg_id)
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    for index, msgs in enumerate(received):
        check_lines(stream_text(msgs), lines, who=f"client {index}: ")
    delivered = sum(len(msgs) for msgs in received)
    return {
        "msgs_per_s": delivered / elapsed,
        "lines_per_s": clients * lines / elapsed,
        "msgs": delivered,
    }


# --- f. session start --------------------------------------------------------------------


async def _ws_kernel_info(bench: Bench, way: Way, kernel_id: str) -> KernelConn:
    conn = await WsConn.open(bench.server.ws_url, kernel_id, way.protocol, way.deflate)
    try:
        await kernel_info(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


async def _direct_ready(bench: Bench) -> tuple[AsyncKernelManager, DirectConn]:
    """Start a kernel and wait for its first kernel_info_reply.

    Not client.wait_for_ready(): after the reply it also waits up to 0.2 s for an iopub
    message and starts over without one, which costs ~0.2 s per start on its own and is not
    part of what the WebSocket ways measure.
    """
    km = await bench.start_direct_kernel()
    conn = bench.direct_client(km)
    try:
        await kernel_info(conn)
    except BaseException:
        await conn.close()
        raise
    return km, conn


async def kernel_info(conn: KernelConn, retry: float = 1.0) -> Msg:
    """A kernel_info_reply, asking again every `retry` s (a kernel still starting may miss one)."""
    while True:
        msg_id = await conn.send("shell", "kernel_info_request", {})
        try:
            return await asyncio.wait_for(conn.reply_to(msg_id), retry)
        except asyncio.TimeoutError:
            continue


async def session_start(bench: Bench, way: Way) -> dict[str, float]:
    if way.kind == "direct":
        return await _direct_start(bench)
    return await _session_start(bench, way)


async def _direct_start(bench: Bench) -> dict[str, float]:
    start = time.perf_counter()
    km, conn = await _direct_ready(bench)
    elapsed = time.perf_counter() - start
    await conn.close()
    await bench.stop_direct_kernel(km)
    return {"seconds": elapsed}


async def _session_start(bench: Bench, way: Way) -> dict[str, float]:
    body = {
        "path": f"bench/{uuid.uuid4().hex}.ipynb",
        "type": "notebook",
        "name": "bench.ipynb",
        "kernel": {"name": "python3"},
    }
    start = time.perf_counter()
    response = await bench.http.post("/api/sessions", json=body)
    if response.status_code != 201:
        raise BenchError(f"POST /api/sessions: {response.status_code} {response.text[:200]}")
    session = response.json()
    try:
        conn = await _ws_kernel_info(bench, way, session["kernel"]["id"])
        elapsed = time.perf_counter() - start
        await conn.close()
    finally:
        await bench.http.delete(f"/api/sessions/{session['id']}")
    return {"seconds": elapsed}


# --- g. many kernels at once -------------------------------------------------------------


async def concurrent_starts(bench: Bench, way: Way) -> dict[str, float]:
    count = bench.sizes.concurrent_kernels
    if way.kind == "direct":
        start = time.perf_counter()
        results = await asyncio.gather(*(_direct_ready(bench) for _ in range(count)))
        elapsed = time.perf_counter() - start
        for _, conn in results:
            await conn.close()
        await asyncio.gather(*(bench.stop_direct_kernel(km) for km, _ in results))
        return {"seconds": elapsed}

    async def one() -> KernelConn:
        return await _ws_kernel_info(bench, way, await bench.post_kernel())

    try:
        start = time.perf_counter()
        conns = await asyncio.gather(*(one() for _ in range(count)))
        elapsed = time.perf_counter() - start
        await asyncio.gather(*(c.close() for c in conns))
    finally:
        await bench.delete_stray_kernels()
    return {"seconds": elapsed}


# --- server memory -----------------------------------------------------------------------


async def server_memory(bench: Bench, kernels: int) -> dict[str, float]:
    """RSS with no kernel (after one kernel came and went), then with `kernels` idle ones."""
    fresh = rss_mib(bench.server.pid)
    # A first kernel imports and allocates what any kernel needs once; not a per-kernel cost.
    warm = await bench.post_kernel()
    conn = await _ws_kernel_info(bench, WS_V1, warm)
    await conn.close()
    await bench.delete_kernel(warm)
    await asyncio.sleep(1)
    empty = rss_mib(bench.server.pid)
    ids = await asyncio.gather(*(bench.post_kernel() for _ in range(kernels)))
    await asyncio.sleep(2)  # let them settle into idle
    loaded = rss_mib(bench.server.pid)
    await asyncio.gather(*(bench.delete_kernel(i) for i in ids))
    return {
        "rss_fresh_mib": fresh,
        "rss_0_kernels_mib": empty,
        "rss_n_kernels_mib": loaded,
        "mib_per_kernel": (loaded - empty) / kernels,
    }


Measure = Callable[[Bench, Way], Awaitable[dict[str, float]]]
#: Measures every way in one go (interleaved): the metrics of each way, by its name.
MeasureWays = Callable[[Bench, tuple[Way, ...]], Awaitable[dict[str, dict[str, float]]]]
