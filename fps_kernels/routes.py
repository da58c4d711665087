"""HTTP and WebSocket answers; every KernelsError becomes an HTTP answer here, and only here."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from jupyverse_api.app import App
from jupyverse_api.auth import Auth, User
from jupyverse_api.frontend import FrontendConfig
from jupyverse_api.kernels import Kernels
from starlette.websockets import WebSocket

from .access import AccessGuard, AccessRules
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
    KernelspecBroken,
    KernelspecNotFound,
    NotFound,
    PayloadTooLarge,
)
from .kernel_server.activity import isoformat_z
from .kernel_server.close_codes import CloseCode
from .kernel_server.framing import has_lone_surrogate
from .launchers import ConnectionFileLauncher
from .models import (
    CreateSession,
    ExecuteCell,
    ExecuteCode,
    InputReply,
    StartKernel,
    UpdateSession,
    parse_body,
    path_problem,
)
from .providers.base import KernelType
from .providers.external.watcher import ExternalKernels
from .records import KernelInfo, SessionInfo
from .registry import Registry

if TYPE_CHECKING:
    from .execution import ServerSideExecution

logger = logging.getLogger(__name__)

#: The HTTP status of each kind of error; a kind not listed has its closest listed base
#: class's (as Starlette looks up exception handlers: along the class's MRO).
STATUS_CODES: dict[type[KernelsError], int] = {
    KernelsError: 500,
    NotFound: 404,
    BadRequest: 400,
    PayloadTooLarge: 413,
    InvalidField: 422,
    Conflict: 409,
    KernelFailed: 500,
    # The name exists but its kernel.json is wrong: a misconfigured server, not a bad request
    # nor an unknown name, so 500 (as jupyter_server answers when a kernelspec fails to load).
    KernelspecBroken: 500,
    GatewayError: 502,
    GatewayUnavailable: 503,
    GatewayTimeout: 504,
}

_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def status_code(error: KernelsError) -> int:
    return next(STATUS_CODES[kind] for kind in type(error).__mro__ if kind in STATUS_CODES)


def error_response(error: KernelsError) -> JSONResponse:
    status = status_code(error)
    # A broken kernelspec is warned about once per change of its file, not per request.
    if not isinstance(error, KernelspecBroken):
        log = logger.warning if status >= 500 else logger.info
        log("%s %s", status, error.message)
    return JSONResponse({"message": error.message, "reason": error.reason}, status_code=status)


def kernel_json(kernel: KernelInfo) -> dict[str, Any]:
    """A kernel model of the REST API."""
    model: dict[str, Any] = {
        "id": kernel.id,
        "name": kernel.name,
        "last_activity": isoformat_z(kernel.last_activity),
        "execution_state": kernel.execution_state,
        "connections": kernel.connections,
    }
    if kernel.reason:
        model["reason"] = kernel.reason
    return model


def session_json(session: SessionInfo) -> dict[str, Any]:
    """A session model of the REST API."""
    model: dict[str, Any] = {
        "id": session.id,
        "path": session.path,
        "name": session.name,
        "type": session.type,
        "kernel": kernel_json(session.kernel),
    }
    if session.type == "notebook":
        model["notebook"] = {"path": session.path, "name": session.name}
    return model


def answers_errors(handler: _Handler) -> _Handler:
    """Turn the KernelsErrors a handler raises into JSON answers with a `message`, and
    anything else into a short 500: a traceback goes to the log, never to the client."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except KernelsError as error:
            return error_response(error)
        except Exception:
            logger.exception("500 in %s", handler.__qualname__)
            return JSONResponse(
                {"message": "Internal server error (see the server log)", "reason": None},
                status_code=500,
            )

    return wrapper  # type: ignore[return-value]


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, read no further than `max_bytes`: PayloadTooLarge past it."""
    too_large = PayloadTooLarge(f"Request body over the limit of {max_bytes} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request's JSON body, None when empty; BadRequest when it is not JSON, or JSON
    that Python would choke on later (too deep, too long numbers, lone surrogates)."""
    body = await read_body(request, max_bytes)
    if not body.strip():
        return None
    try:
        data = json.loads(body)
    except RecursionError as error:
        raise BadRequest("Invalid JSON in body of request: nested too deeply") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest("Invalid JSON in body of request") from error
    except ValueError as error:
        # json raises a bare ValueError for integers over sys.get_int_max_str_digits().
        raise BadRequest("Invalid JSON in body of request: a number has too many digits") from error
    if has_lone_surrogate(body, data):
        raise BadRequest("Invalid JSON in body of request: a lone UTF-16 surrogate escape")
    return data


