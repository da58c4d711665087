"""Talking to a kernel gateway: its REST API over httpx, its kernel WebSockets over websockets.

Every failure becomes a GatewayError with a message a user can act on: GatewayUnavailable
(cannot connect), GatewayTimeout (no answer in time), or GatewayRefused (the gateway answered
4xx/5xx; its own message is kept, a traceback is cut to its last line). Only the headers made
here from the options (the gateway's token, extra headers) are ever sent: nothing of the
browser's request is forwarded.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

from ..errors import GatewayError, GatewayTimeout, GatewayUnavailable
from .config import GatewayConfig

logger = logging.getLogger(__name__)

_MESSAGE_CHARS = 500


class GatewayRefused(GatewayError):
    """The gateway answered with an error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def json_object(response: httpx.Response) -> dict[str, Any]:
    """The JSON object a gateway answered with; {} for anything else."""
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def gateway_message(status: int, reason: str, body: Any, text: str = "") -> str:
    """The gateway's own words for an error answer: its message, or the last line of its
    traceback when the message says nothing, or its reason."""
    message = ""
    if isinstance(body, dict):
        given = body.get("message")
        if isinstance(given, str) and given.strip() and given != "Unknown server error":
            message = given.strip()
        traceback = body.get("traceback")
        if not message and isinstance(traceback, str) and traceback.strip():
            message = traceback.strip().splitlines()[-1].strip()
        if not message and isinstance(body.get("reason"), str):
            message = body["reason"]
    elif text.strip():
        message = text.strip().splitlines()[0]
    message = message or reason
    return message[:_MESSAGE_CHARS]


def refusal(status: int, reason_phrase: str, message: str) -> str:
    """An error answer in words: the status, the gateway's message (once: Enterprise Gateway
    puts it in the reason phrase too) and what to do about it."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = reason_phrase if len(reason_phrase) < 40 else ""
    words = f"{status} {phrase}".rstrip()
    if message and message != phrase:
        words = f"{words}: {message}"
    if status == 403 and "KERNEL_USERNAME" in message:
        # Enterprise Gateway refusing the user (`root` by default, EG_UNAUTHORIZED_USERS).
        words += (
            " (set KERNEL_USERNAME to a user it allows, e.g. "
            "--set kernels.gateway.env.KERNEL_USERNAME=NAME)"
        )
    elif status in (401, 403):
        words += " (check kernels.gateway.auth_token and kernels.gateway.headers)"
    return words


def _ws_ssl(config: GatewayConfig) -> ssl.SSLContext | None:
    if not config.channels_url.startswith("wss://"):
        return None
    context = ssl.create_default_context(cafile=config.ca_certs or None)
    if not config.validate_cert:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class GatewayClient:
    """The REST and WebSocket client of one gateway."""

    def __init__(
        self, config: GatewayConfig, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self.url = config.url
        self.ws_url = config.channels_url
        headers = dict(config.headers)
        if config.auth_token:
            scheme = f"{config.auth_scheme} " if config.auth_scheme else ""
            headers[config.auth_header_key] = f"{scheme}{config.auth_token}"
        self.headers = headers
        verify: bool | ssl.SSLContext = config.validate_cert
        if config.ca_certs and config.validate_cert:
            verify = ssl.create_default_context(cafile=config.ca_certs)
        self._http = httpx.AsyncClient(
            base_url=config.url,
            headers=headers,
            timeout=httpx.Timeout(config.request_timeout, connect=config.connect_timeout),
            verify=verify,
            transport=transport,
        )
        self._ssl = _ws_ssl(config)

    async def close(self) -> None:
        await self._http.aclose()

    # --- REST ------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        timeout: float | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        """The gateway's answer to a request; a GatewayError when there is none or it is an
        error."""
        what = f"{method} {path}"
        try:
            response = await self._http.request(
                method,
                path,
                json=json,
                params=params,
                timeout=httpx.USE_CLIENT_DEFAULT
                if timeout is None
                else httpx.Timeout(timeout, connect=self.config.connect_timeout),
            )
        except httpx.TimeoutException as error:
            raise GatewayTimeout(
                f"The kernel gateway at {self.url} does not answer ({what}: {type(error).__name__})"
            ) from error
        except httpx.HTTPError as error:
            problem = str(error) or type(error).__name__
            raise GatewayUnavailable(
                f"The kernel gateway at {self.url} cannot be reached: {problem}"
            ) from error
        if response.status_code >= 400:
            raise self._refused(what, response)
        return response

    def _refused(self, what: str, response: httpx.Response) -> GatewayRefused:
        try:
            body = response.json()
        except ValueError:
            body = None
        status = response.status_code
        message = gateway_message(status, response.reason_phrase, body, response.text)
        return GatewayRefused(
            f"The kernel gateway at {self.url} answered {what} with "
            f"{refusal(status, response.reason_phrase, message)}",
            status,
        )

    async def get_json(self, path: str, **kwargs: Any) -> Any:
        response = await self.request("GET", path, **kwargs)
        try:
            return response.json()
        except ValueError as error:
            raise GatewayRefused(
                f"The kernel gateway at {self.url} answered GET {path} with something that is "
                "not JSON",
                502,
            ) from error

    async def resource(self, name: str, file_name: str) -> tuple[bytes, str]:
        """A kernelspec's resource file: its bytes and media type."""
        response = await self.request("GET", f"/kernelspecs/{quote(name)}/{quote(file_name)}")
        media_type = response.headers.get("content-type", "application/octet-stream")
        return response.content, media_type

    # --- kernel WebSocket ------------------------------------------------------------------

    async def open_channels(
        self, kernel_id: str, session_id: str, subprotocol: str | None
    ) -> ClientConnection:
        """Open the kernel's WebSocket on the gateway with `subprotocol` (or none)."""
        url = (
            f"{self.ws_url}/api/kernels/{quote(kernel_id)}/channels?session_id={quote(session_id)}"
        )
        where = f"the kernel gateway at {self.url}"
        options: dict[str, Any] = {"ssl": self._ssl} if self._ssl is not None else {}
        try:
            return await connect(
                url,
                subprotocols=[Subprotocol(subprotocol)] if subprotocol else None,
                additional_headers=self.headers,
                open_timeout=self.config.connect_timeout,
                max_size=None,
                compression=None,
                **options,
            )
        except InvalidStatus as error:
            response = error.response
            status = response.status_code
            body = response.body.decode(errors="replace") if response.body else ""
            message = gateway_message(status, response.reason_phrase, None, body)
            raise GatewayRefused(
                f"{where} refused the kernel's WebSocket with "
                f"{refusal(status, response.reason_phrase, message)}",
                status,
            ) from error
        except (TimeoutError, asyncio.TimeoutError) as error:
            raise GatewayTimeout(
                f"{where} does not answer (the kernel's WebSocket was not opened within "
                f"{self.config.connect_timeout:g} s)"
            ) from error
        except (OSError, InvalidHandshake, InvalidURI) as error:
            raise GatewayUnavailable(
                f"{where} cannot be reached for the kernel's WebSocket: {error}"
            ) from error
