"""Which server wrote a connection file, and cleaning up those of servers that are gone.

A server killed with SIGKILL cannot remove its kernels' connection files (its kernels exit by
themselves, as they watch `JPY_PARENT_PID`). Each file this plugin writes carries the writing
server's identity under OWNER_KEY (ipykernel ignores keys it does not know), so a later start
can tell its own stale files from everybody else's (jupyter_server's `kernel-*.json` look the
same, external kernels' too) and remove only those.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from functools import cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

OWNER_KEY = "fps_kernels_server"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """When process `pid` started (boot id and clock ticks since boot), None if unknown: with
    the pid, it tells a live server from a later process that was given the same pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after it.
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20:
        return None
    return f"{_boot_id()}:{fields[19]}"


@cache
def this_server() -> dict[str, Any]:
    """The identity written into every connection file of this server."""
    return {"pid": os.getpid(), "start": process_start(os.getpid())}


def _alive(owner: dict[str, Any]) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True  # cannot tell: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user has that pid: compare start times
    start = owner.get("start")
    if not start:
        return True  # written where start times are unknown: a live pid counts
    current = process_start(pid)
    return current is None or current == start


def _owner(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    owner = data.get(OWNER_KEY) if isinstance(data, dict) else None
    return owner if isinstance(owner, dict) else None


def remove_stale_connection_files(directory: Path, keep: Collection[str] = ()) -> int:
    """Remove the connection files in `directory` that this plugin wrote for a server that
    is gone; files without our mark are never touched, nor those in `keep` (the kernels this
    server took back from the one that wrote them). Returns how many were removed."""
    try:
        candidates = sorted(directory.glob("kernel-*.json"))
    except OSError:
        return 0
    kept = {os.path.realpath(path) for path in keep}
    removed = 0
    for path in candidates:
        if os.path.realpath(path) in kept:
            continue
        owner = _owner(path)
        if owner is None or owner == this_server() or _alive(owner):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            logger.warning("Could not remove stale connection file %s: %s", path, error)
            continue
        removed += 1
    if removed:
        logger.info(
            "Removed %d stale connection file(s) in %s, left by a server that is gone",
            removed,
            directory,
        )
    return removed
