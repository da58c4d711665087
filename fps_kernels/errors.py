"""What can go wrong with a request, raised where it is understood.

routes.py turns each kind into an HTTP answer, in one place (`STATUS_CODES`, looked up along
the class's MRO: a new subclass answers as its closest listed base class).
"""

from __future__ import annotations


class KernelsError(Exception):
    """A request that cannot be done; `message` is shown to the user by JupyterLab."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class NotFound(KernelsError):
    """An unknown kernel, session, kernelspec or file."""


class KernelNotFound(NotFound):
    def __init__(self, kernel_id: str) -> None:
        super().__init__(f"Kernel does not exist: {kernel_id}")
        self.kernel_id = kernel_id


class SessionNotFound(NotFound):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"Session not found: {session_id}")


class KernelspecNotFound(NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"Kernel spec {name} not found")


class KernelspecBroken(KernelsError):
    """A kernelspec that is there but cannot be used: the server's configuration is wrong
    (a kernel.json that is not JSON or lacks a field), not the request."""

    def __init__(self, name: str, path: str, problem: str) -> None:
        super().__init__(f"Kernel spec {name} is broken: {path}: {problem}")
        self.path = path
        self.problem = problem


class BadRequest(KernelsError):
    """A body that is not JSON, not an object, or lacks a field."""


class PayloadTooLarge(KernelsError):
    """A request body over the size limit (max_body_bytes)."""


class InvalidField(KernelsError):
    """A field of the right name with a value of the wrong kind."""


class Conflict(KernelsError):
    """A request that the current state does not allow."""


class KernelFailed(KernelsError):
    """A kernel that would not start, restart or answer."""


class DocumentNotFound(NotFound):
    def __init__(self, document_id: str, detail: str = "") -> None:
        super().__init__(f"Document not found: {document_id}{detail}")
        self.document_id = document_id


class CellNotFound(NotFound):
    def __init__(self, document_id: str, cell_id: str) -> None:
        super().__init__(f"Cell not found: {cell_id} (in document {document_id})")
        self.cell_id = cell_id


class GatewayError(KernelsError):
    """A kernel gateway that answered with an error (its message is kept)."""


class GatewayUnavailable(GatewayError):
    """A kernel gateway that cannot be reached."""


class GatewayTimeout(GatewayError):
    """A kernel gateway that did not answer in time."""
