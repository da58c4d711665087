"""A code cell of a shared notebook (a pycrdt Y document), as the executor writes it.

The cell's fields are those of fps-yjs 0.6.4's YNotebook: `source` (Y text), `outputs`
(Y array), `execution_count`, and `execution_status` (`running` or `idle`, never saved).
Outputs are written as JupyterLab 4 writes them into the shared model: one Y map per output,
with a stream's text as a Y text that grows as the stream does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pycrdt import Array, Doc, Map, Text

#: Gives the Y document of a collaborative widget by model id (None if unknown).
WidgetDocs = Callable[[str], Doc | None]


def find_cell(cells: Array, cell_id: str) -> Map | None:
    for ycell in cells:
        if isinstance(ycell, Map) and ycell.get("id") == cell_id:
            return ycell
    return None


def _to_y(output: dict[str, Any]) -> Map:
    if output.get("output_type") == "stream":
        output = {**output, "text": Text(str(output.get("text", "")))}
    return Map(output)


def _units(text: Text, value: str) -> Callable[[str], int]:
    """How to measure a prefix of `value` in the offsets `text` uses (pycrdt's change)."""
    length = len(text)
    if length == len(value):
        return len
    if length == len(value.encode("utf-8")):
        return lambda s: len(s.encode("utf-8"))
    return lambda s: len(s.encode("utf-16-le")) // 2


class YOutputs:
    """A cell's `outputs` Y array as an OutputSink (see outputs.py)."""

    def __init__(self, outputs: Array, widget_docs: WidgetDocs | None = None) -> None:
        self._outputs = outputs
        self._widget_docs = widget_docs

    def __len__(self) -> int:
        return len(self._outputs)

    def append(self, output: dict[str, Any]) -> None:
        self._outputs.append(_to_y(output))

    def replace(self, index: int, output: dict[str, Any]) -> None:
        self._outputs[index] = _to_y(output)

    def clear(self) -> None:
        if len(self._outputs):
            self._outputs.clear()

    def stream_text(self, index: int) -> str | None:
        item = self._outputs[index]
        if not isinstance(item, (Map, dict)) or item.get("output_type") != "stream":
            return None
        text = item.get("text")
        if isinstance(text, list):
            return "".join(str(part) for part in text)
        return str(text) if text is not None else ""

    def set_stream_text(self, index: int, keep: int, tail: str) -> None:
        item = self._outputs[index]
        text = item.get("text") if isinstance(item, Map) else None
        if not isinstance(text, Text):
            # A stream written as plain JSON by someone else: write it anew.
            current = self.stream_text(index) or ""
            output = dict(item) if isinstance(item, (Map, dict)) else {}
            output.update(output_type="stream", text=current[:keep] + tail)
            self._outputs[index] = _to_y(output)
            return
        current = str(text)
        measure = _units(text, current)
        start = measure(current[:keep])
        end = len(text)
        with text.doc.transaction():
            if end > start:
                del text[start:end]
            if tail:
                text += tail

    def append_widget(self, model_id: str) -> bool:
        doc = self._widget_docs(model_id) if self._widget_docs is not None else None
        if doc is None:
            return False
        self._outputs.append(doc)
        return True


class SharedCell:
    """A code cell of a shared notebook, found by id."""

    def __init__(self, ycell: Map, widget_docs: WidgetDocs | None = None) -> None:
        self._ycell = ycell
        self._widget_docs = widget_docs

    @property
    def cell_type(self) -> str:
        return str(self._ycell.get("cell_type", ""))

    @property
    def source(self) -> str:
        source = self._ycell.get("source")
        if isinstance(source, list):
            return "".join(str(line) for line in source)
        return str(source) if source is not None else ""

    def outputs(self) -> YOutputs:
        outputs = self._ycell.get("outputs")
        if not isinstance(outputs, Array):
            outputs = Array()
            self._ycell["outputs"] = outputs
            outputs = self._ycell["outputs"]
        return YOutputs(outputs, self._widget_docs)

    def _transaction(self) -> Any:
        return self._ycell.doc.transaction()

    def begin(self, running: bool = True) -> None:
        """Clear the outputs and the count, as JupyterLab does when a cell is run."""
        with self._transaction():
            self.outputs().clear()
            self._ycell["execution_count"] = None
            self._ycell["execution_status"] = "running" if running else "idle"

    def finish(self, execution_count: int | None) -> None:
        with self._transaction():
            self._ycell["execution_count"] = execution_count
            self._ycell["execution_status"] = "idle"
