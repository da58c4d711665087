"""Lines lost in a flood of flushed prints on a loaded machine, and where they are lost.

    python bench/loss.py                      # 3 rounds, 20,000 lines, 5 busy processes
    python bench/loss.py --rounds 5 --load 6 --ways ws-v1,ws-legacy,direct

Every way gets a kernel of its own, started through jupyverse. For each round the flood
`for i in range(N): print(i, flush=True)` runs on each way's kernel while `--load` busy
Python processes (started and stopped by this script, by pid) compete for the CPU. Next to
each kernel, a probe process subscribes to the kernel's iopub with a plain ZMQ SUB socket
(RCVHWM 0) and records the msg_id counters of what the kernel published: lines the probe saw
but the client did not were lost after the kernel (server or client); lines neither saw were
dropped by the kernel itself (its XPUB socket, SNDHWM 1000 per subscriber).

Ways: `ws-v1`, `ws-legacy` (this project's WebSocket) and `direct` (jupyter_client's
AsyncKernelClient straight to the kernel's ZMQ sockets, its iopub SUB at ZMQ's default
RCVHWM of 1000).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from clients import DirectConn, KernelConn, WsConn
from jupyter_client.asynchronous.client import AsyncKernelClient
from serverproc import JupyverseProcess, kill_leftovers
from workloads import ensure_iopub

NOTICE = re.compile(r"\[fps_kernels\] .*?(\d+) output message")


# --- the probe (a process of its own, so that it never competes for the bench's GIL) ------


def probe_main(connection_file: str) -> None:
    """Print one JSON line per finished execute_request: what the kernel published for it."""
    import zmq

    info = json.loads(Path(connection_file).read_text())
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(f"{info['transport']}://{info['ip']}:{info['iopub_port']}")
    cells: dict[str, dict[str, Any]] = {}
    print(json.dumps({"ready": True}), flush=True)
    while True:
        frames = sock.recv_multipart()
        try:
            start = frames.index(b"<IDS|MSG>")
        except ValueError:
            continue
        header, parent = json.loads(frames[start + 2]), json.loads(frames[start + 3])
        parent_id = parent.get("msg_id")
        if parent.get("msg_type") != "execute_request" or not parent_id:
            continue
        cell = cells.setdefault(parent_id, {"lines": 0, "counters": []})
        cell["counters"].append(int(str(header["msg_id"]).rsplit("_", 1)[1]))
        msg_type = header.get("msg_type")
        if msg_type == "stream":
            cell["lines"] += json.loads(frames[start + 5])["text"].count("\n")
        elif msg_type == "status":
            if json.loads(frames[start + 5]).get("execution_state") == "idle":
                counters = sorted(cell.pop("counters"))
                span = counters[-1] - counters[0] + 1
                print(
                    json.dumps(
                        {
                            "parent": parent_id,
                            "lines": cell["lines"],
                            # counters in the cell's span the probe never saw: the execute_reply
                            # (on shell) takes one, the rest were dropped before the probe
                            "unseen": span - len(counters),
                        }
                    ),
                    flush=True,
                )
                del cells[parent_id]


class Probe:
    def __init__(self, connection_file: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--probe", str(connection_file)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.results: dict[str, dict[str, Any]] = {}

    def wait_ready(self) -> None:
        assert self.process.stdout is not None
        json.loads(self.process.stdout.readline())

    async def result(self, parent: str, timeout: float = 60) -> dict[str, Any]:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while parent not in self.results:
            if time.monotonic() > deadline:
                raise TimeoutError("the probe saw no end of the cell")
            line = await asyncio.to_thread(self.process.stdout.readline)
            if not line:
                raise RuntimeError("the probe exited")
            data = json.loads(line)
            self.results[data["parent"]] = data
        return self.results.pop(parent)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


# --- the flood ----------------------------------------------------------------------------


@dataclass
class Round:
    way: str
    received: int
    notices: int  # lines the server said it dropped (kernel-side gap notices, queue drops)
    probe_lines: int
    probe_unseen: int
    seconds: float

    def line(self, lines: int) -> str:
        return (
            f"  {self.way:10} received {self.received:>6}/{lines}"
            f"  lost {lines - self.received:>5}  told {self.notices:>5}"
            f"  | probe saw {self.probe_lines:>6}, counters unseen {self.probe_unseen - 1:>5}"
            f"  | {self.seconds:5.1f} s"
        )


@dataclass
class Received:
    numbers: list[int]
    notices: int = 0


async def start_flood(conn: KernelConn, lines: int) -> str:
    return await conn.send(
        "shell",
        "execute_request",
        {
            "code": f"for i in range({lines}): print(i, flush=True)",
            "silent": False,
            "store_history": False,
            "allow_stdin": False,
        },
    )


async def read_flood(conn: KernelConn, msg_id: str, into: Received) -> None:
    """Collect the cell's lines until its idle status (which the client may never get)."""
    while True:
        msg = await conn.next_iopub()
        if msg.parent_id != msg_id:
            continue
        if msg.msg_type == "stream":
            if msg.content["name"] == "stdout":
                into.numbers.extend(int(n) for n in msg.content["text"].split())
            else:
                into.notices += sum(int(n) for n in NOTICE.findall(msg.content["text"]))
        elif msg.msg_type == "status" and msg.content["execution_state"] == "idle":
            return


