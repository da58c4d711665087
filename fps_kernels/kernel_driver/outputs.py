"""How iopub messages become a cell's nbformat 4 outputs, by JupyterLab's output area rules.

Pure code: it works on an `OutputSink` (a list of outputs it may append to, replace in, clear,
and edit the text of a stream in), so that the rules are tested without a kernel or a Y
document. The rules are those of JupyterLab 4's `OutputAreaModel`:

- consecutive `stream` outputs of the same name are merged into one output, whose text is
  written as a terminal would: `\\r` goes back to the start of the line, `\\n` to a new line,
  a backspace erases, and later characters overwrite;
- `display_data`, `execute_result` and `error` are appended as they are (without the
  message's `transient` part);
- `clear_output` clears, or with `wait=True` clears just before the next output is added;
- `update_display_data` replaces every output that was displayed with its `display_id`,
  in every cell (see `DisplayMap`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Protocol

#: The MIME type of a collaborative widget's view (ypywidgets).
YWIDGET_MIME = "application/vnd.jupyter.ywidget-view+json"

_CONTROL_CHARS = re.compile(r"[\n\b\r]")
_OUTPUT_TYPES = ("stream", "display_data", "execute_result", "error")


class OutputSink(Protocol):
    """A cell's list of outputs, as the rules need it."""

    def __len__(self) -> int: ...

    def append(self, output: dict[str, Any]) -> None: ...

    def replace(self, index: int, output: dict[str, Any]) -> None: ...

    def clear(self) -> None: ...

    def stream_text(self, index: int) -> str | None:
        """The text of the output at `index` if it is a stream, else None."""

    def set_stream_text(self, index: int, keep: int, tail: str) -> None:
        """Keep the first `keep` characters of a stream's text and add `tail` after them."""

    def append_widget(self, model_id: str) -> bool:
        """Add the Y document of widget `model_id`; False when there is no such widget."""


def write_terminal(text: str, cursor: int, chunk: str) -> tuple[str, int]:
    """Write `chunk` into `text` at `cursor` the way JupyterLab's output area does.

    Returns the new text and cursor. Characters overwrite what is under the cursor; `\\n`
    starts a new line at the end of the text; `\\r` moves the cursor to the start of its line;
    a backspace erases the character before the cursor (and, exactly as JupyterLab does,
    the one under it when the cursor is not at the end). The cursor never leaves the last
    line, so only that line is edited: long outputs cost one copy per chunk, not per line.
    """
    base = text.rfind("\n") + 1
    line, col = text[base:], max(cursor - base, 0)
    done: list[str] = []  # lines finished by this chunk

    def put(piece: str) -> None:
        nonlocal line, col
        line = line[:col] + piece + line[col + len(piece) :]
        col += len(piece)

    start = 0
    for match in _CONTROL_CHARS.finditer(chunk):
        put(chunk[start : match.start()])
        start = match.end()
        char = match.group()
        if char == "\n":
            done.append(line + "\n")
            line, col = "", 0
        elif char == "\r":
            col = 0
        elif col > 0:
            line = line[: col - 1] + line[col + 1 :]
            col -= 1
    put(chunk[start:])
    head = text[:base] + "".join(done)
    return head + line, len(head) + col


def changed_from(old: str, new: str) -> int:
    """How many leading characters `old` and `new` share, knowing that the lines of `old`
    before its last one are never changed by `write_terminal`."""
    base = old.rfind("\n") + 1
    if new[:base] != old[:base]:
        return common_prefix_length(old, new)
    return base + common_prefix_length(old[base:], new[base:])


def common_prefix_length(a: str, b: str) -> int:
    # Slices compare at C speed: a character loop took seconds per chunk on a long line.
    size = min(len(a), len(b))
    if a[:size] == b[:size]:
        return size
    low, high = 0, size  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


def _as_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(str(part) for part in value)
    return ""


def output_from_message(msg_type: str, content: Mapping[str, Any]) -> dict[str, Any] | None:
    """The nbformat 4 output for an iopub message that adds one, else None."""
    if msg_type == "stream":
        return {
            "output_type": "stream",
            "name": str(content.get("name") or "stdout"),
            "text": _as_text(content.get("text")),
        }
    if msg_type in ("display_data", "update_display_data"):
        return {
            "output_type": "display_data",
            "data": _as_dict(content.get("data")),
            "metadata": _as_dict(content.get("metadata")),
        }
    if msg_type == "execute_result":
        count = content.get("execution_count")
        return {
            "output_type": "execute_result",
            "data": _as_dict(content.get("data")),
            "metadata": _as_dict(content.get("metadata")),
            "execution_count": count if isinstance(count, int) else None,
        }
    if msg_type == "error":
        traceback = content.get("traceback")
        return {
            "output_type": "error",
            "ename": str(content.get("ename", "")),
            "evalue": str(content.get("evalue", "")),
            "traceback": [str(line) for line in traceback] if isinstance(traceback, list) else [],
        }
    return None


