"""HTTP and WebSocket answers; every KernelsError becomes an HTTP answer here, and only here."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from jupyverse_api.app import App
from jupyverse_api.auth import Auth, User
from jupyverse_api.frontend import FrontendConfig
from jupyverse_api.kernels import Kernels
from starlette.websockets import WebSocket

from .config import KernelsPluginConfig
from .errors import (
    BadRequest,
    Conflict,
    GatewayError,
    GatewayTimeout,
    GatewayUnavailable,
    InvalidField,
    KernelFailed,
    KernelNotFound,
    KernelsError,
    NotFound,
)
from .kernel_server.activity import isoformat_z
from .models import CreateSession, ExecuteCell, StartKernel, UpdateSession, parse_body
from .providers.base import KernelType
from .registry import Registry

if TYPE_CHECKING:
    from .execution import ServerSideExecution

logger = logging.getLogger(__name__)

_STATUS_CODES: list[tuple[type[KernelsError], int]] = [
    (NotFound, 404),
    (BadRequest, 400),
    (InvalidField, 422),
    (Conflict, 409),
    (KernelFailed, 500),
    (GatewayUnavailable, 503),
    (GatewayTimeout, 504),
    (GatewayError, 502),
]
# Close code for a WebSocket to a kernel that does not exist (4000 + HTTP 404).
_WS_UNKNOWN_KERNEL = 4004

_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def error_response(error: KernelsError) -> JSONResponse:
    status = next((code for kind, code in _STATUS_CODES if isinstance(error, kind)), 500)
    log = logger.warning if status >= 500 else logger.info
    log("%s %s", status, error.message)
    return JSONResponse({"message": error.message, "reason": error.reason}, status_code=status)


def answers_errors(handler: _Handler) -> _Handler:
    """Turn the KernelsErrors a handler raises into JSON answers with a `message`."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except KernelsError as error:
            return error_response(error)

    return wrapper  # type: ignore[return-value]


async def read_json(request: Request) -> Any:
    """The request's JSON body, None when empty; BadRequest when it is not JSON."""
    body = await request.body()
    if not body.strip():
        return None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("Invalid JSON in body of request") from None


