"""Processes as the tests see them from outside: by pid, through /proc."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie has ended for the tests' purpose."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def processes_with(*needles: bytes) -> list[int]:
    """Pids of the processes whose command line holds every one of `needles`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if all(needle in cmdline for needle in needles):
            pids.append(int(proc.name))
    return pids


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by `pid`, then `pid` itself, whichever is left."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


async def until(predicate: Callable[[], Any], what: str, timeout: float = 30) -> None:
    """Wait for `predicate` with a deadline of seconds (the machine may be loaded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
