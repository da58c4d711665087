"""Connection information of a kernel: the ports and key in its connection file."""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import zmq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .ownership import OWNER_KEY, this_server

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
_PORT = Field(ge=1, le=65535)


class InvalidConnectionFile(ValueError):
    """A connection file that cannot be read or lacks what a kernel connection needs."""


class ConnectionInfo(BaseModel):
    """What a connection file holds. Unknown fields are kept, so writing it back loses nothing."""

    model_config = ConfigDict(extra="allow", frozen=True)

    transport: Literal["tcp", "ipc"] = "tcp"
    ip: str = "127.0.0.1"
    shell_port: int = _PORT
    iopub_port: int = _PORT
    stdin_port: int = _PORT
    control_port: int = _PORT
    hb_port: int = _PORT
    key: str
    signature_scheme: str = "hmac-sha256"
    kernel_name: str = ""
    # CurveZMQ keys (Z85), when the transport is encrypted.
    curve_publickey: str | None = None
    curve_secretkey: str | None = None

    @property
    def encrypted(self) -> bool:
        return bool(self.curve_publickey and self.curve_secretkey)

    def url(self, channel: str) -> str:
        port = getattr(self, f"{channel}_port")
        if self.transport == "ipc":
            return f"ipc://{self.ip}-{port}"
        return f"tcp://{self.ip}:{port}"

    def ports(self) -> list[int]:
        return [getattr(self, f"{channel}_port") for channel in CHANNELS]


def read_connection_file(path: str | os.PathLike[str]) -> ConnectionInfo:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidConnectionFile(f"cannot read {path}: {error}") from None
    except json.JSONDecodeError as error:
        raise InvalidConnectionFile(f"{path} is not valid JSON: {error}") from None
    return parse_connection_info(data, str(path))


def parse_connection_info(data: Any, origin: str = "connection info") -> ConnectionInfo:
    if not isinstance(data, dict):
        raise InvalidConnectionFile(f"{origin} is not a JSON object")
    # Which server wrote the file is about the file, not the connection.
    data = {key: value for key, value in data.items() if key != OWNER_KEY}
    try:
        return ConnectionInfo.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(loc) for loc in item['loc']) or 'file'}: {item['msg']}"
            for item in error.errors()
        )
        raise InvalidConnectionFile(f"{origin}: {problems}") from None


def write_connection_file(path: str | os.PathLike[str], info: ConnectionInfo) -> None:
    """Write atomically with mode 0600, so the key is never readable by others, even briefly.
    The file says which server wrote it (OWNER_KEY), so that a later start can remove it if
    this server dies without doing so."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({**info.model_dump(exclude_none=True), OWNER_KEY: this_server()}, f, indent=2)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_key() -> str:
    return secrets.token_hex(32)


class PortAllocator:
    """Hands out free TCP ports on loopback, never the same one twice while it is held.

    Two things make upstream's bind-then-close race go away: the ports handed out are
    remembered until released (so concurrent starts in this server never collide), and they
    are taken below the kernel's ephemeral range (so no outgoing connection of any process
    is given one of them by the OS between our check and the kernel's bind).
    """

    def __init__(self, ip: str = "127.0.0.1") -> None:
        self._ip = ip
        self._held: set[int] = set()
        low, _high = _ephemeral_range()
        self._range = (10000, low - 1) if low > 12000 else (low, 65535)

    def allocate(self, count: int = 5) -> list[int]:
        ports: list[int] = []
        start, stop = self._range
        for _ in range(count * 200):
            if len(ports) == count:
                break
            port = random.randint(start, stop)
            if port in self._held or port in ports or not _is_free(self._ip, port):
                continue
            ports.append(port)
        if len(ports) < count:
            raise OSError(f"no free port found on {self._ip}")
        self._held.update(ports)
        return ports

    def hold(self, ports: Iterable[int]) -> None:
        self._held.update(ports)

    def release(self, ports: Iterable[int]) -> None:
        self._held.difference_update(ports)


def _is_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def new_connection_info(
    ports: PortAllocator, kernel_name: str = "", encrypted: bool = False
) -> ConnectionInfo:
    shell, iopub, stdin, control, hb = ports.allocate(5)
    public, secret = zmq.curve_keypair() if encrypted else (b"", b"")
    return ConnectionInfo(
        curve_publickey=public.decode() or None,
        curve_secretkey=secret.decode() or None,
        shell_port=shell,
        iopub_port=iopub,
        stdin_port=stdin,
        control_port=control,
        hb_port=hb,
        key=new_key(),
        kernel_name=kernel_name,
    )