class _Kernels(Kernels):
    """The kernels router: REST routes of the Kernels API, plus the routes it leaves out."""

    def __init__(
        self,
        app: App,
        config: KernelsPluginConfig,
        auth: Auth,
        frontend_config: FrontendConfig,
        registry: Registry,
        yjs: Any = None,
        execution: ServerSideExecution | None = None,
    ) -> None:
        self._auth = auth
        super().__init__(app=app, auth=auth)
        self.config = config
        self.frontend_config = frontend_config
        self.registry = registry
        self.yjs = yjs
        self.execution = execution
        self._app = app

    @property
    def kernels(self) -> Any:
        return self.registry.kernels

    def include_router(self, router: APIRouter, **kwargs: Any) -> None:
        # jupyverse refuses a second router with a path already taken, whatever the method
        # (POST /api/kernels next to GET /api/kernels), so our routes join the ABC's router.
        self._add_routes(router, self._auth)
        super().include_router(router, **kwargs)

    def _add_routes(self, router: APIRouter, auth: Auth) -> None:
        @router.post("/api/kernels", status_code=201)
        async def start_kernel(
            request: Request,
            user: User = Depends(auth.current_user(permissions={"kernels": ["write"]})),
        ) -> Response:
            return await self.start_kernel(request, user)

        @router.get("/api/kernelspecs/{kernel_name}")
        async def get_kernelspec_model(
            kernel_name: str,
            user: User = Depends(auth.current_user(permissions={"kernelspecs": ["read"]})),
        ) -> Response:
            return await self.get_kernelspec_model(kernel_name, user)

        @router.get("/api/sessions/{session_id}")
        async def get_session(
            session_id: str,
            user: User = Depends(auth.current_user(permissions={"sessions": ["read"]})),
        ) -> Response:
            return await self.get_session(session_id, user)

    # --- status and kernelspecs ----------------------------------------------------------

    async def get_status(self, user: User) -> Response:
        await self.registry.refresh()
        kernels = self.registry.kernel_models()
        last = max(
            [self._app.last_activity]
            + [self.registry.entry(k["id"]).server.activity.last_activity for k in kernels]
        )
        return JSONResponse(
            {
                "connections": sum(k["connections"] for k in kernels),
                "kernels": len(kernels),
                "last_activity": isoformat_z(last),
                "started": isoformat_z(self._app.started_time),
            }
        )

    def _spec_model(self, spec: KernelType, name: str | None = None) -> dict[str, Any]:
        base_url = self.frontend_config.base_url.rstrip("/") + "/"
        resources = {
            key: f"{base_url}kernelspecs/{spec.name}/{file}" for key, file in spec.resources.items()
        }
        return {"name": name or spec.name, "spec": spec.spec, "resources": resources}

    async def get_kernelspecs(self, user: User) -> Response:
        specs = await self.registry.kernelspecs()
        default = self.registry.default_kernel(list(specs))
        return JSONResponse(
            {
                "default": default,
                "kernelspecs": {name: self._spec_model(spec) for name, spec in specs.items()},
            }
        )

    @answers_errors
    async def get_kernelspec_model(self, kernel_name: str, user: User) -> Response:
        spec = await self.registry.kernelspec(kernel_name)
        return JSONResponse(self._spec_model(spec, kernel_name))

    @answers_errors
    async def get_kernelspec(self, kernel_name: str, file_name: str, user: User) -> Response:
        resource = await self.registry.kernelspec_resource(str(kernel_name), str(file_name))
        if resource.path is not None:
            return FileResponse(resource.path)
        return Response(resource.content, media_type=resource.media_type)

    # --- kernels -------------------------------------------------------------------------

    @answers_errors
    async def start_kernel(self, request: Request, user: User) -> Response:
        body = parse_body(StartKernel, await read_json(request) or {})
        kernel_id = await self.registry.start_kernel(body, username=user.username)
        base_url = self.frontend_config.base_url.rstrip("/") + "/"
        return JSONResponse(
            self.registry.kernel_model(kernel_id),
            status_code=201,
            headers={"Location": f"{base_url}api/kernels/{kernel_id}"},
        )

    async def get_kernels(self, user: User) -> Response:
        await self.registry.refresh()
        return JSONResponse(self.registry.kernel_models())

    @answers_errors
    async def get_kernel(self, kernel_id: str, user: User) -> Response:
        self.registry.entry(kernel_id)
        await self.registry.refresh()
        return JSONResponse(self.registry.kernel_model(kernel_id))

    @answers_errors
    async def shutdown_kernel(self, kernel_id: str, user: User) -> Response:
        await self.registry.shutdown_kernel(kernel_id)
        return Response(status_code=204)

    @answers_errors
    async def interrupt_kernel(self, kernel_id: str, user: User) -> Response:
        await self.registry.interrupt_kernel(kernel_id)
        return Response(status_code=204)

    @answers_errors
    async def restart_kernel(self, kernel_id: str, user: User) -> Response:
        await self.registry.restart_kernel(kernel_id)
        return JSONResponse(self.registry.kernel_model(kernel_id))

    @answers_errors
    async def execute_cell(self, request: Request, kernel_id: str, user: User) -> Response:
        if self.execution is None:
            raise Conflict(
                "Server-side execution needs the Yjs plugin: start jupyverse with "
                "--set kernels.require_yjs=true"
            )
        body = parse_body(ExecuteCell, await read_json(request))
        answer = await self.execution.execute(kernel_id, body.document_id, body.cell_id)
        return JSONResponse(answer, status_code=202)

    async def watch_connection_files(self, path: Path) -> None:
        """Serve the external kernels whose connection files are in `path`, until cancelled."""
        from .external import ExternalKernels
        from .launchers import ConnectionFileLauncher

        watcher = ExternalKernels(path, self.registry, ConnectionFileLauncher(self.config))
        await watcher.run()

    # --- sessions ------------------------------------------------------------------------

    async def get_sessions(self, user: User) -> Response:  # type: ignore[override]
        await self.registry.refresh()
        return JSONResponse(self.registry.session_models())

    @answers_errors
    async def get_session(self, session_id: str, user: User) -> Response:
        self.registry.session(session_id)
        await self.registry.refresh()
        return JSONResponse(self.registry.session_model(self.registry.session(session_id)))

    @answers_errors
    async def create_session(self, request: Request, user: User) -> Response:  # type: ignore[override]
        body = parse_body(CreateSession, await read_json(request))
        record = await self.registry.create_session(body, username=user.username)
        base_url = self.frontend_config.base_url.rstrip("/") + "/"
        return JSONResponse(
            self.registry.session_model(record),
            status_code=201,
            headers={"Location": f"{base_url}api/sessions/{record.id}"},
        )

    @answers_errors
    async def rename_session(self, request: Request, user: User) -> Response:  # type: ignore[override]
        session_id = request.path_params["session_id"]
        body = parse_body(UpdateSession, await read_json(request))
        record = await self.registry.update_session(session_id, body, username=user.username)
        return JSONResponse(self.registry.session_model(record))

    @answers_errors
    async def delete_session(self, session_id: str, user: User) -> Response:
        await self.registry.delete_session(session_id)
        return Response(status_code=204)

    # --- the kernel WebSocket ------------------------------------------------------------

    async def kernel_channels(
        self,
        kernel_id: str,
        session_id: str,
        websocket_permissions: tuple[WebSocket, dict[str, list[str]] | None] | None,
    ) -> None:
        if websocket_permissions is None:
            # The auth plugin refused the user: it has closed the socket before the upgrade.
            return
        websocket, permissions = websocket_permissions
        if permissions is not None and "execute" not in permissions.get("kernels", []):
            logger.info("Refused a kernel WebSocket: no kernels:execute permission")
            await websocket.close(code=1008)
            return
        try:
            entry = self.registry.entry(kernel_id)
        except KernelNotFound as error:
            # JupyterLab expects the upgrade to succeed, then reads the close code and reason.
            await websocket.accept()
            await websocket.close(code=_WS_UNKNOWN_KERNEL, reason=error.message)
            logger.info("Closed a WebSocket to an unknown kernel %s", kernel_id)
            return
        await entry.server.serve(websocket, session_id, permissions)
