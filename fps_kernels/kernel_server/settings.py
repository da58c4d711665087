"""ServerSettings: how a KernelServer treats its kernel and clients, from the plugin's options."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal


@dataclass(frozen=True)
class ServerSettings:
    """The plugin options a KernelServer uses; the defaults are the options' defaults
    (config.py takes them from here)."""

    startup_timeout: float = 60.0
    shutdown_wait: float = 3.0
    max_client_queue_bytes: int = 32 * 1024 * 1024
    autorestart: bool = True
    restart_limit: int = 5
    stable_start_time: float = 10.0
    offline_buffer_seconds: float = 120.0
    max_message_bytes: int = 128 * 1024 * 1024
    transport_encryption: Literal["disabled", "auto", "required"] = "disabled"
    capture_kernel_output: bool = True
    #: Kernels outlive the server (no parent poller, output to a log file, let go at stop).
    persist: bool = False
    #: With persist: a keeper process per kernel holds its output while no server is there.
    persist_keeper: bool = True

    @classmethod
    def from_config(cls, config: Any) -> ServerSettings:
        """The settings in `config` (the plugin's KernelsPluginConfig: same names)."""
        return cls(**{field.name: getattr(config, field.name) for field in fields(cls)})


#: The defaults, for config.py's options.
DEFAULTS = ServerSettings()
