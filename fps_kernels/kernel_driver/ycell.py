"""A code cell of a shared notebook (a pycrdt Y document), as the executor writes it.

The cell's fields are those of fps-yjs 0.6.4's YNotebook: `source` (Y text), `outputs`
(Y array), `execution_count`, and `execution_status` (`running` or `idle`, never saved).
JupyterLab 4.6 draws the prompt (`[*]`) from another key, `execution_state` (its
`YCodeCell.executionState`, `running` or `idle`, `idle` when absent), which fps-yjs 0.6.4 does
save: it is `running` only while the cell is queued or runs, and removed when it ends, so that
the notebook saved after a run is valid nbformat 4. Outputs are written as JupyterLab 4 writes
them into the shared model: one Y map per output, with a stream's text as a Y text that grows
as the stream does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pycrdt import Array, Doc, Map, Text

#: Gives the Y document of a collaborative widget by model id (None if unknown).
WidgetDocs = Callable[[str], Doc | None]


#: fps-yjs 0.6.4's key (not saved) and JupyterLab 4.6's (saved by fps-yjs 0.6.4).
STATUS_KEY = "execution_status"
STATE_KEY = "execution_state"


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


class CellGone(LookupError):
    """The cell is no longer in its notebook (deleted meanwhile)."""


class YOutputs:
    """A cell's `outputs` Y array as an OutputSink (see outputs.py).

    Given a function rather than an array, it asks for the array at each access: a cell moved
    by a client is a new Y map (with the same id), and the old one is deleted; pycrdt 0.9 may
    crash the process on a read of a deleted array, so a deleted one is never touched.
    """

    def __init__(
        self, outputs: Array | Callable[[], Array], widget_docs: WidgetDocs | None = None
    ) -> None:
        self._array = outputs if callable(outputs) else (lambda: outputs)
        self._widget_docs = widget_docs

    @property
    def _outputs(self) -> Array:
        return self._array()

    def __len__(self) -> int:
        return len(self._outputs)

    def append(self, output: dict[str, Any]) -> None:
        self._outputs.append(_to_y(output))

    def replace(self, index: int, output: dict[str, Any]) -> None:
        self._outputs[index] = _to_y(output)

    def clear(self) -> None:
        outputs = self._outputs
        if len(outputs):
            outputs.clear()

    def stream_text(self, index: int) -> str | None:
        item = self._outputs[index]
        if not isinstance(item, (Map, dict)) or item.get("output_type") != "stream":
            return None
        text = item.get("text")
        if isinstance(text, list):
            return "".join(str(part) for part in text)
        return str(text) if text is not None else ""

    def set_stream_text(self, index: int, keep: int, tail: str) -> None:
        outputs = self._outputs
        item = outputs[index]
        text = item.get("text") if isinstance(item, Map) else None
        if not isinstance(text, Text):
            # A stream written as plain JSON by someone else: write it anew.
            current = self.stream_text(index) or ""
            output = dict(item) if isinstance(item, (Map, dict)) else {}
            output.update(output_type="stream", text=current[:keep] + tail)
            outputs[index] = _to_y(output)
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
    """A code cell of a shared notebook, found by id.

    With the notebook's `cells`, every access finds the cell again by id (a cell moved by a
    client is a new Y map), and a cell deleted meanwhile is never touched: reads give
    nothing, writes raise CellGone (outputs) or do nothing (state).
    """

    def __init__(
        self, ycell: Map, widget_docs: WidgetDocs | None = None, cells: Array | None = None
    ) -> None:
        self._ycell = ycell
        self._widget_docs = widget_docs
        self._cells = cells
        self._id = str(ycell.get("id", ""))

    def _current(self) -> Map | None:
        if self._cells is None:
            return self._ycell
        return find_cell(self._cells, self._id) if self._id else None

    def _live(self) -> Map:
        ycell = self._current()
        if ycell is None:
            raise CellGone(self._id)
        return ycell

    @property
    def cell_type(self) -> str:
        ycell = self._current()
        return str(ycell.get("cell_type", "")) if ycell is not None else ""

    @property
    def source(self) -> str:
        ycell = self._current()
        source = ycell.get("source") if ycell is not None else None
        if isinstance(source, list):
            return "".join(str(line) for line in source)
        return str(source) if source is not None else ""

    def _outputs_array(self) -> Array:
        ycell = self._live()
        outputs = ycell.get("outputs")
        if not isinstance(outputs, Array):
            ycell["outputs"] = Array()
            outputs = ycell["outputs"]
        return outputs

    def outputs(self) -> YOutputs:
        return YOutputs(self._outputs_array, self._widget_docs)

    @property
    def cell_id(self) -> str:
        return self._id

    def is_in(self, cells: Array) -> bool:
        """Whether the cell is still in the notebook's `cells` (not deleted meanwhile)."""
        return bool(self._id) and find_cell(cells, self._id) is not None

    def begin(self, running: bool = True) -> None:
        """Clear the outputs and the count, as JupyterLab does when a cell is run."""
        ycell = self._current()
        if ycell is None:
            return
        with ycell.doc.transaction():
            self.outputs().clear()
            ycell["execution_count"] = None
            ycell[STATUS_KEY] = "running" if running else "idle"
            if running:
                ycell[STATE_KEY] = "running"
            elif STATE_KEY in ycell:
                del ycell[STATE_KEY]

    def finish(self, execution_count: int | None) -> None:
        ycell = self._current()
        if ycell is None:
            return
        with ycell.doc.transaction():
            ycell["execution_count"] = execution_count
            ycell[STATUS_KEY] = "idle"
            if STATE_KEY in ycell:
                del ycell[STATE_KEY]


def clear_state(ycell: Map) -> None:
    """Remove JupyterLab's `execution_state` unless the cell runs: absent reads as `idle`
    in JupyterLab, and keeps the saved notebook valid nbformat 4."""
    if STATE_KEY in ycell and ycell.get(STATE_KEY) != "running":
        del ycell[STATE_KEY]


def idle_states(cells: Array) -> list[Map]:
    """The cells whose `execution_state` is there but not `running` (JupyterLab writes
    `idle` when a cell gets its count)."""
    found = []
    for ycell in cells:
        if isinstance(ycell, Map) and STATE_KEY in ycell and ycell.get(STATE_KEY) != "running":
            found.append(ycell)
    return found
