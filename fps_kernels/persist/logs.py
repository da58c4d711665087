"""Kernel output without the server: a persisted kernel writes its stdout and stderr to a
0600 file in the runtime dir instead of pipes to the server (a pipe loses what is written
once the server is gone, and blocks the kernel when 64 KiB are left unread)."""

from __future__ import annotations

import os
from pathlib import Path

from ..kernel_driver.paths import runtime_dir

TAIL_BYTES = 64 * 1024


def kernel_log_path(kernel_id: str, directory: Path | None = None) -> Path:
    return (directory if directory is not None else runtime_dir()) / f"kernel-{kernel_id}.log"


def open_kernel_log(path: Path) -> int:
    """A descriptor to hand to the kernel process as its stdout and stderr (the caller closes
    it once the process has started). Appends, so a restarted kernel adds to the same log."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def tail_lines(path: Path, count: int = 20, max_bytes: int = TAIL_BYTES) -> list[str]:
    """The last `count` lines of `path` (read from its last `max_bytes`), [] if it is gone."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - max_bytes, 0))
            data = f.read(max_bytes)
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if len(data) == max_bytes and size > max_bytes and lines:
        lines = lines[1:]  # the first line read is probably cut
    return [line.rstrip() for line in lines[-count:]] if count > 0 else []
