"""Benchmark fps_kernels' kernel WebSocket against jupyter_client talking ZMQ straight to ipykernel.

    python bench/run.py [--quick] [--repeat N]

Starts this project's jupyverse on a free 127.0.0.1 port, runs every workload over every way,
interleaved round by round, prints a markdown table, and stops everything it started. The
exit code is 1 when any check or measurement failed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import cast

import httpx
from clients import WsConn
from report import Failure, Metric, Results, Workload, fmt, table
from serverproc import JupyverseProcess, kill_leftovers
from websockets.exceptions import ConnectionClosed
from workloads import (
    ALL_WAYS,
    BASIC_WAYS,
    DIRECT,
    RAW_ZMQ,
    WS_FLOOR,
    WS_V1_DEFLATE,
    Bench,
    CheckFailed,
    Measure,
    MeasureWays,
    Sizes,
    Way,
    concurrent_starts,
    echo,
    fanout,
    flood,
    flood_flush,
    kernel_to_client,
    payload,
    roundtrip,
    server_memory,
    session_start,
)

DEFAULT_SIZES = Sizes()
QUICK_SIZES = Sizes(executes=50, flood_lines=5_000, flush_lines=1_000, fanout_lines=1_000)


def workloads() -> list[Workload]:
    return [
        Workload(
            "a",
            "execute round trip",
            roundtrip,
            (*ALL_WAYS, WS_FLOOR),
            (Metric("rtt_ms", "median round trip (ms)", False, target=1.10),),
            timeout=600,
            interleaved=True,
        ),
        Workload(
            "b",
            "flood: print N lines",
            flood,
            ALL_WAYS,
            (
                Metric("lines_per_s", "lines/s", True, target=0.7),
                Metric("msgs_per_s", "messages/s", True),
                Metric("msgs", "messages (count)", True, ratio=False),
            ),
            timeout=120,
        ),
        Workload(
            "b2",
            "flood: print(flush=True) N lines",
            flood_flush,
            ALL_WAYS,
            (
                Metric("lines_per_s", "lines/s", True, target=0.7),
                Metric("msgs_per_s", "messages/s", True),
                Metric("msgs", "messages (count)", True, ratio=False),
            ),
            timeout=120,
        ),
        Workload(
            "c",
            "binary comm echo",
            echo,
            ALL_WAYS,
            (Metric("mib_per_s", "MiB/s", True, target=0.5),),
            timeout=120,
        ),
        Workload(
            "d",
            "kernel to client buffer",
            kernel_to_client,
            ALL_WAYS,
            (Metric("mib_per_s", "MiB/s", True, target=0.6),),
            timeout=120,
        ),
        Workload(
            "e",
            "clients on one kernel",
            fanout,
            ALL_WAYS,
            (
                Metric("msgs_per_s", "delivered messages/s", True),
                Metric("lines_per_s", "delivered lines/s", True, target=0.9),
                Metric("msgs", "delivered messages (count)", True, ratio=False),
            ),
            timeout=180,
        ),
        Workload(
            "f",
            "session start to kernel_info",
            session_start,
            BASIC_WAYS,
            (Metric("seconds", "time (s)", False, target=1.05),),
            timeout=120,
        ),
        Workload(
            "g",
            "kernels started at once",
            concurrent_starts,
            BASIC_WAYS,
            (Metric("seconds", "time (s)", False, target=1.1),),
            timeout=240,
        ),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds and smaller sizes")
    parser.add_argument("--repeat", type=int, default=None, help="rounds (default 5, quick 2)")
    parser.add_argument(
        "--transfer-mib", type=int, default=None, help="size of the comm buffers (default 32)"
    )
    parser.add_argument("--only", default="", help="comma-separated workload keys, e.g. a,c")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (server log)")
    return parser.parse_args()


def describe(error: BaseException, timeout: float) -> str:
    if isinstance(error, asyncio.TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(error, ConnectionClosed):
        if error.rcvd is not None and error.rcvd_then_sent is not False:
            return f"the server closed the WebSocket: {error.rcvd.code} {error.rcvd.reason}"
        return f"WebSocket closed: {error}"
    return f"{type(error).__name__}: {error}"


def show(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key}={fmt(value)}" for key, value in metrics.items())


async def measure_once(
    bench: Bench, results: Results, workload: Workload, way: Way, round_no: int
) -> Failure | None:
    """One measurement; a failure is recorded, printed, and what it left behind cleaned up."""
    label = f"  [{workload.key}] round {round_no} {way.name:<18}"
    measure = cast(Measure, workload.measure)
    try:
        metrics = await asyncio.wait_for(measure(bench, way), workload.timeout)
    except CheckFailed as error:
        failure = Failure(workload.key, way.name, round_no, str(error), correctness=True)
        print(f"{label} !!! CHECK FAILED: {error}", flush=True)
    # Any other error is this measurement's failure: record it and go on with the others.
    except Exception as error:
        reason = describe(error, workload.timeout)
        timed_out = isinstance(error, asyncio.TimeoutError)
        failure = Failure(workload.key, way.name, round_no, reason, False, timed_out)
        print(f"{label} !!! failed: {reason}", flush=True)
    else:
        results.add(workload, way, metrics, round_no)
        print(f"{label} {show(metrics)}", flush=True)
        return None
    results.failures.append(failure)
    await cleanup_after_failure(bench)
    return failure


async def cleanup_after_failure(bench: Bench) -> None:
    try:
        await asyncio.wait_for(bench.delete_stray_kernels(), 60)
        await asyncio.wait_for(bench.stop_stray_direct_kernels(), 60)
    except Exception as error:  # the final cleanup still runs; do not stop the bench here
        print(f"  (cleanup after the failure went wrong: {describe(error, 60)})", flush=True)


async def measure_round(
    bench: Bench, results: Results, workload: Workload, round_no: int
) -> Failure | None:
    """One round of an interleaved workload: every way at once."""
    label = f"  [{workload.key}] round {round_no}"
    measure = cast(MeasureWays, workload.measure)
    try:
        by_way = await asyncio.wait_for(measure(bench, workload.ways), workload.timeout)
    except Exception as error:  # this round's failure, for every way; the next round runs
        reason = describe(error, workload.timeout)
        timed_out = isinstance(error, asyncio.TimeoutError)
        for way in workload.ways:
            results.failures.append(
                Failure(workload.key, way.name, round_no, reason, False, timed_out)
            )
        print(f"{label} !!! failed: {reason}", flush=True)
        await cleanup_after_failure(bench)
        return results.failures[-1]
    for way in workload.ways:
        results.add(workload, way, by_way[way.name], round_no)
        print(f"{label} {way.name:<18} {show(by_way[way.name])}", flush=True)
    return None


async def run_workload(bench: Bench, results: Results, workload: Workload, rounds: int) -> None:
    print(f"\n{workload.key}. {workload.title}", flush=True)
    if workload.interleaved:
        for round_no in range(1, rounds + 1):
            failure = await measure_round(bench, results, workload, round_no)
            if failure is not None and failure.timed_out:
                return
        return
    timed_out: set[str] = set()
    for round_no in range(1, rounds + 1):
        for way in workload.ways:
            if way.name in timed_out:
                # a way that hung once would hang again: spare the time budget
                continue
            failure = await measure_once(bench, results, workload, way, round_no)
            if failure is not None and failure.timed_out:
                timed_out.add(way.name)


async def measure_memory(bench: Bench, results: Results) -> None:
    kernels = bench.sizes.concurrent_kernels
    print(f"\nserver memory: 0 kernels, then {kernels} idle kernels", flush=True)
    try:
        results.memory = await asyncio.wait_for(server_memory(bench, kernels), 180)
        results.memory["kernels"] = kernels
        print(f"  {show(results.memory)}", flush=True)
    except Exception as error:  # recorded like any other failed measurement
        results.memory_error = describe(error, 180)
        print(f"  !!! failed: {results.memory_error}", flush=True)
        await cleanup_after_failure(bench)


async def check_deflate(bench: Bench) -> str:
    conn = await bench.connect(WS_V1_DEFLATE)
    assert isinstance(conn, WsConn)
    try:
        header = (
            conn.ws.response.headers.get("Sec-WebSocket-Extensions", "") if conn.ws.response else ""
        )
    finally:
        await conn.close()
    return header or "(none: the server refused permessage-deflate)"


async def run_all(bench: Bench, results: Results, chosen: list[Workload], rounds: int) -> None:
    await measure_memory(bench, results)
    for way in ALL_WAYS:
        if way.kind == "ws":
            bench.ws_kernels[way.name] = await bench.post_kernel()
    bench.direct_km = await bench.start_direct_kernel()
    bench.raw_km = await bench.start_direct_kernel()
    for way in (DIRECT, RAW_ZMQ):  # the ZMQ kernels answer before anything is timed
        conn = await bench.connect(way)
        await conn.close()
    print(f"\npermessage-deflate answer of the server: {await check_deflate(bench)}")
    for workload in chosen:
        await run_workload(bench, results, workload, rounds)


def versions() -> str:
    names = ("jupyverse-api", "uvicorn", "websockets", "jupyter_client", "ipykernel", "pyzmq")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: the header just lacks the model
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def warn_if_busy() -> None:
    """Other processes eating CPU make every figure noisy: say so before and after the run."""
    load = load_average()
    print(f"load average: {load}", flush=True)
    try:
        busy = float(load.split()[0]) > 0.5 * (os.cpu_count() or 1)
    except ValueError:
        return
    if busy:
        print("!!! the machine is busy with other work: the figures will be noisy", flush=True)


class CpuWatch:
    """CPU time other processes used during the run: what makes the figures noisy.

    All of the machine's busy time (/proc/stat) minus ours: this process and its reaped
    children, which include jupyverse and, through it, every kernel.
    """

    def __init__(self) -> None:
        self.start = (self._machine_busy(), self._ours(), time.monotonic())

    @staticmethod
    def _machine_busy() -> float:
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        except OSError:
            return 0.0
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _ours() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def report(self) -> str:
        machine0, ours0, wall0 = self.start
        others = (self._machine_busy() - machine0) - (self._ours() - ours0)
        cores = max(others, 0.0) / max(time.monotonic() - wall0, 1e-9)
        text = f"other processes used {cores:.2f} core(s) on average during the run"
        if cores > 0.2:
            text = f"!!! {text}: the figures are noisy"
        return text


def print_header(sizes: Sizes, rounds: int) -> None:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"fps_kernels bench, {now}")
    print(f"machine: {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}")
    print(f"versions: {versions()}")
    print(f"rounds: {rounds}, sizes: {sizes}", flush=True)
    warn_if_busy()


def print_failures(results: Results) -> None:
    wrong = [f for f in results.failures if f.correctness]
    failed = [f for f in results.failures if not f.correctness]
    if wrong:
        print("\n" + "!" * 72 + "\n!!! CORRECTNESS FAILURES (data lost or corrupted)\n" + "!" * 72)
        for f in wrong:
            print(f"  {f.workload} / {f.way} / round {f.round}: {f.reason}")
    if failed or results.memory_error:
        print("\n" + "!" * 72 + "\n!!! FAILED MEASUREMENTS\n" + "!" * 72)
        for f in failed:
            print(f"  {f.workload} / {f.way} / round {f.round}: {f.reason}")
        if results.memory_error:
            print(f"  server memory: {results.memory_error}")


def print_server_log(server: JupyverseProcess, limit: int = 20) -> None:
    problems = server.log_problems()
    if not problems:
        print("\nserver log: no warnings or errors")
        return
    print(f"\nserver log: {len(problems)} warning/error line(s); the first distinct ones:")
    seen: set[str] = set()
    for line in problems:
        key = line.split("] ", 1)[-1][:100]
        if key not in seen and len(seen) < limit:
            seen.add(key)
            print(f"  {line[:300]}")


async def main_async(args: argparse.Namespace) -> int:
    sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    if args.transfer_mib is not None:
        sizes = Sizes(**{**sizes.__dict__, "transfer_mib": args.transfer_mib})
    rounds = args.repeat or (2 if args.quick else 5)
    chosen = [w for w in workloads() if not args.only or w.key in args.only.split(",")]
    print_header(sizes, rounds)

    home = Path(tempfile.mkdtemp(prefix="fps-kernels-bench-"))
    direct_runtime = home / "direct-runtime"
    direct_runtime.mkdir()
    # connection files of the direct kernels go to our temp dir, not the user's runtime dir
    os.environ["JUPYTER_RUNTIME_DIR"] = str(direct_runtime)
    os.environ["JUPYTER_PLATFORM_DIRS"] = "1"
    server = JupyverseProcess(home)
    results = Results()
    started = time.monotonic()
    cpu = CpuWatch()
    leftovers: list[int] = []
    try:
        server.start()
        print(f"jupyverse pid {server.pid} on {server.url}", flush=True)
        blob = payload(sizes.transfer_mib * 2**20)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            with (home / "direct-kernels.log").open("ab") as kernel_log:
                bench = Bench(server, http, sizes, kernel_log=kernel_log)
                bench.transfer_payload = blob
                bench.transfer_sha = hashlib.sha256(blob).hexdigest()
                try:
                    await run_all(bench, results, chosen, rounds)
                finally:
                    bench.stop_floors()
                    await bench.stop_all_direct_kernels()
    finally:
        code = server.stop()
        leftovers = kill_leftovers([server.runtime_dir, direct_runtime])
        print(
            f"\njupyverse stopped (exit code {code}); run took {time.monotonic() - started:.0f} s"
        )
        print(cpu.report())
        print_server_log(server)
        if args.keep:
            print(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)

    print("\n" + table(results, chosen, DIRECT, RAW_ZMQ))
    print_failures(results)
    if leftovers:
        print(f"\n!!! kernels left running after the server stopped (killed): {leftovers}")
    bad = bool(results.failures or results.memory_error or leftovers)
    return 1 if bad else 0


def main() -> None:
    args = parse_args()
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