async def flood(
    conn: KernelConn,
    probe: Probe,
    lines: int,
    grace: float,
    stop_server: tuple[int, float] | None = None,
) -> tuple[Received, dict[str, Any]]:
    """Run the flood; what the client received, and what the probe saw the kernel publish.

    The client gets `grace` seconds after the probe saw the cell end (a client that lost
    the idle status would wait forever). With `stop_server` (pid, seconds), the server is
    frozen that long, half a second into the flood.
    """
    msg_id = await start_flood(conn, lines)
    got = Received([])
    reader = asyncio.ensure_future(read_flood(conn, msg_id, got))
    if stop_server is not None:
        pid, seconds = stop_server
        await asyncio.sleep(0.5)
        # the server gets no CPU at all for a while: its ZMQ I/O thread stops reading too
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
    seen = await probe.result(msg_id, timeout=600)
    done, _ = await asyncio.wait({reader}, timeout=grace)
    if not done:
        reader.cancel()
        print("  (the client never got the idle status)")
    numbers = got.numbers
    if numbers != sorted(numbers) or len(set(numbers)) != len(numbers):
        raise RuntimeError("lines out of order or duplicated")
    return got, seen


def busy_processes(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


async def main_async(args: argparse.Namespace) -> int:
    home = Path(tempfile.mkdtemp(prefix="fps-loss-"))
    server = JupyverseProcess(home)
    server.start()
    load: list[subprocess.Popen[bytes]] = []
    probes: dict[str, Probe] = {}
    conns: dict[str, KernelConn] = {}
    totals: dict[str, list[Round]] = {}
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            for way in args.ways:
                response = await http.post("/api/kernels", json={"name": "python3"})
                kernel_id = response.json()["id"]
                connection_file = server.runtime_dir / f"kernel-{kernel_id}.json"
                probes[way] = Probe(connection_file)
                if way == "direct":
                    client = AsyncKernelClient(connection_file=str(connection_file))
                    client.load_connection_file()
                    conns[way] = DirectConn.open(client)
                else:
                    protocol = "v1" if way == "ws-v1" else "legacy"
                    conns[way] = await WsConn.open(server.ws_url, kernel_id, protocol, False)  # type: ignore[arg-type]
                await ensure_iopub(conns[way])
                probes[way].wait_ready()
            load = busy_processes(args.load)
            print(f"{args.load} busy processes; waiting {args.settle} s for the load to rise")
            await asyncio.sleep(args.settle)
            for number in range(1, args.rounds + 1):
                print(f"round {number}, load average {os.getloadavg()[0]:.1f}", flush=True)
                for way in args.ways:
                    start = time.monotonic()
                    stop = (server.pid, args.stop_server) if args.stop_server else None
                    got, seen = await flood(conns[way], probes[way], args.lines, args.grace, stop)
                    seconds = time.monotonic() - start
                    result = Round(
                        way,
                        len(got.numbers),
                        got.notices,
                        seen["lines"],
                        seen["unseen"],
                        seconds,
                    )
                    totals.setdefault(way, []).append(result)
                    print(result.line(args.lines), flush=True)
            print("\nlost lines per round:")
            for way, rounds in totals.items():
                lost = [args.lines - r.received for r in rounds]
                told = [r.notices for r in rounds]
                print(f"  {way:10} lost {lost}, told {told}")
    finally:
        for process in load:
            process.kill()
            process.wait()
        for conn in conns.values():
            await conn.close()
        for probe in probes.values():
            probe.stop()
        server.stop()
        kill_leftovers([server.runtime_dir])
        problems = server.log_problems()
        if problems:
            print("\nserver log warnings:\n  " + "\n  ".join(problems[-20:]))
    return 0


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        probe_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--load", type=int, default=5, help="busy processes")
    parser.add_argument("--settle", type=float, default=20, help="seconds before round 1")
    parser.add_argument(
        "--stop-server",
        type=float,
        default=0,
        help="SIGSTOP the server for this many seconds during each flood (a kernel-side drop)",
    )
    parser.add_argument("--grace", type=float, default=30, help="seconds after the kernel's end")
    parser.add_argument("--ways", type=lambda s: s.split(","), default=["ws-v1", "ws-legacy"])
    sys.exit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
