"""The plugin's options, each settable with `jupyverse --set kernels.NAME=VALUE`."""

from __future__ import annotations

from jupyverse_api.kernels import KernelsConfig
from pydantic import Field


class KernelsPluginConfig(KernelsConfig):
    startup_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a new or restarted kernel has to answer kernel_info before it "
        "counts as failed.",
    )
    shutdown_wait: float = Field(
        default=3.0,
        ge=0,
        description="Seconds to wait after each step of a shutdown (shutdown_request, "
        "SIGTERM, SIGKILL).",
    )
    capture_kernel_output: bool = Field(
        default=True,
        description="Send the kernels' stdout and stderr to the server log.",
    )
    max_client_queue_bytes: int = Field(
        default=256 * 1024 * 1024,
        gt=0,
        description="Bytes of kernel messages queued for one WebSocket client before new "
        "ones are dropped (the client is told how many).",
    )
