"""The jupyter-server-nbmodel request protocol: execution requests a client polls.

`POST /api/kernels/{id}/execute {"code", "metadata": {...}}` queues a request and answers 202
with where to poll it (`/api/kernels/{id}/requests/{uid}`). Polling answers 202 while it is
queued or runs (with the outputs so far), 300 while the kernel waits in `input()` for it, and
its result once (200, or 500 when it was not run); then 404. A `Request` is told what happens
by the kernel driver (it is the driver's `ExecutionObserver`); `Requests` keeps them, finished
ones for a bounded time and number, and says what each poll answers.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from .errors import NotFound
from .kernel_driver.outputs import CellOutputs, DisplayMap

#: How long and how many finished results are kept for a client to fetch.
KEEP_SECONDS = 3600.0
KEEP_FINISHED = 1000


class RequestNotFound(NotFound):
    def __init__(self, kernel_id: str, request_id: str) -> None:
        super().__init__(
            f"Request {request_id} of kernel {kernel_id} not found: it never existed, its "
            "result was already handed out, or it expired"
        )


class ListSink:
    """A list of nbformat outputs, as outputs.py's rules write them."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.items)

    def append(self, output: dict[str, Any]) -> None:
        self.items.append(dict(output))

    def replace(self, index: int, output: dict[str, Any]) -> None:
        self.items[index] = dict(output)

    def clear(self) -> None:
        self.items.clear()

    def stream_text(self, index: int) -> str | None:
        item = self.items[index]
        return str(item.get("text", "")) if item.get("output_type") == "stream" else None

    def set_stream_text(self, index: int, keep: int, tail: str) -> None:
        item = self.items[index]
        item["text"] = str(item.get("text", ""))[:keep] + tail

    def append_widget(self, model_id: str) -> bool:
        return False


@dataclass(eq=False)
class Request:
    """One execution request of the protocol, and what the client has been told of it."""

    kernel_id: str
    cell_id: str | None = None
    document_id: str | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    status: str = "queued"  # running, input, done, cancelled
    reply_status: str | None = None
    execution_count: int | None = None
    message: str = ""
    input_request: dict[str, Any] | None = None
    input_parent: dict[str, Any] | None = None
    finished_at: float | None = None
    sink: ListSink = field(default_factory=ListSink)

    def __post_init__(self) -> None:
        self._outputs = CellOutputs(self.sink, self.id, DisplayMap())

    @property
    def url(self) -> str:
        return f"/api/kernels/{self.kernel_id}/requests/{self.id}"

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def outputs_json(self) -> str:
        return json.dumps(self.sink.items)

    # --- the driver's ExecutionObserver --------------------------------------------------

    def started(self) -> None:
        if self.status == "queued":
            self.status = "running"

    def output(self, msg_type: str, content: dict[str, Any]) -> None:
        self._outputs.apply(msg_type, content)

    def update_display(self, content: dict[str, Any]) -> None:
        self._outputs.displays.update(content, self._sink_for)

    def _sink_for(self, key: Hashable) -> ListSink | None:
        return self.sink if key == self.id else None

    def input_requested(self, header: dict[str, Any], content: dict[str, Any]) -> None:
        self.status = "input"
        self.input_parent = header
        self.input_request = {
            "prompt": str(content.get("prompt", "")),
            "password": bool(content.get("password", False)),
        }

    def input_answered(self) -> None:
        if self.status == "input":
            self.status = "running"
        self.input_request = None
        self.input_parent = None

    def finished_with(self, reply: dict[str, Any]) -> None:
        status = str(reply.get("status", "error"))
        count = reply.get("execution_count")
        self.execution_count = count if isinstance(count, int) else None
        if status == "aborted":
            self._end("cancelled", "aborted", "The request was not run: an earlier one failed")
        else:
            self._end("done", status)

    def failed(self, ename: str, evalue: str, started: bool) -> None:
        self._outputs.add_error(ename, evalue)
        if started:
            self._end("done", "error")
        else:
            self._end("cancelled", "error", f"{ename}: {evalue}")

    def _end(self, status: str, reply_status: str, message: str = "") -> None:
        if self.finished:
            return
        self.status = status
        self.reply_status = reply_status
        self.message = message
        self.input_request = None
        self.finished_at = time.monotonic()

    # --- what the client is told ---------------------------------------------------------

    def accepted(self) -> dict[str, Any]:
        """The body of the 202 that queued it."""
        return {**self.progress(), "request_status": "queued"}

    def progress(self) -> dict[str, Any]:
        return {
            "kernel_id": self.kernel_id,
            "request_id": self.id,
            "request_url": self.url,
            "request_status": self.status,
            "pending": not self.finished,
            "cell_id": self.cell_id,
            "document_id": self.document_id,
            "outputs": self.outputs_json(),
        }

    def answer(self) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Status code, body and headers of a poll."""
        if self.status == "input" and self.input_request is not None:
            body = {
                **self.progress(),
                "parent_header": self.input_parent,
                "input_request": self.input_request,
            }
            return 300, body, {"Location": f"/api/kernels/{self.kernel_id}/input"}
        if not self.finished:
            return 202, self.progress(), {"Location": self.url}
        if self.status == "cancelled":
            body = {"message": self.message, "error": self.message, "request_id": self.id}
            return 500, body, {}
        body = {
            "status": self.reply_status,
            "execution_count": self.execution_count,
            "outputs": self.outputs_json(),
        }
        return 200, body, {}


class Requests:
    """The requests of every kernel: in flight, and finished until handed out or expired."""

    def __init__(self, keep_seconds: float = KEEP_SECONDS, keep_finished: int = KEEP_FINISHED):
        self._keep_seconds = keep_seconds
        self._keep_finished = keep_finished
        self._requests: OrderedDict[str, Request] = OrderedDict()

    def add(self, request: Request) -> None:
        self._expire()
        self._requests[request.id] = request

    def poll(self, kernel_id: str, request_id: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        """What a poll answers; a finished result is handed out once."""
        self._expire()
        request = self._requests.get(request_id)
        if request is None or request.kernel_id != kernel_id:
            raise RequestNotFound(kernel_id, request_id)
        answer = request.answer()
        if request.finished:
            del self._requests[request_id]
        return answer

    def pending(self, kernel_id: str) -> list[dict[str, Any]]:
        """The kernel's requests whose result was not handed out, oldest first."""
        self._expire()
        return [r.progress() for r in self._requests.values() if r.kernel_id == kernel_id]

    def waiting_for_input(self, kernel_id: str) -> Request | None:
        for request in self._requests.values():
            if request.kernel_id == kernel_id and request.status == "input":
                return request
        return None

    def forget_kernel(self, kernel_id: str) -> None:
        for request_id in [r.id for r in self._requests.values() if r.kernel_id == kernel_id]:
            del self._requests[request_id]

    def _expire(self) -> None:
        now = time.monotonic()
        finished = [r for r in self._requests.values() if r.finished_at is not None]
        extra = len(finished) - self._keep_finished
        for request in finished:
            assert request.finished_at is not None
            if extra > 0 or now - request.finished_at > self._keep_seconds:
                del self._requests[request.id]
                extra -= 1
