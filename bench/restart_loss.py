"""Lines of a running cell lost (and duplicated) across a jupyverse stop and start.

    python bench/restart_loss.py --set kernels.persist=true              # SIGTERM, keeper on
    python bench/restart_loss.py --set kernels.persist=true --kill       # SIGKILL
    python bench/restart_loss.py --set kernels.persist=true --no-keeper  # kernels left alone
    python bench/restart_loss.py                                         # today's default

A script, not a test. Each round: start this project's jupyverse (`asphalt run`, in a temp
dir, its own runtime dir) with the `--set kernels.NAME=VALUE` options given (and
`kernels.persist_keeper` from --keeper/--no-keeper when persistence is on), make a session,
open the kernel WebSocket with a session_id, run a cell printing a numbered line every
--interval s for --seconds s, and once --stop-after lines arrived, stop the server (SIGTERM,
or SIGKILL with --kill), start it again on the same port and runtime dir, reconnect with the
same session_id and collect lines until the cell's execute_reply and idle status. The report
gives, per round: lines lost, duplicated, out of order, whether the reply came, the restart
window; a server that gave the kernel up reports the cell lost.

Everything it starts is stopped by pid: the kernels are shut down through the API before the
last stop, and any ipykernel or keeper process left with our runtime dir on its command line
is killed and reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import yaml
from serverproc import JupyverseProcess, kill_leftovers
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Subprotocol

V1 = Subprotocol("v1.kernel.websocket.jupyter.org")


# --- the server, with options ----------------------------------------------------------------


class OptionsJupyverse(JupyverseProcess):
    """This project's jupyverse with `kernels.*` options and a generous start timeout."""

    def __init__(self, home: Path, kernel_options: dict[str, Any]) -> None:
        super().__init__(home, prefix="restart")
        self.kernel_options = kernel_options

    def command(self) -> list[str]:
        argv = super().command()
        config_file = self.home / "config.yaml"
        config = yaml.safe_load(config_file.read_text())
        config["start_timeout"] = 120  # the stack's imports on a loaded machine
        config["component"]["components"]["kernels"].update(self.kernel_options)
        config_file.write_text(yaml.safe_dump(config))
        return argv

    def halt(self, kill: bool) -> float:
        """Stop it as asked; returns when the signal was sent (monotonic)."""
        assert self.process is not None
        sent = time.monotonic()
        if kill:
            self.process.kill()
            self.process.wait(30)
        self.stop()  # SIGTERM and wait (a killed one is only reaped)
        return sent


