"""The server's side of the keeper (keeper.py; its packets: keeper_protocol.py).

Order that loses nothing (ipykernel's shell, control and stdin ROUTERs hand an identity over
to the newest peer that claims it):
- at attach: connect iopub and the DEALERs with the recorded identity, wait for their
  handshakes, then `attach()`: the keeper gives its DEALERs up and answers with the backlog;
  live iopub messages whose msg_id is in the backlog are the overlap, to be skipped;
- at a graceful stop: `detach()` (the keeper takes the identity over, and what the server
  could not hand to offline clients), then close the sockets;
- at shutdown of the kernel: `shutdown()`.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..kernel_driver.paths import runtime_dir
from .keeper import DEFAULT_MAX_BYTES, IDENTITY_ENV, SUN_PATH_MAX
from .keeper_protocol import PacketError, encode_packet, msg_id_of, read_packet

CHANNELS = frozenset({"iopub", "shell", "control", "stdin"})


class KeeperError(RuntimeError):
    """The keeper could not be started or reached, or answered something unexpected."""


@dataclass(slots=True)
class Backlog:
    """What the keeper kept for the server: messages as raw ZMQ frames, oldest first (those
    an earlier server queued for an offline client carry its session_id: `client_of`)."""

    messages: list[tuple[str, list[bytes]]] = field(default_factory=list)
    dropped: int = 0  # messages dropped while detached, over --max-bytes
    found: bool = False  # whether it started right after the last_msg_id given

    def msg_ids(self) -> set[str]:
        """The msg_ids of its iopub messages: the live ones among them are duplicates."""
        ids = (msg_id_of(frames) for channel, frames in self.messages if channel == "iopub")
        return {msg_id for msg_id in ids if msg_id}


def keeper_socket_path(kernel_id: str, directory: Path | None = None) -> Path:
    return (directory if directory is not None else runtime_dir()) / f"keeper-{kernel_id}.sock"


@dataclass(frozen=True, slots=True)
class KeeperInfo:
    socket: Path
    pid: int  # the keeper's own pid (it is not the server's child: it forks away at start)


async def start_keeper(
    connection_file: Path,
    socket: Path,
    kernel_pid: int,
    identity: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    log_path: Path | None = None,
    timeout: float = 30,
) -> KeeperInfo:
    """Start a keeper for a kernel and wait until its socket is ready. It runs in a session
    of its own, away from the server (not its child), and outlives it."""
    argv = [
        sys.executable,
        "-m",
        "fps_kernels.persist.keeper",
        f"--connection-file={connection_file}",
        f"--socket={socket}",
        f"--kernel-pid={kernel_pid}",
        f"--max-bytes={max_bytes}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "JPY_PARENT_PID"}
    env[IDENTITY_ENV] = identity.hex()
    log_fd = None
    if log_path is not None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        log_fd = os.open(log_path, flags, 0o600)
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_fd if log_fd is not None else asyncio.subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    finally:
        if log_fd is not None:
            os.close(log_fd)
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise KeeperError(
            f"the keeper for {connection_file} was not ready in {timeout:g} s"
        ) from None
    text = out.decode(errors="replace").strip()
    if process.returncode != 0 or not text.isdigit():
        raise KeeperError(
            f"the keeper for {connection_file} failed to start (exit {process.returncode})"
            + (f"; see {log_path}" if log_path is not None else "")
        )
    return KeeperInfo(socket, int(text))


async def _open(socket: Path, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the keeper's socket; a long path is reached through a directory
    descriptor, since a unix socket address holds 108 bytes at most."""
    if not socket_is_private(socket):
        raise KeeperError(f"{socket} is not a socket of this user alone: not used")
    dir_fd: int | None = None
    target = str(socket)
    if len(os.fsencode(target)) > SUN_PATH_MAX:
        dir_fd = os.open(socket.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        target = f"/proc/self/fd/{dir_fd}/{socket.name}"
    try:
        return await asyncio.wait_for(asyncio.open_unix_connection(target, limit=2**20), timeout)
    except (OSError, asyncio.TimeoutError) as error:
        raise KeeperError(f"cannot reach the keeper at {socket}: {error!r}") from None
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


async def _expect_ok(reader: asyncio.StreamReader, socket: Path, timeout: float) -> None:
    try:
        packet = await asyncio.wait_for(read_packet(reader), timeout)
    except (asyncio.IncompleteReadError, OSError, PacketError, asyncio.TimeoutError) as error:
        raise KeeperError(f"the keeper at {socket} did not answer: {error!r}") from None
    if packet[:1] != [b"OK"]:
        raise KeeperError(f"the keeper at {socket} answered {_describe(packet)}")


def _describe(packet: Sequence[bytes]) -> str:
    return " ".join(frame[:200].decode(errors="replace") for frame in packet) or "nothing"


class KeeperLink:
    """An attached server's connection to a keeper: open while the server holds the kernel
    (its closing, however the server ends, tells the keeper to keep everything)."""

    def __init__(self, socket: Path, writer: asyncio.StreamWriter, reader: asyncio.StreamReader):
        self.socket = socket
        self._writer = writer
        self._reader = reader

    async def detach(
        self,
        last_msg_id: str,
        identity: bytes = b"",
        timeout: float = 10,
        unsent: Sequence[str] = (),
        queued: Sequence[tuple[str, Sequence[bytes]]] = (),
    ) -> None:
        """A graceful stop: the keeper keeps what follows `last_msg_id` (the last iopub
        message delivered), or from the oldest of `unsent` it still has (iopub messages the
        server could not hand to its clients), and takes the identity over; it keeps
        `queued` too, (channel, frames `for_client()` tagged) of shell/control/stdin the
        server could not hand to offline clients, for the next server. Close the DEALERs
        after this."""
        args = {
            "last_msg_id": last_msg_id,
            "identity": identity.hex(),
            "unsent": list(unsent),
            "queued": len(queued),
        }
        try:
            self._writer.write(encode_packet([b"DETACH", json.dumps(args).encode()]))
            for channel, frames in queued:
                self._writer.write(encode_packet([channel.encode(), *frames]))
            await self._writer.drain()
            await _expect_ok(self._reader, self.socket, timeout)
        finally:
            self.close()

    def close(self) -> None:
        """Let go without a DETACH: the keeper keeps everything from now on."""
        self._writer.close()


async def attach(
    socket: Path, last_msg_id: str = "", identity: bytes = b"", timeout: float = 30
) -> tuple[KeeperLink, Backlog]:
    """Attach to the keeper: the link to keep open, and the backlog. Connect iopub and the
    DEALERs (with `identity`) before, so that nothing falls between the backlog and them."""
    reader, writer = await _open(socket, timeout)
    try:
        args = {"last_msg_id": last_msg_id, "identity": identity.hex()}
        writer.write(encode_packet([b"ATTACH", json.dumps(args).encode()]))
        await writer.drain()
        backlog = await asyncio.wait_for(_read_backlog(reader, socket), timeout)
    except BaseException:
        writer.close()
        raise
    return KeeperLink(socket, writer, reader), backlog


async def _read_backlog(reader: asyncio.StreamReader, socket: Path) -> Backlog:
    try:
        head = await read_packet(reader)
        if head[:1] != [b"BACKLOG"] or len(head) != 2:
            raise KeeperError(f"the keeper at {socket} answered {_describe(head)}")
        meta = json.loads(head[1])
        backlog = Backlog(dropped=int(meta["dropped"]), found=bool(meta["found"]))
        for _ in range(int(meta["count"])):
            packet = await read_packet(reader)
            channel = packet[0].decode() if packet else ""
            if channel not in CHANNELS:
                raise KeeperError(f"the keeper at {socket} sent a message of channel {channel!r}")
            backlog.messages.append((channel, packet[1:]))
    except (asyncio.IncompleteReadError, OSError, ValueError, KeyError, TypeError) as error:
        raise KeeperError(f"the keeper at {socket} sent a bad backlog: {error!r}") from None
    return backlog


async def shutdown(socket: Path, timeout: float = 10) -> None:
    """Stop the keeper (the kernel is being shut down)."""
    reader, writer = await _open(socket, timeout)
    try:
        writer.write(encode_packet([b"SHUTDOWN"]))
        await writer.drain()
        await _expect_ok(reader, socket, timeout)
    finally:
        writer.close()


def socket_is_private(socket: Path) -> bool:
    """Whether the keeper's socket is this user's and nobody else's (checked before use)."""
    try:
        info = socket.lstat()
    except OSError:
        return False
    return stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077
