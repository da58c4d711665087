"""Options of the gateway provider: `jupyverse --set kernels.gateway.NAME=VALUE`."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        default="",
        description="Base URL of the gateway (http:// or https://); empty: no gateway.",
    )
    ws_url: str = Field(
        default="",
        description="Base URL of its WebSockets; default: url with ws:// or wss://.",
    )
    auth_token: str = Field(default="", description="Token sent to the gateway.")
    auth_header_key: str = Field(
        default="Authorization", description="Header that carries the token."
    )
    auth_scheme: str = Field(default="token", description="Word before the token in that header.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="Extra headers sent with every request."
    )
    validate_cert: bool = Field(default=True, description="Check the gateway's TLS certificate.")
    ca_certs: str = Field(default="", description="CA bundle (a file) for the gateway's TLS.")
    connect_timeout: float = Field(
        default=20.0, gt=0, description="Seconds to open a connection to the gateway."
    )
    request_timeout: float = Field(
        default=30.0, gt=0, description="Seconds the gateway has to answer a request."
    )
    launch_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds the gateway has to start a kernel (sent as KERNEL_LAUNCH_TIMEOUT).",
    )
    pass_env: list[str] = Field(
        default_factory=lambda: ["KERNEL_*"],
        description="Variables of the server's environment passed to new kernels (patterns).",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Variables set for every new kernel (KERNEL_*)."
    )
    send_working_dir: bool = Field(
        default=False,
        description="Send KERNEL_WORKING_DIR, the notebook's directory on this server.",
    )
    mode: Literal["merged", "exclusive"] = Field(
        default="merged",
        description="'merged': next to local kernels, names prefixed; 'exclusive': the "
        "gateway's kernels only, names unchanged.",
    )
    name_prefix: str = Field(
        default="gw-", description="Prefix of the gateway's kernelspec names (merged mode)."
    )
    display_name_suffix: str = Field(
        default=" (gateway)",
        description="Added to the gateway's display names (merged mode).",
    )
    poll_interval: float = Field(
        default=10.0, gt=0, description="Seconds between two looks at the gateway's kernels."
    )
    max_message_bytes: int = Field(
        default=10 * 1024 * 1024,
        ge=0,
        description="Largest client message sent to the gateway (Kernel Gateway and "
        "Enterprise Gateway refuse more than 10 MiB); 0: no check here.",
    )
    retry_max: int = Field(
        default=5, ge=0, description="Attempts to reconnect a WebSocket the gateway dropped."
    )
    retry_interval: float = Field(
        default=1.0, gt=0, description="Seconds before the first reconnection, then doubled."
    )
    retry_interval_max: float = Field(
        default=30.0, gt=0, description="Longest wait between two reconnection attempts."
    )

    @field_validator("url", "ws_url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip().rstrip("/")
        schemes = ("ws://", "wss://") if info.field_name == "ws_url" else ()
        allowed = ("http://", "https://", *schemes)
        if value and not value.startswith(allowed):
            raise ValueError(f"must start with {' or '.join(allowed)}")
        return value

    @field_validator("name_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if value and not re.fullmatch(r"[\w.\-]+", value):
            raise ValueError("may only have letters, digits, '_', '.' and '-' (no '/')")
        return value

    @property
    def channels_url(self) -> str:
        """The WebSocket base URL, from ws_url or url."""
        if self.ws_url:
            return self.ws_url
        if self.url.startswith("https://"):
            return "wss://" + self.url.removeprefix("https://")
        return "ws://" + self.url.removeprefix("http://")