def parse_sets(values: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("kernels."):
            raise SystemExit(f"--set {item!r}: expected kernels.NAME=VALUE")
        options[name.removeprefix("kernels.")] = yaml.safe_load(value)
    return options


# --- a minimal v1 WebSocket client -----------------------------------------------------------


def v1_encode(channel: str, parts: list[bytes]) -> bytes:
    pieces = [channel.encode(), *parts]
    offsets = [8 * (len(pieces) + 2)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + b"".join(pieces)


def v1_decode(frame: bytes) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    (count,) = struct.unpack_from("<Q", frame)
    offsets = struct.unpack_from(f"<{count}Q", frame, 8)
    pieces = [frame[offsets[i] : offsets[i + 1]] for i in range(count - 1)]
    header, parent, _metadata, content = (json.loads(p) for p in pieces[1:5])
    return pieces[0].decode(), header, parent, content


async def open_ws(server: OptionsJupyverse, kernel_id: str, session_id: str) -> ClientConnection:
    url = f"{server.ws_url}/api/kernels/{kernel_id}/channels?session_id={session_id}"
    # A server that does not know the kernel may accept the socket without a subprotocol and
    # close it at once, with its reason: the caller reads it.
    return await connect(url, subprotocols=[V1], max_size=None, open_timeout=30, ping_interval=None)


async def execute(ws: ClientConnection, session_id: str, code: str) -> str:
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": "execute_request",
        "session": session_id,
        "username": "bench",
        "date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        "version": "5.4",
    }
    content = {"code": code, "silent": False, "store_history": True, "allow_stdin": False}
    parts = [json.dumps(p).encode() for p in (header, {}, {}, content)]
    await ws.send(v1_encode("shell", parts))
    return str(header["msg_id"])


# --- one round --------------------------------------------------------------------------------


@dataclass
class Round:
    lines: list[int] = field(default_factory=list)  # every numbered line received, in order
    before: int = 0  # lines received before the stop
    replied: bool = False
    idle: bool = False
    window: float = 0.0  # seconds from the stop signal to the server answering again
    notices: list[str] = field(default_factory=list)  # what the server said about the cell
    failure: str = ""


class Collector:
    """Reads one WebSocket and files what belongs to the cell."""

    def __init__(self, result: Round, msg_id: str) -> None:
        self.result = result
        self.msg_id = msg_id
        self.partial = ""

    def take(self, frame: bytes | str) -> None:
        if isinstance(frame, str):
            return  # the v1 protocol sends binary frames only
        channel, header, parent, content = v1_decode(frame)
        kind = header.get("msg_type")
        if parent.get("msg_id") != self.msg_id:
            return
        if kind == "stream" and content.get("name") == "stdout":
            text = self.partial + content.get("text", "")
            *complete, self.partial = text.split("\n")
            for line in complete:
                if line.strip().isdigit():
                    self.result.lines.append(int(line))
                elif line.strip():
                    self.result.notices.append(line.strip())
        elif kind == "stream" or kind == "error":
            self.result.notices.append(str(content.get("text") or content.get("evalue"))[:200])
        elif channel == "shell" and kind == "execute_reply":
            self.result.replied = True
        elif kind == "status" and content.get("execution_state") == "idle":
            self.result.idle = True


async def one_round(server: OptionsJupyverse, args: argparse.Namespace) -> Round:
    result = Round()
    count = round(args.seconds / args.interval)
    code = (
        f"import time\nfor i in range({count}):\n"
        f"    print(i, flush=True)\n    time.sleep({args.interval})"
    )
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post(
            "/api/sessions",
            json={
                "path": f"restart-{uuid.uuid4().hex[:8]}.ipynb",
                "type": "notebook",
                "name": "",
                "kernel": {"name": "python3"},
            },
        )
        response.raise_for_status()
        kernel_id = response.json()["kernel"]["id"]
    session_id = uuid.uuid4().hex
    ws = await open_ws(server, kernel_id, session_id)
    if ws.subprotocol != V1:
        raise RuntimeError("the server did not take the v1 subprotocol")
    msg_id = await execute(ws, session_id, code)
    collector = Collector(result, msg_id)
    deadline = time.monotonic() + args.seconds + 120
    while len(result.lines) < args.stop_after:
        collector.take(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
    result.before = len(result.lines)
    sent = await asyncio.to_thread(server.halt, args.kill)
    try:
        await ws.close()
    except ConnectionClosed:
        pass
    await asyncio.sleep(args.down)  # a longer outage, as an upgrade may take
    await asyncio.to_thread(server.start, 120)
    result.window = time.monotonic() - sent
    try:
        ws = await open_ws(server, kernel_id, session_id)
    except InvalidStatus as error:
        result.failure = f"reconnecting: HTTP {error.response.status_code} (the kernel is gone)"
        return result
    try:
        while not (result.replied and result.idle):
            collector.take(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
    except ConnectionClosed as error:
        close = error.rcvd
        result.failure = f"the WebSocket closed: {close if close else 'no close frame'}"
    except asyncio.TimeoutError:
        result.failure = "no execute_reply and idle status before the deadline"
    finally:
        await ws.close()
    return result


def report(result: Round, count: int) -> str:
    seen = set(result.lines)
    lost = [i for i in range(count) if i not in seen]
    duplicated = len(result.lines) - len(seen)
    disorder = sum(1 for a, b in zip(result.lines, result.lines[1:], strict=False) if b < a)
    text = (
        f"lines {count}: received {len(seen)} (before the stop {result.before}), "
        f"lost {len(lost)}, duplicated {duplicated}, out of order {disorder}; "
        f"reply {'yes' if result.replied else 'NO'}, idle {'yes' if result.idle else 'NO'}; "
        f"restart window {result.window:.1f} s"
    )
    if lost:
        text += f"\n  lost: {compress(lost)}"
    if result.failure:
        text += f"\n  CELL LOST: {result.failure}"
    for notice in result.notices:
        text += f"\n  notice: {notice}"
    return text


def compress(numbers: list[int]) -> str:
    spans: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(f"{start}" if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(spans)


def leftovers(runtime_dir: Path) -> list[int]:
    """Pids of keeper processes of our runtime dir still running."""
    marker = str(runtime_dir).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"fps_kernels.persist.keeper" in argv and marker in argv:
            pids.append(int(proc.name))
    return pids


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="kernels.NAME=VALUE")
    parser.add_argument(
        "--keeper",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="kernels.persist_keeper (when kernels.persist is on)",
    )
    parser.add_argument("--kill", action="store_true", help="SIGKILL the server, not SIGTERM")
    parser.add_argument("--seconds", type=float, default=12.0, help="the cell's length")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between lines")
    parser.add_argument("--stop-after", type=int, default=10, help="lines before the stop")
    parser.add_argument("--down", type=float, default=0.0, help="seconds between stop and start")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    options = parse_sets(args.set)
    if args.keeper is not None:
        options["persist_keeper"] = args.keeper
    count = round(args.seconds / args.interval)
    if not 0 < args.stop_after < count:
        raise SystemExit(f"--stop-after must be between 1 and {count - 1}")
    home = Path(tempfile.mkdtemp(prefix="restart-loss-"))
    server = OptionsJupyverse(home, options)
    failures = 0
    print(
        f"options {options or '(defaults)'}; {'SIGKILL' if args.kill else 'SIGTERM'}; "
        f"a line every {args.interval} s for {args.seconds} s; temp dir {home}"
    )
    try:
        server.start(120)
        for number in range(1, args.rounds + 1):
            result = await one_round(server, args)
            failures += bool(result.failure) or len(set(result.lines)) < count
            print(f"round {number}: {report(result, count)}", flush=True)
            if server.process is None:
                server.start(120)
    finally:
        if server.process is not None:
            try:
                with httpx.Client(base_url=server.url, timeout=60) as http:
                    for kernel in http.get("/api/kernels").json():
                        http.delete(f"/api/kernels/{kernel['id']}")
            except httpx.HTTPError as error:
                print(f"could not shut the kernels down: {error}")
            server.stop()
        killed = kill_leftovers([server.runtime_dir])
        for pid in leftovers(server.runtime_dir):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        if killed:
            print(f"FAILURE: processes left behind and killed: {killed}")
            failures += 1
        problems = server.log_problems()
        if problems:
            print("server log problems:\n  " + "\n  ".join(problems[-20:]))
        if args.keep:
            print(f"kept {home}")
        else:
            import shutil

            shutil.rmtree(home, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
