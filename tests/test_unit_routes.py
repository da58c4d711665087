"""The HTTP status of each kind of error: one table, looked up along the class's MRO."""

from __future__ import annotations

import pytest

from fps_kernels import routes
from fps_kernels.errors import (
    BadRequest,
    CellNotFound,
    Conflict,
    DocumentNotFound,
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
    SessionNotFound,
)
from fps_kernels.gateway.client import GatewayRefused

EXPECTED: dict[type[KernelsError], int] = {
    KernelsError: 500,
    NotFound: 404,
    KernelNotFound: 404,
    SessionNotFound: 404,
    KernelspecNotFound: 404,
    DocumentNotFound: 404,
    CellNotFound: 404,
    BadRequest: 400,
    PayloadTooLarge: 413,
    InvalidField: 422,
    Conflict: 409,
    KernelFailed: 500,
    KernelspecBroken: 500,
    GatewayError: 502,
    GatewayRefused: 502,
    GatewayUnavailable: 503,
    GatewayTimeout: 504,
}


class LateTimeout(GatewayTimeout):
    """A subclass the table does not name: it answers as its closest named base."""


def _statuses() -> dict[type[KernelsError], int]:
    kinds = [*EXPECTED, LateTimeout]
    # The status depends on the class only: an instance made without its arguments will do.
    return {kind: routes.status_code(KernelsError.__new__(kind)) for kind in kinds}


def test_each_kind_of_error_has_its_status_whatever_the_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _statuses() == {**EXPECTED, LateTimeout: 504}
    monkeypatch.setattr(routes, "STATUS_CODES", dict(reversed(routes.STATUS_CODES.items())))
    assert _statuses() == {**EXPECTED, LateTimeout: 504}


def test_an_error_answer_is_its_message_and_reason() -> None:
    response = routes.error_response(KernelNotFound("k1"))
    assert response.status_code == 404
    assert response.body == b'{"message":"Kernel does not exist: k1","reason":null}'
