"""The server's record of its kernels and sessions, kept in the Jupyter runtime dir so that a
later server can take them back.

No secrets: the keys stay in the kernels' 0600 connection files, which the record only names.
The file is written atomically (a crash mid-write leaves the previous record or the new one,
never a torn file) and is readable by its owner alone; a record that anybody else could have
written is refused when read, as is a connection file it names outside the runtime dir.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..kernel_driver.ownership import process_start
from ..kernel_driver.paths import runtime_dir
from ..kernel_driver.tasks import BackgroundTasks

logger = logging.getLogger(__name__)

RECORD_FILE = "fps_kernels-state.json"
RECORD_VERSION = 1
MAX_RECORD_BYTES = 4 * 1024 * 1024
MAX_TEXT = 4096  # paths, names, ids of a running cell

_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_T = TypeVar("_T")


class RecordError(ValueError):
    """A record (or one entry of it) that cannot be trusted or read."""


@dataclass(frozen=True, slots=True)
class RunningCell:
    """A server-side execution in flight: which notebook cell the request belongs to."""

    msg_id: str
    document_id: str
    cell_id: str
    #: Sent to the kernel (False: still queued in the server, never reached the kernel).
    sent: bool = True
    #: From its execute_input (the reply, which carries it too, may never reach a new server).
    execution_count: int | None = None
    #: The notebook's path: fps-contents 0.6.4 gives files new ids at each start, and so
    #: the notebook a new document id.
    path: str = ""
    #: The last of its messages the server wrote into the cell: those the keeper kept up to
    #: it were written already.
    last_msg_id: str = ""


@dataclass(frozen=True, slots=True)
class KernelRecord:
    kernel_id: str
    kernel_name: str
    connection_file: str
    cwd: str
    pid: int
    pid_start: str  # ownership.process_start(pid): tells the kernel from a reused pid
    shell_identity: str  # hex of the ZMQ identity of the server's shell/control/stdin DEALERs
    clients: tuple[str, ...] = ()  # WebSocket session_ids with a mailbox
    running: tuple[RunningCell, ...] = ()
    keeper_socket: str = ""  # "" without a keeper


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session (a path: a notebook, a console) and its kernel: what the registry keeps, and
    what the record holds of it."""

    id: str
    path: str
    name: str
    type: str
    kernel_id: str


@dataclass(frozen=True, slots=True)
class Writer:
    """The server that wrote the record."""

    pid: int
    start: str


@dataclass(frozen=True, slots=True)
class ServerRecord:
    kernels: tuple[KernelRecord, ...]
    sessions: tuple[SessionRecord, ...]
    written_by: Writer
    version: int = RECORD_VERSION


def this_writer() -> Writer:
    return Writer(pid=os.getpid(), start=process_start(os.getpid()) or "")


def record_path(directory: Path | None = None) -> Path:
    return (directory if directory is not None else runtime_dir()) / RECORD_FILE


def plausible_id(value: object) -> bool:
    """Kernel and session ids: short strings of [A-Za-z0-9._-] (uuids, for this server)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


# --- writing ---------------------------------------------------------------------------------


def encode_record(record: ServerRecord) -> bytes:
    return json.dumps(asdict(record), indent=1, sort_keys=True).encode("utf-8")


def write_record(path: Path, record: ServerRecord) -> None:
    """Replace `path` with `record`, atomically, mode 0600 from the first byte on."""
    data = encode_record(record)
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"the record would take {len(data)} bytes, over {MAX_RECORD_BYTES}")
    directory = path.parent
    tmp = directory / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask let through
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk, or a crash could bring the old record back.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_record(path: Path) -> None:
    path.unlink(missing_ok=True)


class RecordWriter:
    """Writes the server's latest record, in a thread (an fsync may take a while on a busy
    disk) and one write at a time: a burst of changes makes at most two writes, the last
    with the latest state. A failed write is logged and the next change tries again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._latest: ServerRecord | None = None
        self._tasks = BackgroundTasks(f"state record {path}")
        self._idle = asyncio.Event()
        self._idle.set()

    def update(self, record: ServerRecord) -> None:
        self._latest = record
        if self._idle.is_set():
            self._idle.clear()
            self._tasks.spawn(self._write(), "writing the record")

    async def _write(self) -> None:
        try:
            while self._latest is not None:
                record, self._latest = self._latest, None
                try:
                    await asyncio.to_thread(write_record, self.path, record)
                except (OSError, RecordError) as error:
                    logger.warning("Could not write the state record %s: %s", self.path, error)
        finally:
            self._idle.set()

    async def flush(self) -> None:
        """Wait until the latest record given is on disk (or failed): at a server's stop."""
        await self._idle.wait()


