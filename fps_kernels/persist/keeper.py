"""A small process per kernel that keeps the kernel's output while no server is attached,
so that nothing printed during a server restart is lost (keeper_client.py is the server's side,
keeper_protocol.py the socket's packets).

    python -m fps_kernels.persist.keeper --connection-file F --socket S --kernel-pid P
        [--identity HEX (or $FPS_KERNELS_KEEPER_IDENTITY)] [--max-bytes N]

It subscribes to iopub beside the server: while a server is attached it keeps a short ring
only; once the server's connection ends (DETACH, or the OS closing it when the server dies)
it keeps everything up to --max-bytes (the oldest dropped and counted), and DEALERs with the
server's identity keep the replies to requests sent before; what a DETACH hands over for
offline clients (their replies the server could not deliver) is kept until the next ATTACH,
within the same bound. It forks away at start (printing its pid once its 0600 socket is
ready) and exits with the kernel's process, its connection file, or on SHUTDOWN.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from .keeper_protocol import (
    CLIENT_CHANNELS,
    PacketError,
    client_of,
    encode_packet,
    msg_id_of,
    read_packet,
)

RING_SECONDS = 10.0  # over a let_go: its clients get up to 2 s to take what is queued
RING_MESSAGES = 10000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
WATCH_SECONDS = 2.0  # how often the connection file's presence is checked
SUN_PATH_MAX = 100  # a unix socket address holds 108 bytes
IDENTITY_ENV = "FPS_KERNELS_KEEPER_IDENTITY"


@dataclass(slots=True)
class Entry:
    seq: int
    channel: str
    frames: list[bytes]
    size: int
    at: float
    #: Handed over by a DETACH for a client: given at the next ATTACH whatever its start.
    handed: bool = False


class Keeper:
    def __init__(self, info: dict[str, Any], identity: bytes, max_bytes: int) -> None:
        self.info = info
        self.identity = identity
        self.max_bytes = max_bytes
        self.context = zmq.asyncio.Context()
        self.entries: deque[Entry] = deque()
        self.size = self.seq = self.dropped = 0
        self.unread_from = 0  # the first message the next server has not been given
        self.resume_after = ""  # a DETACH's last_msg_id not received yet (our SUB lags)
        self.server: asyncio.StreamWriter | None = None
        self.dealers: dict[str, Any] = {}
        self.readers: list[asyncio.Task[None]] = []
        self.done = asyncio.Event()

    def connect(self, kind: int, channel: str) -> Any:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if self.info.get("curve_publickey") and self.info.get("curve_secretkey"):
            sock.curve_secretkey = self.info["curve_secretkey"].encode()
            sock.curve_publickey = self.info["curve_publickey"].encode()
            sock.curve_serverkey = self.info["curve_publickey"].encode()
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.setsockopt(zmq.RCVHWM, 0)
        else:
            sock.setsockopt(zmq.IDENTITY, self.identity)
            # Never reconnect: ipykernel's ROUTERs hand an identity over to its newest peer,
            # and a keeper reconnecting would take the replies away from the new server.
            sock.setsockopt(zmq.RECONNECT_IVL, -1)
        port = self.info[f"{channel}_port"]
        if self.info.get("transport") == "ipc":
            sock.connect(f"ipc://{self.info['ip']}-{port}")
        else:
            sock.connect(f"tcp://{self.info['ip']}:{port}")
        return sock

    def keep(self, channel: str, frames: list[bytes], handed: bool = False) -> None:
        size = sum(len(frame) for frame in frames)
        now = time.monotonic()
        self.entries.append(Entry(self.seq, channel, frames, size, now, handed))
        if self.resume_after and msg_id_of(frames) == self.resume_after:
            self.unread_from, self.resume_after = self.seq + 1, ""
        self.seq += 1
        self.size += size
        if self.server is not None:
            self.trim_ring(now)
        while self.size > self.max_bytes and self.entries:
            self.pop()

    def trim_ring(self, now: float) -> None:
        horizon = now - RING_SECONDS
        while self.entries and (len(self.entries) > RING_MESSAGES or self.entries[0].at < horizon):
            self.pop()

    def pop(self) -> None:
        entry = self.entries.popleft()
        self.size -= entry.size
        if (entry.seq >= self.unread_from or entry.handed) and self.server is None:
            self.dropped += 1

    async def read(self, sock: Any, channel: str) -> None:
        while True:
            frames = await sock.recv_multipart()
            if channel == "iopub" and len(frames) > 3 and b'"iopub_welcome"' in frames[3]:
                continue  # the kernel greeting our own subscription: nobody else's business
            self.keep(channel, frames)

    def open_dealers(self) -> None:
        if self.dealers or not self.identity:
            return
        for channel in ("shell", "control", "stdin"):
            self.dealers[channel] = sock = self.connect(zmq.DEALER, channel)
            self.readers.append(asyncio.create_task(self.read(sock, channel)))

    def close_dealers(self) -> None:
        for task in self.readers:
            task.cancel()
        self.readers.clear()
        for channel, sock in self.dealers.items():
            while True:  # what already arrived is kept, not thrown away with the socket
                try:
                    frames = zmq.Socket.shadow(sock.underlying).recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.keep(channel, frames)
            sock.close(linger=0)
        self.dealers.clear()

    def find(self, msg_id: object) -> int | None:
        if isinstance(msg_id, str) and msg_id:
            for entry in reversed(self.entries):
                if msg_id_of(entry.frames) == msg_id:
                    return entry.seq
        return None

    async def attach(self, writer: asyncio.StreamWriter, args: dict[str, Any]) -> None:
        self.identity = bytes.fromhex(args.get("identity") or "") or self.identity
        # The new server connected its DEALERs with the identity first (it takes it over):
        # what reached ours before is kept, then ours go for good.
        self.close_dealers()
        last = self.find(args.get("last_msg_id"))
        start = self.unread_from if last is None else last + 1
        backlog = [entry for entry in self.entries if entry.seq >= start or entry.handed]
        head = {"count": len(backlog), "dropped": self.dropped, "found": last is not None}
        self.server = writer  # from now on a second ATTACH is refused
        try:
            writer.write(encode_packet([b"BACKLOG", json.dumps(head).encode()]))
            for entry in backlog:
                writer.write(encode_packet([entry.channel.encode(), *entry.frames]))
            await writer.drain()
        except BaseException:
            self.server = None  # given nothing for sure: the next server gets it all again
            self.open_dealers()
            raise
        # Replies and the like are for one server: given, never again (a next server resumes
        # in the iopub ring by msg_id, and its last_msg_id may come before them).
        self.entries = deque(entry for entry in self.entries if entry.channel == "iopub")
        self.size = sum(entry.size for entry in self.entries)
        self.dropped, self.resume_after = 0, ""
        self.trim_ring(time.monotonic())

    def detach(self, args: dict[str, Any], handed: Sequence[list[bytes]] = ()) -> None:
        self.identity = bytes.fromhex(args.get("identity") or "") or self.identity
        self.server = None
        self.open_dealers()
        for packet in handed:  # [channel, session_id, *frames]: for an offline client
            self.keep(packet[0].decode(), packet[1:], handed=True)
        # Messages the server took but could not hand to a client (a client's queue that
        # dies with it): the next server gets them again, from the oldest found.
        unsent = args.get("unsent")
        found = [self.find(msg_id) for msg_id in unsent] if isinstance(unsent, list) else []
        oldest = min((seq for seq in found if seq is not None), default=None)
        if oldest is not None:
            self.unread_from, self.resume_after = oldest, ""
            return
        last = self.find(args.get("last_msg_id"))
        # Not found: the message has not reached us yet (then we start after it when it
        # does), or the server is further behind than the ring: the next one gets it all.
        first = self.entries[0].seq if self.entries else self.seq
        self.unread_from = first if last is None else last + 1
        self.resume_after = str(args.get("last_msg_id") or "") if last is None else ""

    async def read_handed(self, reader: asyncio.StreamReader, count: object) -> list[list[bytes]]:
        """The packets a DETACH says follow it: messages for offline clients."""
        packets = []
        for _ in range(count if isinstance(count, int) else 0):
            packet = await read_packet(reader, limit=max(self.max_bytes, 65536))
            channel = packet[0].decode(errors="replace") if packet else ""
            if channel not in CLIENT_CHANNELS or client_of(channel, packet[1:]) is None:
                raise PacketError(f"a queued message of channel {channel[:20]!r} for no client")
            packets.append(packet)
        return packets

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                packet = await read_packet(reader, limit=65536)
                kind = packet[0] if packet else b""
                args = json.loads(packet[1]) if len(packet) > 1 else {}
                if not isinstance(args, dict):
                    raise PacketError("arguments that are not a JSON object")
                if kind == b"ATTACH":
                    if self.server is not None:
                        writer.write(encode_packet([b"ERROR", b"another server is attached"]))
                        break
                    await self.attach(writer, args)
                elif kind == b"DETACH" and self.server is writer:
                    self.detach(args, await self.read_handed(reader, args.get("queued")))
                    writer.write(encode_packet([b"OK"]))
                    break
                elif kind == b"SHUTDOWN":
                    writer.write(encode_packet([b"OK"]))
                    self.done.set()
                    break
                else:
                    raise PacketError(f"unexpected {kind[:20]!r}")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the server is gone: a SIGKILL closes its end at once
        except ValueError as error:  # PacketError, JSON, hex
            print(f"keeper: bad packet: {error}", file=sys.stderr, flush=True)
        finally:
            if self.server is writer:  # gone without a DETACH: all since now is unread
                self.server = None
                self.unread_from = self.seq
                self.open_dealers()
            try:
                await writer.drain()
            except ConnectionError:
                pass
            writer.close()

    async def run(self, args: argparse.Namespace, ready: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(args.kernel_pid)
        except ProcessLookupError:
            return
        loop.add_reader(pidfd, self.done.set)  # readable once the kernel has ended
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, self.done.set)
        reader = asyncio.create_task(self.read(self.connect(zmq.SUB, "iopub"), "iopub"))
        socket_path = Path(args.socket).absolute()
        # Bound by its name from its directory: a unix socket address holds 108 bytes at most.
        os.chdir(socket_path.parent)
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(socket_path.name) == 0:  # never take a live keeper's place
                raise SystemExit(f"keeper: another keeper serves {socket_path}")
        socket_path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)  # the socket is 0600 from its creation on
        try:
            server = await asyncio.start_unix_server(self.serve, path=socket_path.name)
        finally:
            os.umask(old_umask)
        os.write(ready, f"{os.getpid()}\n".encode())
        os.close(ready)
        try:
            while Path(args.connection_file).exists():  # a 2 s poll: nothing while idle
                try:
                    await asyncio.wait_for(self.done.wait(), WATCH_SECONDS)
                    break
                except asyncio.TimeoutError:
                    pass
        finally:
            server.close()
            socket_path.unlink(missing_ok=True)
            for task in [reader, *self.readers]:
                task.cancel()
            self.context.destroy(linger=0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fps_kernels.persist.keeper")
    parser.add_argument("--connection-file", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--kernel-pid", type=int, required=True)
    # The environment, readable by this user alone, rather than the command line: ps shows that.
    parser.add_argument("--identity", default=os.environ.pop(IDENTITY_ENV, ""))
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    args = parser.parse_args(argv)
    args.connection_file = os.path.abspath(args.connection_file)
    info = json.loads(Path(args.connection_file).read_text())
    # Into the background: the parent returns once the socket is ready, with the pid.
    readable, ready = os.pipe()
    if os.fork():
        os.close(ready)
        pid = os.read(readable, 32)
        try:
            sys.stdout.write(pid.decode())
            sys.stdout.flush()
        except BrokenPipeError:
            # The server that started it is gone (killed meanwhile): the keeper goes on, and
            # the next server finds it at its socket.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0 if pid else 1)
    os.close(readable)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # stdout is the pipe our parent's caller reads to its end
    asyncio.run(Keeper(info, bytes.fromhex(args.identity), args.max_bytes).run(args, ready))


if __name__ == "__main__":
    main()
