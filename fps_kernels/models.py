"""The JSON bodies clients send, validated into typed objects."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import BadRequest, InvalidField


class _Body(BaseModel):
    # Unknown keys are ignored, as the reference server does.
    model_config = ConfigDict(extra="ignore", strict=True)


def _check_kernel_id(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError("must be a UUID") from None


class KernelRef(_Body):
    id: str | None = None
    name: str | None = None

    @field_validator("id")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        return _check_kernel_id(value)


class StartKernel(_Body):
    name: str | None = None
    path: str | None = None
    kernel_id: str | None = None

    @field_validator("kernel_id")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        return _check_kernel_id(value)


class CreateSession(_Body):
    path: str
    type: str
    name: str | None = None
    kernel: KernelRef | None = None


class UpdateSession(_Body):
    path: str | None = None
    type: str | None = None
    name: str | None = None
    kernel: KernelRef | None = None


class ExecuteCell(_Body):
    document_id: str
    cell_id: str


def parse_body(model: type[_Body], data: Any) -> Any:
    """Validate `data` (already parsed JSON) into `model`, with errors that name the field."""
    if data is None:
        raise BadRequest("No JSON data provided")
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object")
    if model is CreateSession and "path" not in data and isinstance(data.get("notebook"), dict):
        # Old clients send {"notebook": {"path": ...}} for notebooks.
        data = {**data, "path": data["notebook"].get("path"), "type": "notebook"}
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        if first["type"] == "missing":
            raise BadRequest(f"Missing field in JSON data: {field}") from None
        message = first["msg"].removeprefix("Value error, ")
        raise InvalidField(f"Invalid field in JSON data: {field}: {message}") from None