# --- reading ---------------------------------------------------------------------------------


def read_record(path: Path, directory: Path | None = None) -> tuple[ServerRecord, list[str]]:
    """The record at `path` and the problems of the entries refused in it.

    Raises RecordError when the file as a whole cannot be trusted or read (FileNotFoundError
    when there is none). A bad kernel or session entry is left out with its reason in the
    problems, and the others are kept; so are the sessions of a refused kernel.
    `directory` is the runtime dir the connection files must be in (runtime_dir() if None).
    """
    data = _load(path)
    base = os.path.realpath(directory if directory is not None else path.parent)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise RecordError(f"{path}: not a JSON object")
    version = data.get("version")
    if version != RECORD_VERSION:
        raise RecordError(
            f"{path}: unknown version {version!r} (this server reads {RECORD_VERSION})"
        )
    try:
        writer = _writer(data.get("written_by"))
        raw_kernels = _field(data, "kernels", list)
        raw_sessions = _field(data, "sessions", list)
    except RecordError as error:
        raise RecordError(f"{path}: {error}") from None
    kernels = _entries(raw_kernels, lambda item: _kernel(item, base), "kernel", problems)
    known: set[str] = set()
    unique: list[KernelRecord] = []
    for kernel in kernels:
        if kernel.kernel_id in known:
            problems.append(f"kernel {kernel.kernel_id}: listed twice, the second is refused")
            continue
        known.add(kernel.kernel_id)
        unique.append(kernel)
    sessions: list[SessionRecord] = []
    for session in _entries(raw_sessions, _session, "session", problems):
        if session.kernel_id not in known:
            problems.append(f"session {session.id}: its kernel {session.kernel_id} is not kept")
        else:
            sessions.append(session)
    for problem in problems:
        logger.warning("State record %s: refused %s", path, problem)
    return ServerRecord(tuple(unique), tuple(sessions), writer), problems


