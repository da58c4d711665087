"""Sorting a record's kernels at start: those still running (taken back) from those that died
while no server was there (cleaned up, with a log line saying why if their log tells)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .liveness import AdoptedProcess
from .logs import kernel_log_path, tail_lines
from .record import KernelRecord

logger = logging.getLogger(__name__)


@dataclass
class Sorted:
    alive: list[tuple[KernelRecord, AdoptedProcess]] = field(default_factory=list)
    dead: list[KernelRecord] = field(default_factory=list)


def sort_kernels(kernels: Iterable[KernelRecord], directory: Path | None = None) -> Sorted:
    """Adopt the recorded kernels still running (same pid, start time and connection file);
    `directory` is the runtime dir, where their log files are."""
    result = Sorted()
    for kernel in kernels:
        log = kernel_log_path(kernel.kernel_id, directory)
        process = AdoptedProcess.adopt(kernel.pid, kernel.pid_start, kernel.connection_file, log)
        if process is None:
            result.dead.append(kernel)
        else:
            result.alive.append((kernel, process))
    return result


def forget_kernel(kernel: KernelRecord, directory: Path | None = None) -> list[str]:
    """Remove the files of a kernel that died while no server was there: its connection file,
    its keeper's socket and its log. Returns the log's last lines (to say why it died)."""
    tail = tail_lines(kernel_log_path(kernel.kernel_id, directory), 10)
    remove_kernel_files(kernel, directory)
    logger.info(
        "Kernel %s (%s, pid %d) ended while no server was running: its files are removed%s",
        kernel.kernel_id,
        kernel.kernel_name,
        kernel.pid,
        ("; its last output:\n  " + "\n  ".join(tail)) if tail else "",
    )
    return tail


def remove_kernel_files(kernel: KernelRecord, directory: Path | None = None) -> None:
    """Remove a recorded kernel's connection file, its keeper's socket and its log."""
    log = kernel_log_path(kernel.kernel_id, directory)
    for path in (kernel.connection_file, kernel.keeper_socket, str(log)):
        if not path:
            continue
        try:
            Path(path).unlink(missing_ok=True)
        except OSError as error:
            logger.warning("Kernel %s: could not remove %s: %s", kernel.kernel_id, path, error)