def error_output(ename: str, evalue: str) -> dict[str, Any]:
    """An error output of the server's own (a kernel that died or restarted, ...)."""
    return {
        "output_type": "error",
        "ename": ename,
        "evalue": evalue,
        "traceback": [f"{ename}: {evalue}"],
    }


def display_id(content: Mapping[str, Any]) -> str | None:
    transient = content.get("transient")
    if isinstance(transient, Mapping):
        value = transient.get("display_id")
        if isinstance(value, str) and value:
            return value
    return None


def widget_model_id(content: Mapping[str, Any]) -> str | None:
    """The model id of a collaborative widget's view in a display message, if any."""
    data = content.get("data")
    view = data.get(YWIDGET_MIME) if isinstance(data, Mapping) else None
    model_id = view.get("model_id") if isinstance(view, Mapping) else None
    return model_id if isinstance(model_id, str) and model_id else None


class DisplayMap:
    """Where each display_id was displayed: cell key → indices in that cell's outputs."""

    def __init__(self) -> None:
        self._targets: dict[str, dict[Hashable, list[int]]] = {}

    def add(self, display: str, cell: Hashable, index: int) -> None:
        self._targets.setdefault(display, {}).setdefault(cell, []).append(index)

    def forget_cell(self, cell: Hashable) -> None:
        for display in list(self._targets):
            cells = self._targets[display]
            cells.pop(cell, None)
            if not cells:
                del self._targets[display]

    def targets(self, display: str) -> dict[Hashable, list[int]]:
        return {cell: list(indices) for cell, indices in self._targets.get(display, {}).items()}

    def update(
        self,
        content: Mapping[str, Any],
        sink_for: Callable[[Hashable], OutputSink | None],
    ) -> int:
        """Apply an update_display_data to every output it targets; how many were replaced."""
        display = display_id(content)
        output = output_from_message("update_display_data", content)
        if display is None or output is None:
            return 0
        replaced = 0
        for cell, indices in self.targets(display).items():
            sink = sink_for(cell)
            if sink is None:
                continue
            for index in indices:
                if index < len(sink):
                    sink.replace(index, dict(output))
                    replaced += 1
        return replaced


class CellOutputs:
    """The state JupyterLab keeps for one cell's output area while the cell runs."""

    def __init__(self, sink: OutputSink, cell: Hashable, displays: DisplayMap) -> None:
        self.sink = sink
        self.cell = cell
        self.displays = displays
        self._stream_name = ""  # the name of the stream output last added, "" if none
        self._cursor = 0  # where the terminal cursor is in that stream's text
        # Where that stream output is: another writer of the cell (a page echoing what was
        # typed for input()) may add outputs after it, and those are not merged into.
        self._stream_index = -1
        self._clear_next = False

    def forget(self) -> None:
        """The cell's outputs were cleared elsewhere: start afresh."""
        self.displays.forget_cell(self.cell)
        self._stream_name = ""
        self._cursor = 0
        self._clear_next = False

    def clear(self, wait: bool = False) -> None:
        self._stream_name = ""
        if wait:
            self._clear_next = True
            return
        self._clear_next = False
        self.sink.clear()
        self.displays.forget_cell(self.cell)

    def apply(self, msg_type: str, content: Mapping[str, Any]) -> None:
        """Account for one iopub message whose parent is this cell's execute_request."""
        if msg_type == "clear_output":
            self.clear(wait=bool(content.get("wait", False)))
            return
        if msg_type not in _OUTPUT_TYPES:
            return
        output = output_from_message(msg_type, content)
        if output is None:
            return
        if self._clear_next:
            self.clear()
        if msg_type == "stream":
            self._add_stream(output)
            return
        self._stream_name = ""
        model_id = widget_model_id(content) if msg_type != "error" else None
        if model_id is None or not self.sink.append_widget(model_id):
            self.sink.append(output)
        display = display_id(content)
        if display is not None and msg_type == "display_data":
            self.displays.add(display, self.cell, len(self.sink) - 1)

    def add_error(self, ename: str, evalue: str) -> None:
        """Add an error of the server's own, as if the kernel had sent it."""
        self.apply("error", error_output(ename, evalue))

    def _add_stream(self, output: dict[str, Any]) -> None:
        name = output["name"]
        last = len(self.sink) - 1
        current = self.sink.stream_text(last) if last >= 0 else None
        if name == self._stream_name and current is not None and last == self._stream_index:
            text, self._cursor = write_terminal(current, self._cursor, output["text"])
            keep = changed_from(current, text)
            if keep != len(current) or keep != len(text):
                self.sink.set_stream_text(last, keep, text[keep:])
            return
        output["text"], self._cursor = write_terminal("", 0, output["text"])
        self.sink.append(output)
        self._stream_name = name
        self._stream_index = len(self.sink) - 1
