"""Benchmark h: how long `POST /api/sessions` (a new kernel) takes, jupyverse vs jupyter_server.

Starts this project's jupyverse and a jupyter_server (from the same venv, same python3
kernelspec) on free 127.0.0.1 ports, then, round by round and alternating which goes first,
makes one new notebook session on each as JupyterLab does (`POST /api/sessions`, then two
`PATCH`es), timing the POST and the three; waits for that kernel to answer kernel_info over a
WebSocket (so that its start does not slow the next measurement), and deletes the session.
Prints the medians and the POST's ratio jupyverse/jupyter_server (target: <= 1.5x). See
bench/README.md.

    python bench/session_post.py              # 15 rounds
    python bench/session_post.py --rounds 30
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from clients import WsConn
from serverproc import JupyverseProcess, ServerProcess, kill_leftovers

TARGET = 1.5


class JupyterServerProcess(ServerProcess):
    """`python -m jupyter_server` on a free 127.0.0.1 port, no token, stopped by its pid."""

    name = "jupyter_server"

    def __init__(self, home: Path) -> None:
        super().__init__(home, prefix="js")

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "jupyter_server",
            f"--ServerApp.port={self.port}",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.token=",
            "--ServerApp.open_browser=False",
            "--ServerApp.allow_root=True",
            "--ServerApp.disable_check_xsrf=True",
            f"--ServerApp.root_dir={self.cwd}",
        ]


async def post_session(http: httpx.AsyncClient) -> tuple[float, float, dict[str, object]]:
    """A new notebook's session, as JupyterLab 4 makes it: POST /api/sessions under a
    temporary path, then PATCH the real path, then PATCH the name. Returns the POST's time,
    the time of the three (s), and the session. JupyterLab has no kernel for the notebook
    until the three are done: a cell run meanwhile is dropped."""
    name = f"bench-{uuid.uuid4().hex[:8]}.ipynb"
    body = {"path": uuid.uuid4().hex, "name": name, "type": "notebook"}
    started = time.perf_counter()
    response = await http.post("/api/sessions", json={**body, "kernel": {"name": "python3"}})
    posted = time.perf_counter() - started
    if response.status_code != 201:
        raise RuntimeError(f"POST /api/sessions: {response.status_code} {response.text[:200]}")
    session = response.json()
    for change in ({"path": name}, {"name": name}):
        patched = await http.patch(f"/api/sessions/{session['id']}", json=change)
        if patched.status_code != 200:
            raise RuntimeError(f"PATCH /api/sessions: {patched.status_code} {patched.text[:200]}")
    return posted, time.perf_counter() - started, session


async def settle_and_delete(
    http: httpx.AsyncClient, ws_base: str, session: dict[str, object]
) -> str:
    """Wait (up to 60 s) for the kernel to answer kernel_info over a WebSocket, so that its
    start does not slow the next measurement, then delete the session; the POST's state."""
    kernel = session["kernel"]
    assert isinstance(kernel, dict)
    conn = await WsConn.open(ws_base, str(kernel["id"]), "v1", deflate=False)
    try:
        msg_id = await conn.send("shell", "kernel_info_request", {})
        await asyncio.wait_for(conn.reply_to(msg_id), 60)
    finally:
        await conn.close()
    response = await http.delete(f"/api/sessions/{session['id']}")
    if response.status_code != 204:
        raise RuntimeError(f"DELETE /api/sessions: {response.status_code} {response.text[:200]}")
    return str(kernel.get("execution_state"))


def ws_base(http: httpx.AsyncClient) -> str:
    return str(http.base_url).rstrip("/").replace("http://", "ws://", 1)


async def measure(urls: dict[str, str], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per server, the times (s) of the POSTs ("post") and of POST + 2 PATCH ("usable")."""
    times: dict[str, dict[str, list[float]]] = {name: {"post": [], "usable": []} for name in urls}
    clients = {name: httpx.AsyncClient(base_url=url, timeout=120) for name, url in urls.items()}
    try:
        # One unmeasured round each: first imports, first kernelspec scans.
        for http in clients.values():
            _, _, session = await post_session(http)
            await settle_and_delete(http, ws_base(http), session)
        names = list(urls)
        for round_no in range(1, rounds + 1):
            order = names if round_no % 2 else names[::-1]
            line = []
            for name in order:
                elapsed, usable, session = await post_session(clients[name])
                state = await settle_and_delete(clients[name], ws_base(clients[name]), session)
                times[name]["post"].append(elapsed)
                times[name]["usable"].append(usable)
                line.append(f"{name} {elapsed * 1000:6.1f} / {usable * 1000:6.1f} ms ({state})")
            print(f"  round {round_no:2}: " + ", ".join(line), flush=True)
    finally:
        for http in clients.values():
            await http.aclose()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server logs)")
    args = parser.parse_args()
    print(f"load average: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    # SIGTERM too goes through the `finally` below, which stops both servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    home = Path(tempfile.mkdtemp(prefix="fps-kernels-bench-h-"))
    jupyverse = JupyverseProcess(home)
    jupyter_server = JupyterServerProcess(home)
    try:
        jupyverse.start()
        jupyter_server.start()
        urls = {"jupyverse": jupyverse.url, "jupyter_server": jupyter_server.url}
        times = asyncio.run(measure(urls, args.rounds))
    finally:
        jupyverse.stop()
        jupyter_server.stop()
        leftovers = kill_leftovers([jupyverse.runtime_dir, jupyter_server.runtime_dir])
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    print("\n| server | what | median (ms) | min | max |\n|---|---|---:|---:|---:|")
    medians: dict[tuple[str, str], float] = {}
    for name, series in times.items():
        for what, values in series.items():
            medians[name, what] = statistics.median(values)
            label = "POST" if what == "post" else "POST + 2 PATCH"
            print(
                f"| {name} | {label} | {medians[name, what] * 1000:.1f} "
                f"| {min(values) * 1000:.1f} | {max(values) * 1000:.1f} |"
            )
    usable = medians["jupyverse", "usable"] / medians["jupyter_server", "usable"]
    print(f"\nPOST + 2 PATCH, jupyverse/jupyter_server: {usable:.2f}x")
    ratio = medians["jupyverse", "post"] / medians["jupyter_server", "post"]
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"POST, jupyverse/jupyter_server: {ratio:.2f}x (target <= {TARGET}x: {verdict})")
    if leftovers:
        print(f"!!! kernels left running after the servers stopped (killed): {leftovers}")
    return 0 if ratio <= TARGET and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