class KernelsRouter(Kernels):
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
        extra_origins: Iterable[str] = (),
    ) -> None:
        self._auth = auth
        # Set before the ABC's __init__, which includes its router (through include_router).
        self._access = AccessGuard(
            AccessRules(
                allow_origin=[*config.allow_origin, *extra_origins],
                allow_origin_pat=config.allow_origin_pat,
                allow_remote_access=config.allow_remote_access,
                local_hostnames=config.local_hostnames,
            )
        )
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
        # One dependency, run before every route's own (auth included), HTTP and WebSocket.
        dependencies = [Depends(self._access), *kwargs.pop("dependencies", [])]
        super().include_router(router, dependencies=dependencies, **kwargs)

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

        # The jupyter-server-nbmodel protocol (POST …/execute is the ABC's route).
        @router.get("/api/kernels/{kernel_id}/execute")
        async def get_execute_requests(
            kernel_id: str,
            user: User = Depends(auth.current_user(permissions={"kernels": ["read"]})),
        ) -> Response:
            return await self.get_execute_requests(kernel_id, user)

        @router.get("/api/kernels/{kernel_id}/requests/{request_id}")
        async def get_execute_request(
            kernel_id: str,
            request_id: str,
            user: User = Depends(auth.current_user(permissions={"kernels": ["read"]})),
        ) -> Response:
            return await self.get_execute_request(kernel_id, request_id, user)

        @router.post("/api/kernels/{kernel_id}/input", status_code=201)
        async def send_input(
            request: Request,
            kernel_id: str,
            user: User = Depends(auth.current_user(permissions={"kernels": ["write"]})),
        ) -> Response:
            return await self.send_input(request, kernel_id, user)

    # --- status and kernelspecs ----------------------------------------------------------

    @answers_errors
    async def get_status(self, user: User) -> Response:
        await self.registry.refresh()
        kernels = self.registry.kernel_infos()
        last = max([self._app.last_activity] + [k.last_activity for k in kernels])
        return JSONResponse(
            {
                "connections": sum(k.connections for k in kernels),
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

    @answers_errors
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
        if path_problem(kernel_name) is not None:
            # No kernelspec can have that name (and the file system would raise on it).
            raise KernelspecNotFound(kernel_name)
        spec = await self.registry.kernelspec(kernel_name)
        return JSONResponse(self._spec_model(spec, kernel_name))

    @answers_errors
    async def get_kernelspec(self, kernel_name: str, file_name: str, user: User) -> Response:
        for name in (kernel_name, file_name):
            problem = path_problem(str(name))
            if problem is not None:
                raise NotFound(f"No file {file_name!r} in kernelspec {kernel_name!r}: {problem}")
        resource = await self.registry.kernelspec_resource(str(kernel_name), str(file_name))
        if resource.path is not None:
            return FileResponse(resource.path)
        return Response(resource.content, media_type=resource.media_type)

    # --- kernels -------------------------------------------------------------------------

    @answers_errors
    async def start_kernel(self, request: Request, user: User) -> Response:
        body = parse_body(StartKernel, await read_json(request, self.config.max_body_bytes) or {})
        kernel = await self.registry.start_kernel(
            body.name, body.path, body.kernel_id, username=user.username
        )
        base_url = self.frontend_config.base_url.rstrip("/") + "/"
        return JSONResponse(
            kernel_json(kernel),
            status_code=201,
            headers={"Location": f"{base_url}api/kernels/{kernel.id}"},
        )

    @answers_errors
    async def get_kernels(self, user: User) -> Response:
        await self.registry.refresh()
        return JSONResponse([kernel_json(kernel) for kernel in self.registry.kernel_infos()])

    @answers_errors
    async def get_kernel(self, kernel_id: str, user: User) -> Response:
        self.registry.entry(kernel_id)
        await self.registry.refresh()
        return JSONResponse(kernel_json(self.registry.kernel_info(kernel_id)))

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
        return JSONResponse(kernel_json(await self.registry.restart_kernel(kernel_id)))

    @answers_errors
    async def execute_cell(self, request: Request, kernel_id: str, user: User) -> Response:
        execution = self._execution()
        data = await read_json(request, self.config.max_body_bytes)
        if isinstance(data, dict) and "code" in data:
            # jupyter-server-nbmodel's body: {"code", "metadata": {"cell_id", ...}}.
            code = parse_body(ExecuteCode, data)
            meta = code.metadata
            queued = await execution.submit_request(
                kernel_id,
                code.code,
                meta.cell_id if meta is not None else None,
                meta.document_id if meta is not None else None,
            )
            return JSONResponse(
                queued.accepted(),
                status_code=202,
                headers={"Location": queued.url, "Access-Control-Expose-Headers": "Location"},
            )
        body = parse_body(ExecuteCell, data)
        answer = await execution.execute(kernel_id, body.document_id, body.cell_id)
        return JSONResponse(answer, status_code=202)

    def _execution(self) -> ServerSideExecution:
        if self.execution is None:
            raise Conflict(
                "Server-side execution needs the Yjs plugin: start jupyverse with "
                "--set kernels.require_yjs=true"
            )
        return self.execution

    @answers_errors
    async def get_execute_requests(self, kernel_id: str, user: User) -> Response:
        execution = self._execution()
        self.registry.entry(kernel_id)
        requests = execution.requests.pending(kernel_id)
        return JSONResponse({"kernel_id": kernel_id, "requests": requests})

    @answers_errors
    async def get_execute_request(self, kernel_id: str, request_id: str, user: User) -> Response:
        status, body, headers = self._execution().requests.poll(kernel_id, request_id)
        if "Location" in headers:
            headers["Access-Control-Expose-Headers"] = "Location"
        return JSONResponse(body, status_code=status, headers=headers)

    @answers_errors
    async def send_input(self, request: Request, kernel_id: str, user: User) -> Response:
        execution = self._execution()
        body = parse_body(InputReply, await read_json(request, self.config.max_body_bytes))
        execution.send_input(kernel_id, body.input)
        return Response(status_code=201)

    async def watch_connection_files(self, path: Path) -> None:
        """Serve the external kernels whose connection files are in `path`, until cancelled."""
        watcher = ExternalKernels(path, self.registry, ConnectionFileLauncher(self.config))
        await watcher.run()

    # --- sessions ------------------------------------------------------------------------

    @answers_errors
    async def get_sessions(self, user: User) -> Response:  # type: ignore[override]
        await self.registry.refresh()
        return JSONResponse([session_json(session) for session in self.registry.session_infos()])

    @answers_errors
    async def get_session(self, session_id: str, user: User) -> Response:
        self.registry.session(session_id)
        await self.registry.refresh()
        return JSONResponse(session_json(self.registry.session_info(session_id)))

    @answers_errors
    async def create_session(self, request: Request, user: User) -> Response:  # type: ignore[override]
        body = parse_body(CreateSession, await read_json(request, self.config.max_body_bytes))
        kernel = body.kernel
        session = await self.registry.create_session(
            body.path,
            body.type,
            body.name,
            kernel_id=kernel.id if kernel is not None else None,
            kernel_name=kernel.name if kernel is not None else None,
            username=user.username,
        )
        base_url = self.frontend_config.base_url.rstrip("/") + "/"
        return JSONResponse(
            session_json(session),
            status_code=201,
            headers={"Location": f"{base_url}api/sessions/{session.id}"},
        )

    @answers_errors
    async def rename_session(self, request: Request, user: User) -> Response:  # type: ignore[override]
        session_id = request.path_params["session_id"]
        body = parse_body(UpdateSession, await read_json(request, self.config.max_body_bytes))
        kernel = body.kernel
        session = await self.registry.update_session(
            session_id,
            path=body.path,
            type=body.type,
            name=body.name,
            kernel_id=kernel.id if kernel is not None else None,
            kernel_name=kernel.name if kernel is not None else None,
            username=user.username,
        )
        return JSONResponse(session_json(session))

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
            await websocket.close(code=CloseCode.POLICY_VIOLATION)
            return
        try:
            entry = self.registry.entry(kernel_id)
        except KernelNotFound as error:
            # JupyterLab expects the upgrade to succeed, then reads the close code and reason.
            await websocket.accept()
            await websocket.close(code=CloseCode.KERNEL_NOT_FOUND, reason=error.message)
            logger.info("Closed a WebSocket to an unknown kernel %s", kernel_id)
            return
        await entry.server.serve(websocket, session_id, permissions)
