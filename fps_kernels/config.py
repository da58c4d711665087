"""The plugin's options, each settable with `jupyverse --set kernels.NAME=VALUE`."""

from __future__ import annotations

import re
from typing import Any, Literal

from jupyverse_api.kernels import KernelsConfig
from pydantic import Field, field_validator

from .gateway.config import GatewayConfig
from .kernel_server.settings import DEFAULTS, ServerSettings


class KernelsPluginConfig(KernelsConfig):
    startup_timeout: float = Field(
        default=DEFAULTS.startup_timeout,
        gt=0,
        description="Seconds a new or restarted kernel has to answer kernel_info before it "
        "counts as failed.",
    )
    shutdown_wait: float = Field(
        default=DEFAULTS.shutdown_wait,
        ge=0,
        description="Seconds to wait after each step of a shutdown (shutdown_request, "
        "SIGTERM, SIGKILL).",
    )
    capture_kernel_output: bool = Field(
        default=DEFAULTS.capture_kernel_output,
        description="Send the kernels' stdout and stderr to the server log.",
    )
    max_client_queue_bytes: int = Field(
        default=DEFAULTS.max_client_queue_bytes,
        gt=0,
        description="Bytes of kernel messages kept for one client that is behind or "
        "disconnected; past it, consecutive stream outputs are merged, then output is dropped "
        "(and the client told how much).",
    )
    offline_buffer_seconds: float = Field(
        default=DEFAULTS.offline_buffer_seconds,
        ge=0,
        description="Seconds the messages for a disconnected client are kept, to be replayed "
        "when it reconnects with the same session_id.",
    )
    max_message_bytes: int = Field(
        default=DEFAULTS.max_message_bytes,
        gt=0,
        description="Largest WebSocket message a client may send to a kernel; a larger one "
        "closes the socket with code 1009 and a log line.",
    )
    autorestart: bool = Field(
        default=DEFAULTS.autorestart,
        description="Restart a kernel that dies on its own, under the same id and ports.",
    )
    restart_limit: int = Field(
        default=DEFAULTS.restart_limit,
        ge=1,
        description="Deaths in a row right after a start (within stable_start_time, before "
        "running any cell) after which a kernel is left dead.",
    )
    stable_start_time: float = Field(
        default=DEFAULTS.stable_start_time,
        ge=0,
        description="Seconds a restarted kernel must live (or run a cell) to count as stable.",
    )
    cull_idle_timeout: float = Field(
        default=0,
        ge=0,
        description="Shut kernels down after this many seconds without activity (0: never). "
        "A kernelspec's metadata.cull_idle_timeout overrides it (0 there: never).",
    )
    cull_interval: float = Field(
        default=300,
        gt=0,
        description="Seconds between two checks for idle kernels.",
    )
    cull_connected: bool = Field(
        default=False,
        description="Also cull idle kernels that have WebSocket clients connected.",
    )
    cull_busy: bool = Field(
        default=False,
        description="Also cull kernels that are busy (running a cell without output).",
    )
    transport_encryption: Literal["disabled", "auto", "required"] = Field(
        default=DEFAULTS.transport_encryption,
        description="CurveZMQ between the server and its kernels: 'auto' for kernelspecs "
        "whose metadata.supported_encryption lists 'curve', 'required' refuses the others.",
    )
    allow_origin: list[str] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port]) whose pages may open kernel WebSockets "
        "and change kernels and sessions, besides the server's own; '*' allows any. "
        "jupyverse's own --allow-origin is honoured too.",
    )
    allow_origin_pat: str = Field(
        default="",
        description="A regular expression: origins it matches are allowed as if listed in "
        "allow_origin.",
    )
    allow_remote_access: bool = Field(
        default=False,
        description="Serve requests whatever their Host name when they arrive on a loopback "
        "address (otherwise only local_hostnames and loopback IPs, against DNS rebinding).",
    )
    local_hostnames: list[str] = Field(
        default_factory=lambda: ["localhost"],
        description="Host names accepted on a loopback address (loopback IPs always are).",
    )
    max_body_bytes: int = Field(
        default=10 * 1024 * 1024,
        gt=0,
        description="Largest HTTP request body accepted by the kernels and sessions API; a "
        "larger one is answered 413 without being read.",
    )

    persist: bool = Field(
        default=False,
        description="Kernels outlive the server: a stop (SIGTERM, SIGINT) or a crash leaves "
        "them running, and the next start takes them back with the same kernel and session "
        "ids; off, a stop shuts down every kernel, and those a persist run left.",
    )
    persist_keeper: bool = Field(
        default=True,
        description="With persist: one small keeper process per kernel holds its output and "
        "replies while no server is there, so that a restart loses none.",
    )

    wait_for_saves: bool = Field(
        default=True,
        description="Server-side execution holds its writes into a notebook while fps-yjs "
        "writes the notebook's file: a change then cancels that save and leaves the file empty.",
    )

    providers: list[str] = Field(
        default_factory=lambda: ["spec", "external", "gateway", "*"],
        description="The kernel providers on, in order of precedence for kernel type names: "
        "'spec', 'pyimport', 'external' (with allow_external_kernels), 'gateway' (with "
        "gateway.url), third-party ones by name, '*' for every installed third-party one.",
    )
    provider_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Options of third-party providers, by provider name.",
    )
    gateway: GatewayConfig = Field(
        default_factory=GatewayConfig,
        description="The gateway provider's options (kernels.gateway.NAME).",
    )

    @field_validator("allow_origin_pat")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"not a regular expression: {error}") from None
        return value

    def server_settings(self) -> ServerSettings:
        return ServerSettings.from_config(self)
