"""The JSON bodies clients send, validated into typed objects."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .errors import BadRequest, InvalidField

# Longest file name component of the usual file systems (ext4, APFS, NTFS: 255).
_MAX_NAME_BYTES = 255
# Validation errors that mean a malformed request (400), not a field of the wrong kind (422).
_BAD_REQUEST = "bad_request"


class _Body(BaseModel):
    # Unknown keys are ignored, as the reference server does.
    model_config = ConfigDict(extra="ignore", strict=True)

    @field_validator("*")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # A NUL reaches file names, environment variables and C strings, which refuse it.
        if isinstance(value, str) and "\x00" in value:
            raise PydanticCustomError(_BAD_REQUEST, "must not contain a NUL character")
        return value


def path_problem(value: str) -> str | None:
    """What makes `value` unusable as a file path, or None: file systems refuse a NUL and
    components over 255 bytes (and Python answers with an exception, not an error)."""
    if "\x00" in value:
        return "must not contain a NUL character"
    if any(
        len(part.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES for part in value.split("/")
    ):
        return f"has a path component over {_MAX_NAME_BYTES} bytes"
    return None


def _check_path(value: str | None) -> str | None:
    problem = None if value is None else path_problem(value)
    if problem is not None:
        raise PydanticCustomError(_BAD_REQUEST, problem)
    return value


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

    _path = field_validator("path")(_check_path)

    @field_validator("kernel_id")
    @classmethod
    def _uuid(cls, value: str | None) -> str | None:
        return _check_kernel_id(value)


class CreateSession(_Body):
    path: str
    type: str
    name: str | None = None
    kernel: KernelRef | None = None

    _path = field_validator("path")(_check_path)


class UpdateSession(_Body):
    path: str | None = None
    type: str | None = None
    name: str | None = None
    kernel: KernelRef | None = None

    _path = field_validator("path")(_check_path)


class ExecuteCell(_Body):
    document_id: str
    cell_id: str


class ExecuteMetadata(_Body):
    cell_id: str | None = None
    document_id: str | None = None
    document_path: str | None = None
    record_timing: bool | None = None


class ExecuteCode(_Body):
    """A jupyter-server-nbmodel request (told from ExecuteCell by its `code`)."""

    code: str
    metadata: ExecuteMetadata | None = None


class InputReply(_Body):
    input: str


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
            raise BadRequest(f"Missing field in JSON data: {field}") from error
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == _BAD_REQUEST:
            raise BadRequest(f"Invalid field in JSON data: {field}: {message}") from error
        raise InvalidField(f"Invalid field in JSON data: {field}: {message}") from error
