"""One server per runtime dir holds the persisted kernels.

The holder keeps an exclusive `flock` on `fps_kernels-state.lock` for its whole life; the OS
drops it when the process ends, however it ends (SIGKILL included), so a stale lock never
needs cleaning. A second server on the same runtime dir gets no lock: it is read-only for
persistence (it adopts nothing and writes no record), and says which pid holds the kernels.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from ..kernel_driver.paths import runtime_dir

logger = logging.getLogger(__name__)

LOCK_FILE = "fps_kernels-state.lock"


class StateLock:
    """The lock held; `release()` (or the process's end) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Empty it first: a pid left in a lock nobody holds would mislead a reader.
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the only descriptor of the open file drops the flock


def lock_path(directory: Path | None = None) -> Path:
    return (directory if directory is not None else runtime_dir()) / LOCK_FILE


def acquire(directory: Path | None = None) -> StateLock | None:
    """Take the lock of `directory` (the runtime dir by default), or None when another live
    process holds it (logged with its pid). Raises OSError when the file cannot be used."""
    path = lock_path(directory)
    # O_CLOEXEC: a kernel started later must not inherit the descriptor, or the lock would
    # outlive the server as long as the kernel runs.
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise PermissionError(errno.EPERM, "not a regular file of this user", str(path))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            logger.warning(
                "Another server (pid %s) holds the kernels of %s: this one is read-only for "
                "persistence (it takes back no kernel and writes no record)",
                holder if holder is not None else "unknown",
                path.parent,
            )
            os.close(fd)
            return None
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    return StateLock(path, fd)


def holder(directory: Path | None = None) -> int | None:
    """The pid written by the current holder, None if nobody holds the lock."""
    path = lock_path(directory)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            # A shared probe: granted at once when nobody holds the exclusive lock.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
