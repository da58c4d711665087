"""External kernels: kernels started elsewhere, served from their connection files.

`ExternalKernels` watches a folder (`external_connection_dir`) by polling it. Every valid
connection file there (a JSON object with a key, the five ports and a kernel_name) is served
as a kernel, listed at once and attached in the background; when the file goes away, so does
the kernel (its sessions are closed, its clients told). A file that is not valid (yet) is
ignored, with one log line, until its content changes. These kernels are never signalled or
killed: their processes are not ours.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from ...errors import KernelFailed
from ...kernel_driver.connection import (
    ConnectionInfo,
    InvalidConnectionFile,
    parse_connection_info,
)
from ...kernel_driver.paths import runtime_dir
from ...kernel_driver.signing import Signer
from ...kernel_driver.tasks import BackgroundTasks
from ...kernel_server.registry import KernelEntry
from ...kernel_server.server import KernelStartError
from ...launchers import ConnectionFileLauncher, KernelRequest
from ..base import KernelHost, KernelProvider

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.25
MAX_FILE_BYTES = 1 << 20
_REQUIRED = ("key", "shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def default_directory() -> Path:
    return runtime_dir() / "external_kernels"


def parse_connection_file(content: bytes) -> ConnectionInfo:
    """The connection info in a file's content; InvalidConnectionFile says what is wrong."""
    if len(content) > MAX_FILE_BYTES:
        raise InvalidConnectionFile(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        data = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidConnectionFile(f"not JSON ({error})") from error
    if not isinstance(data, dict):
        raise InvalidConnectionFile("not a JSON object")
    missing = [name for name in _REQUIRED if name not in data]
    if missing:
        raise InvalidConnectionFile(f"no {', '.join(missing)}")
    info = parse_connection_info(data, "connection info")
    if not info.kernel_name:
        raise InvalidConnectionFile("no kernel_name")
    try:
        Signer(info.key, info.signature_scheme)
    except ValueError as error:
        raise InvalidConnectionFile(str(error)) from error
    return info


@dataclass(eq=False)
class _File:
    """What we know of one file of the folder."""

    content: bytes
    info: ConnectionInfo | None = None  # None: not a valid connection file
    kernel_id: str | None = None  # the kernel served for it, if any
    adopted: bool = False  # listed in the registry
    attach: asyncio.Task[None] | None = None


class ExternalKernels:
    """Serves the kernels whose connection files are in `directory`, while running; they are
    listed as `provider`'s when it watches for one."""

    def __init__(
        self,
        directory: Path,
        host: KernelHost,
        launcher: ConnectionFileLauncher,
        poll_interval: float = POLL_INTERVAL,
        provider: KernelProvider | None = None,
    ) -> None:
        self.directory = directory
        self._host = host
        self._launcher = launcher
        self._poll_interval = poll_interval
        self._provider = provider
        self._files: dict[Path, _File] = {}
        self._task: asyncio.Task[None] | None = None
        self._attaches = BackgroundTasks(f"External kernels of {directory}")
        self._folder_problem = ""

    # --- lifetime ------------------------------------------------------------------------

    async def start(self) -> None:
        """Scan the folder once (kernels already there are listed now), then keep watching."""
        self._ensure_directory()
        await self.scan()
        self._task = asyncio.create_task(self.run(initial_scan=False))
        logger.info("Watching %s for external kernels' connection files", self.directory)

    async def stop(self) -> None:
        """Stop watching. The kernels stay listed until the registry lets go of them."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run(self, initial_scan: bool = True) -> None:
        """Watch until cancelled."""
        try:
            if initial_scan:
                self._ensure_directory()
                await self.scan()
            while True:
                await asyncio.sleep(self._poll_interval)
                await self.scan()
        finally:
            await self._attaches.cancel_all()

    # --- scanning ------------------------------------------------------------------------

    def _ensure_directory(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            self._folder_trouble(f"cannot create it: {error}")

    def _folder_trouble(self, problem: str) -> None:
        if problem != self._folder_problem:
            logger.warning("External kernels folder %s: %s", self.directory, problem)
        self._folder_problem = problem

    def _listing(self) -> dict[Path, bytes] | None:
        """Each file of the folder and its content; None when the folder cannot be read."""
        try:
            paths = [p for p in self.directory.iterdir() if not p.name.startswith(".")]
        except FileNotFoundError:
            self._folder_trouble("it was removed; creating it again")
            self._ensure_directory()
            return {}
        except OSError as error:
            self._folder_trouble(f"cannot list it: {error}")
            return None
        self._folder_problem = ""
        listing: dict[Path, bytes] = {}
        for path in paths:
            try:
                if not path.is_file():
                    continue
                with path.open("rb") as f:
                    listing[path] = f.read(MAX_FILE_BYTES + 1)
            except FileNotFoundError:
                continue
            except OSError as error:
                listing[path] = f"unreadable: {error}".encode()
        return listing

    async def scan(self) -> None:
        """Bring the kernels in line with the folder's files."""
        listing = self._listing()
        if listing is None:
            return  # keep what we have until the folder can be read again
        for path in [p for p in self._files if p not in listing]:
            await self._drop(path, "its connection file was removed")
        for path, content in listing.items():
            known = self._files.get(path)
            if known is not None and known.content == content:
                self._check_still_served(path, known)
                continue
            await self._changed(path, content)

    def _check_still_served(self, path: Path, known: _File) -> None:
        if known.adopted and known.kernel_id not in self._host.kernels:
            # Shut down through the API (DELETE): forget it until the file changes.
            logger.info("External kernel %s was shut down; ignoring %s", known.kernel_id, path)
            known.kernel_id = None
            known.adopted = False

    async def _changed(self, path: Path, content: bytes) -> None:
        known = self._files.get(path)
        try:
            info = parse_connection_file(content)
        except InvalidConnectionFile as error:
            if known is not None and known.kernel_id is not None:
                await self._drop(path, "its connection file changed")
            if known is None or known.info is not None:
                logger.warning(
                    "Ignoring %s until it is a valid connection file: %s", path, error.args[0]
                )
            self._files[path] = _File(content)
            return
        if known is not None and known.kernel_id is not None and known.info == info:
            known.content = content  # rewritten, same kernel
            return
        if known is not None and known.kernel_id is not None:
            await self._drop(path, "its connection file changed")
        file = _File(content, info, kernel_id=str(uuid.uuid4()))
        self._files[path] = file
        file.attach = self._attaches.spawn(self._attach(path, file), f"attaching {path.name}")

    async def _attach(self, path: Path, file: _File) -> None:
        assert file.kernel_id is not None and file.info is not None
        kernel_id = file.kernel_id
        request = KernelRequest(
            kernel_id=kernel_id, kernel_name=file.info.kernel_name, connection_file=str(path)
        )
        try:
            server = self._launcher.prepare(request)
        except KernelFailed as error:
            logger.warning("Ignoring %s: %s", path, error.message)
            file.kernel_id = None
            return
        starting = asyncio.ensure_future(server.start(launch_kernel=False))
        # One turn of the loop lets start() open its sockets, so that clients can be served
        # while the kernel is asked for kernel_info.
        await asyncio.sleep(0)
        entry = KernelEntry(server=server, name=file.info.kernel_name, provider=self._provider)
        self._host.adopt(kernel_id, entry)
        file.adopted = True
        logger.info("External kernel %s (%s) from %s", kernel_id, file.info.kernel_name, path.name)
        try:
            await starting
        except KernelStartError as error:
            logger.warning("External kernel from %s does not answer, ignoring it: %s", path, error)
            file.adopted = False
            file.kernel_id = None
            await self._host.detach_kernel(kernel_id, f"It did not answer: {error}")
        finally:
            file.attach = None

    async def _drop(self, path: Path, why: str) -> None:
        file = self._files.pop(path, None)
        if file is None:
            return
        if file.attach is not None:
            file.attach.cancel()
            await asyncio.gather(file.attach, return_exceptions=True)
        if file.kernel_id is not None and file.adopted:
            logger.info("External kernel %s removed: %s", file.kernel_id, why)
            await self._host.detach_kernel(
                file.kernel_id, f"External kernel no longer served: {why}."
            )
