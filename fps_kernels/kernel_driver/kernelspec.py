"""Kernelspecs: finding them on the Jupyter data path and turning one into a command."""

from __future__ import annotations

import json
import logging
import os
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jupyter_core.paths import jupyter_path

logger = logging.getLogger(__name__)

KERNEL_JSON = "kernel.json"
_VALID_NAME = re.compile(r"^[\w.\-]+$")
_PYTHON_COMMAND = re.compile(r"^python(3(\.\d+)?)?$")


class InvalidKernelSpec(ValueError):
    """A kernel.json that cannot be used: `path` is the file, `problem` what is wrong."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True, slots=True)
class KernelSpec:
    name: str
    resource_dir: Path
    argv: list[str]
    display_name: str
    language: str = ""
    env: dict[str, str] = field(default_factory=dict)
    interrupt_mode: Literal["signal", "message"] = "signal"
    metadata: dict[str, Any] = field(default_factory=dict)
    kernel_protocol_version: str = "5.0"

    def to_dict(self) -> dict[str, Any]:
        return {
            "argv": self.argv,
            "env": self.env,
            "display_name": self.display_name,
            "language": self.language,
            "interrupt_mode": self.interrupt_mode,
            "metadata": self.metadata,
            "kernel_protocol_version": self.kernel_protocol_version,
        }

    def resource_files(self) -> list[str]:
        """The files a frontend may ask for: kernel.js, kernel.css and the logos."""
        names = []
        for path in sorted(self.resource_dir.iterdir()):
            if path.is_file() and (
                path.name in ("kernel.js", "kernel.css") or path.name.startswith("logo-")
            ):
                names.append(path.name)
        return names

    def command(self, connection_file: str) -> list[str]:
        """argv with its placeholders filled in."""
        values = {
            "connection_file": connection_file,
            "resource_dir": str(self.resource_dir),
            "prefix": sys.prefix,
        }
        argv = [_fill(arg, values) for arg in self.argv]
        # A kernelspec saying "python" means the server's own interpreter, which is what
        # users expect in a virtual environment that is not activated.
        if argv and _PYTHON_COMMAND.match(argv[0]):
            argv[0] = sys.executable
        return argv

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """The server's environment with the kernelspec's env applied (${VAR} expanded)."""
        env = dict(base)
        for key, value in self.env.items():
            env[key] = string.Template(value).safe_substitute(base)
        if self.language.lower().startswith("python"):
            env.pop("PYTHONEXECUTABLE", None)
        return env


def _fill(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def load_kernelspec(resource_dir: Path, name: str | None = None) -> KernelSpec:
    spec_file = resource_dir / KERNEL_JSON
    try:
        data = json.loads(spec_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidKernelSpec(spec_file, _read_problem(error)) from None
    if not isinstance(data, dict):
        raise InvalidKernelSpec(spec_file, "not a JSON object")
    argv = data.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise InvalidKernelSpec(spec_file, "'argv' must be a non-empty list of strings")
    env = data.get("env") or {}
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise InvalidKernelSpec(spec_file, "'env' must map strings to strings")
    interrupt_mode = data.get("interrupt_mode", "signal")
    if interrupt_mode not in ("signal", "message"):
        raise InvalidKernelSpec(spec_file, "'interrupt_mode' must be 'signal' or 'message'")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidKernelSpec(spec_file, "'metadata' must be an object")
    spec_name = name or resource_dir.name
    return KernelSpec(
        name=spec_name,
        resource_dir=resource_dir,
        argv=argv,
        display_name=str(data.get("display_name") or spec_name),
        language=str(data.get("language") or ""),
        env=env,
        interrupt_mode=interrupt_mode,
        metadata=metadata,
        kernel_protocol_version=str(data.get("kernel_protocol_version") or "5.0"),
    )


def _read_problem(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON ({error})"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text ({error})"
    return (
        f"cannot be read ({error.strerror or error})" if isinstance(error, OSError) else str(error)
    )


def kernelspec_dirs() -> list[Path]:
    """Where kernelspecs live, highest priority first (JUPYTER_PATH, user, sys.prefix, system)."""
    return [Path(p) for p in jupyter_path("kernels")]


@dataclass(slots=True)
class KernelspecScan:
    """What the Jupyter path holds: the usable kernelspecs, and the broken ones (names no
    usable kernelspec has), each with why."""

    specs: dict[str, KernelSpec] = field(default_factory=dict)
    broken: dict[str, InvalidKernelSpec] = field(default_factory=dict)


# The kernel.json files already warned about, with the (mtime, size) they had then: kernelspecs
# are looked up on every request, and a broken one is worth one log line per change, not one
# per request.
_warned: dict[Path, tuple[int, int]] = {}


def _warn_once(name: str, error: InvalidKernelSpec) -> None:
    try:
        stat = error.path.stat()
        version = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        version = (-1, -1)
    if _warned.get(error.path) == version:
        return
    _warned[error.path] = version
    logger.warning("Skipping kernelspec %s: %s", name, error)


def scan_kernelspecs(dirs: list[Path] | None = None) -> KernelspecScan:
    """Every kernelspec by name; the first directory with a usable one of a name wins."""
    scan = KernelspecScan()
    for kernels_dir in dirs if dirs is not None else kernelspec_dirs():
        try:
            entries = sorted(kernels_dir.iterdir())
        except OSError:
            continue
        for entry in entries:
            name = entry.name.lower()
            if name in scan.specs or not _VALID_NAME.match(name):
                continue
            if not (entry / KERNEL_JSON).is_file():
                continue
            try:
                scan.specs[name] = load_kernelspec(entry, name)
            except InvalidKernelSpec as error:
                _warn_once(name, error)
                scan.broken.setdefault(name, error)
            else:
                _warned.pop(entry / KERNEL_JSON, None)
    for name in scan.specs:
        scan.broken.pop(name, None)
    return scan


def find_kernelspecs(dirs: list[Path] | None = None) -> dict[str, KernelSpec]:
    """Every usable kernelspec by name (broken ones are logged once per change and left out)."""
    return scan_kernelspecs(dirs).specs


def find_kernelspec(name: str, dirs: list[Path] | None = None) -> KernelSpec | None:
    return find_kernelspecs(dirs).get(name.lower())


def environment_for_kernel(
    spec: KernelSpec, session_name: str | None = None, extra: dict[str, str] | None = None
) -> dict[str, str]:
    env = spec.environment(dict(os.environ))
    env["JPY_PARENT_PID"] = str(os.getpid())
    if session_name:
        env["JPY_SESSION_NAME"] = session_name
    if extra:
        env.update(extra)
    return env