def _load(path: Path) -> Any:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as error:
        # ELOOP: a symbolic link, which anybody able to write the directory could have put there.
        raise RecordError(f"{path}: cannot open: {error}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RecordError(f"{path}: not a regular file")
        if info.st_uid != os.getuid():
            raise RecordError(f"{path}: owned by uid {info.st_uid}, not by this user")
        if info.st_mode & 0o077:
            raise RecordError(
                f"{path}: mode {stat.S_IMODE(info.st_mode):o} lets others read or write it"
            )
        if info.st_size > MAX_RECORD_BYTES:
            raise RecordError(f"{path}: {info.st_size} bytes, over {MAX_RECORD_BYTES}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_RECORD_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_RECORD_BYTES:
        raise RecordError(f"{path}: over {MAX_RECORD_BYTES} bytes")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: not valid JSON: {error}") from None


def _entries(
    items: list[Any], parse: Callable[[Any], _T], what: str, problems: list[str]
) -> list[_T]:
    kept: list[_T] = []
    for index, item in enumerate(items):
        try:
            kept.append(parse(item))
        except RecordError as error:
            name = (
                item.get("kernel_id" if what == "kernel" else "id")
                if isinstance(item, dict)
                else None
            )
            label = name if plausible_id(name) else f"#{index}"
            problems.append(f"{what} {label}: {error}")
    return kept


def _field(data: dict[str, Any], name: str, kind: type[_T]) -> _T:
    if name not in data:
        raise RecordError(f"missing field {name!r}")
    value = data[name]
    # bool is an int to Python, never to the record.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(f"field {name!r} is {type(value).__name__}, not {kind.__name__}")
    return value


def _text(data: dict[str, Any], name: str, empty: bool = True) -> str:
    value = _field(data, name, str)
    if len(value) > MAX_TEXT or "\0" in value:
        raise RecordError(f"field {name!r} is not a plausible text")
    if not empty and not value:
        raise RecordError(f"field {name!r} is empty")
    return value


def _ident(data: dict[str, Any], name: str) -> str:
    value = _field(data, name, str)
    if not plausible_id(value):
        raise RecordError(f"field {name!r} is not a plausible id: {value[:60]!r}")
    return value


def _inside(base: str, value: str, name: str) -> str:
    if not os.path.isabs(value):
        raise RecordError(f"field {name!r} is not an absolute path")
    if os.path.dirname(os.path.realpath(value)) != base:
        raise RecordError(f"field {name!r} ({value}) is not in the runtime dir {base}")
    return value


def _identity(value: str) -> str:
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise RecordError("field 'shell_identity' is not hex") from None
    # ZMQ identities: 1 to 255 bytes, and a leading zero byte is reserved to ZMQ itself.
    if not 0 < len(raw) < 256 or raw[0] == 0:
        raise RecordError("field 'shell_identity' is not a usable ZMQ identity")
    return value


def _kernel(item: Any, base: str) -> KernelRecord:
    if not isinstance(item, dict):
        raise RecordError("not a JSON object")
    pid = _field(item, "pid", int)
    if pid <= 1:
        raise RecordError(f"field 'pid' is {pid}")
    clients = _field(item, "clients", list)
    if not all(plausible_id(client) for client in clients):
        raise RecordError("field 'clients' holds an implausible session id")
    running = []
    for cell in _field(item, "running", list):
        if not isinstance(cell, dict):
            raise RecordError("field 'running' holds something else than an object")
        sent = cell.get("sent", True)
        count = cell.get("execution_count")
        if not isinstance(sent, bool) or not (
            count is None or (isinstance(count, int) and not isinstance(count, bool))
        ):
            raise RecordError("field 'running' holds a cell with a bad 'sent' or count")
        running.append(
            RunningCell(
                msg_id=_text(cell, "msg_id", empty=False),
                document_id=_text(cell, "document_id"),
                cell_id=_text(cell, "cell_id"),
                sent=sent,
                execution_count=count,
                path=_text(cell, "path") if "path" in cell else "",
                last_msg_id=_text(cell, "last_msg_id") if "last_msg_id" in cell else "",
            )
        )
    keeper_socket = _text(item, "keeper_socket")
    return KernelRecord(
        kernel_id=_ident(item, "kernel_id"),
        kernel_name=_text(item, "kernel_name"),
        connection_file=_inside(base, _text(item, "connection_file"), "connection_file"),
        cwd=_text(item, "cwd"),
        pid=pid,
        pid_start=_text(item, "pid_start"),
        shell_identity=_identity(_text(item, "shell_identity", empty=False)),
        clients=tuple(clients),
        running=tuple(running),
        keeper_socket=_inside(base, keeper_socket, "keeper_socket") if keeper_socket else "",
    )


def _session(item: Any) -> SessionRecord:
    if not isinstance(item, dict):
        raise RecordError("not a JSON object")
    return SessionRecord(
        id=_ident(item, "id"),
        path=_text(item, "path"),
        name=_text(item, "name"),
        type=_text(item, "type"),
        kernel_id=_ident(item, "kernel_id"),
    )


def _writer(value: Any) -> Writer:
    if not isinstance(value, dict):
        raise RecordError("field 'written_by' is missing or not an object")
    return Writer(pid=_field(value, "pid", int), start=_text(value, "start"))
