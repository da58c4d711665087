"""The output rules of server-side execution (kernel_driver/outputs.py), without I/O."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from pycrdt import Array, Doc, Map, Text

from fps_kernels.kernel_driver.outputs import (
    YWIDGET_MIME,
    CellOutputs,
    DisplayMap,
    OutputSink,
    changed_from,
    common_prefix_length,
    output_from_message,
    write_terminal,
)
from fps_kernels.kernel_driver.ycell import SharedCell, YOutputs, find_cell


class ListSink:
    """An OutputSink over a plain list, recording the edits made to it."""

    def __init__(self, widgets: set[str] | None = None) -> None:
        self.items: list[Any] = []
        self.widgets = widgets or set()
        self.edits: list[tuple[str, Any]] = []

    def __len__(self) -> int:
        return len(self.items)

    def append(self, output: dict[str, Any]) -> None:
        self.items.append(output)
        self.edits.append(("append", output["output_type"]))

    def replace(self, index: int, output: dict[str, Any]) -> None:
        self.items[index] = output
        self.edits.append(("replace", index))

    def clear(self) -> None:
        self.items.clear()
        self.edits.append(("clear", None))

    def stream_text(self, index: int) -> str | None:
        item = self.items[index]
        return item["text"] if isinstance(item, dict) and item["output_type"] == "stream" else None

    def set_stream_text(self, index: int, keep: int, tail: str) -> None:
        self.items[index]["text"] = self.items[index]["text"][:keep] + tail
        self.edits.append(("text", (keep, tail)))

    def append_widget(self, model_id: str) -> bool:
        if model_id not in self.widgets:
            return False
        self.items.append(f"widget:{model_id}")
        return True


def stream(text: str, name: str = "stdout") -> dict[str, Any]:
    return {"name": name, "text": text}


def cell(sink: OutputSink | None = None, displays: DisplayMap | None = None) -> CellOutputs:
    sink = sink if sink is not None else ListSink()
    return CellOutputs(sink, "cell", displays if displays is not None else DisplayMap())


def items(outputs: CellOutputs) -> list[Any]:
    assert isinstance(outputs.sink, ListSink)
    return outputs.sink.items


# --- the terminal ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        (["hello\n", "world\n"], "hello\nworld\n"),
        (["no newline", " then more"], "no newline then more"),
        (["abc\rX"], "Xbc"),
        (["10%\r20%\r100%\n"], "100%\n"),
        (["ab\r", "c"], "cb"),
        (["abc\bd"], "abd"),
        (["abc\b\bX"], "aX"),
        (["\b\bx"], "x"),
        (["line\n\bx"], "line\nx"),
        (["a\r\nb"], "a\nb"),
        (["done\rdo"], "done"),
        (["first\nsecond\rSEC"], "first\nSECond"),
        (["é😀\rx"], "x😀"),
        (["abcdef\rab\bX"], "aXef"),  # JupyterLab erases under the cursor too
        (["abc\rX", "\n", "next"], "Xbc\nnext"),
        (["a\nb\nc\r", "Z"], "a\nb\nZ"),
    ],
)
def test_terminal(chunks: list[str], expected: str) -> None:
    text, cursor = "", 0
    for chunk in chunks:
        text, cursor = write_terminal(text, cursor, chunk)
    assert text == expected


def test_common_prefix() -> None:
    assert common_prefix_length("abc", "abd") == 2
    assert common_prefix_length("", "x") == 0
    assert common_prefix_length("same", "same") == 4
    assert common_prefix_length("abc", "abcdef") == 3
    for at in (0, 1, 999_999, 1_000_000, 1_999_999):
        long = "x" * 2_000_000
        assert common_prefix_length(long, long[:at] + "y" + long[at + 1 :]) == at
    assert changed_from("l1\nl2\nabc", "l1\nl2\nabX\n") == 8
    assert changed_from("l1\nabc", "L1\nabc") == 0


def test_long_outputs_stay_linear() -> None:
    chunk = "".join(f"{i}\n" for i in range(20000))
    text, cursor = "", 0
    started = time.monotonic()
    for _ in range(30):
        text, cursor = write_terminal(text, cursor, chunk)
    assert time.monotonic() - started < 5
    assert text.count("\n") == 600000 and cursor == len(text)


# --- streams ---------------------------------------------------------------------------------


def test_consecutive_streams_of_a_name_merge_and_keep_their_newlines() -> None:
    outputs = cell()
    outputs.apply("stream", stream("hello\n"))
    outputs.apply("stream", stream("world\n"))
    assert items(outputs) == [{"output_type": "stream", "name": "stdout", "text": "hello\nworld\n"}]


def test_streams_of_other_names_or_after_other_outputs_do_not_merge() -> None:
    outputs = cell()
    outputs.apply("stream", stream("a\n"))
    outputs.apply("stream", stream("b\n", "stderr"))
    outputs.apply("stream", stream("c\n"))
    outputs.apply("display_data", {"data": {"text/plain": "d"}, "metadata": {}})
    outputs.apply("stream", stream("e\n"))
    assert [(o["output_type"], o.get("text")) for o in items(outputs)] == [
        ("stream", "a\n"),
        ("stream", "b\n"),
        ("stream", "c\n"),
        ("display_data", None),
        ("stream", "e\n"),
    ]


def test_carriage_returns_across_chunks_rewrite_the_line_with_minimal_edits() -> None:
    outputs = cell()
    for chunk in ["\r0%", "\r50%", "\r100%", "\n"]:
        outputs.apply("stream", stream(chunk))
    assert items(outputs)[0]["text"] == "100%\n"
    sink = outputs.sink
    assert isinstance(sink, ListSink)
    assert sink.edits == [
        ("append", "stream"),
        ("text", (0, "50%")),
        ("text", (0, "100%")),
        ("text", (4, "\n")),
    ]


# --- other outputs ---------------------------------------------------------------------------


def test_display_result_and_error_are_nbformat_outputs_without_transient() -> None:
    outputs = cell()
    outputs.apply(
        "display_data",
        {"data": {"text/plain": "x"}, "metadata": {"m": 1}, "transient": {"display_id": "d"}},
    )
    outputs.apply(
        "execute_result", {"data": {"text/plain": "42"}, "metadata": {}, "execution_count": 7}
    )
    outputs.apply("error", {"ename": "E", "evalue": "v", "traceback": ["t1", "t2"], "extra": 1})
    assert items(outputs) == [
        {"output_type": "display_data", "data": {"text/plain": "x"}, "metadata": {"m": 1}},
        {
            "output_type": "execute_result",
            "data": {"text/plain": "42"},
            "metadata": {},
            "execution_count": 7,
        },
        {"output_type": "error", "ename": "E", "evalue": "v", "traceback": ["t1", "t2"]},
    ]


def test_messages_that_are_not_outputs_are_ignored() -> None:
    outputs = cell()
    for msg_type in ("status", "execute_input", "comm_open", "update_display_data", "x"):
        outputs.apply(msg_type, {"data": {}, "execution_state": "busy"})
    assert items(outputs) == []
    assert output_from_message("status", {}) is None


def test_garbage_content_still_gives_valid_outputs() -> None:
    assert output_from_message("stream", {"text": ["a", "b"]}) == {
        "output_type": "stream",
        "name": "stdout",
        "text": "ab",
    }
    assert output_from_message("execute_result", {"data": "x", "execution_count": "1"}) == {
        "output_type": "execute_result",
        "data": {},
        "metadata": {},
        "execution_count": None,
    }
    assert output_from_message("error", {})["traceback"] == []  # type: ignore[index]


# --- clear_output ----------------------------------------------------------------------------


def test_clear_output_clears_at_once() -> None:
    outputs = cell()
    outputs.apply("stream", stream("gone\n"))
    outputs.apply("clear_output", {"wait": False})
    assert items(outputs) == []
    outputs.apply("stream", stream("kept\n"))
    assert items(outputs) == [{"output_type": "stream", "name": "stdout", "text": "kept\n"}]


def test_clear_output_wait_clears_on_the_next_output_only() -> None:
    outputs = cell()
    outputs.apply("stream", stream("old\n"))
    outputs.apply("clear_output", {"wait": True})
    assert [o["text"] for o in items(outputs)] == ["old\n"]
    outputs.apply("stream", stream("new\n"))
    assert [o["text"] for o in items(outputs)] == ["new\n"]
    outputs.apply("stream", stream("more\n"))
    assert [o["text"] for o in items(outputs)] == ["new\nmore\n"]


def test_clear_output_wait_with_nothing_after_keeps_the_outputs() -> None:
    outputs = cell()
    outputs.apply("stream", stream("stays\n"))
    outputs.apply("clear_output", {"wait": True})
    assert [o["text"] for o in items(outputs)] == ["stays\n"]


# --- update_display_data ---------------------------------------------------------------------


def test_update_display_replaces_every_output_of_its_display_id_in_every_cell() -> None:
    displays = DisplayMap()
    first, second = ListSink(), ListSink()
    one = CellOutputs(first, "one", displays)
    two = CellOutputs(second, "two", displays)
    shown = {"data": {"text/plain": "v1"}, "metadata": {}, "transient": {"display_id": "d"}}
    one.apply("stream", stream("before\n"))
    one.apply("display_data", shown)
    two.apply("display_data", shown)
    two.apply("display_data", {"data": {"text/plain": "other"}, "metadata": {}})
    sinks = {"one": first, "two": second}
    update = {"data": {"text/plain": "v2"}, "metadata": {}, "transient": {"display_id": "d"}}
    assert displays.update(update, sinks.get) == 2
    new = {"output_type": "display_data", "data": {"text/plain": "v2"}, "metadata": {}}
    assert first.items[1] == new and second.items[0] == new
    assert second.items[1]["data"] == {"text/plain": "other"}
    assert first.items[0]["text"] == "before\n"
    # A cell that is cleared (or run again) is no target any more.
    two.clear()
    assert displays.update(update, sinks.get) == 1
    assert displays.update({**update, "transient": {"display_id": "unknown"}}, sinks.get) == 0


def test_update_display_skips_cells_that_are_gone() -> None:
    displays = DisplayMap()
    one = CellOutputs(ListSink(), "one", displays)
    one.apply("display_data", {"data": {}, "metadata": {}, "transient": {"display_id": "d"}})
    assert displays.update({"data": {}, "transient": {"display_id": "d"}}, lambda _: None) == 0


# --- widgets ---------------------------------------------------------------------------------


def test_a_widget_view_becomes_the_widgets_document_when_known() -> None:
    outputs = cell(ListSink(widgets={"m1"}))
    view = {"text/plain": "Switch()", YWIDGET_MIME: {"model_id": "m1"}}
    outputs.apply("execute_result", {"data": view, "metadata": {}, "execution_count": 1})
    assert items(outputs) == ["widget:m1"]
    outputs.apply("display_data", {"data": {**view, YWIDGET_MIME: {"model_id": "m2"}}})
    assert items(outputs)[1]["data"]["text/plain"] == "Switch()"  # unknown: shown as data


# --- the Y document --------------------------------------------------------------------------


def y_notebook() -> tuple[Doc, Array]:
    doc = Doc()
    cells = Array()
    doc["cells"] = cells
    cells.append(
        Map(
            {
                "id": "c1",
                "cell_type": "code",
                "source": Text("print(1)"),
                "metadata": Map(),
                "outputs": Array([{"output_type": "stream", "name": "stdout", "text": "x"}]),
                "execution_count": 3,
                "execution_status": "idle",
            }
        )
    )
    return doc, cells


def test_y_cell_outputs_are_written_as_jupyterlab_writes_them() -> None:
    doc, cells = y_notebook()
    ycell = find_cell(cells, "c1")
    assert ycell is not None and find_cell(cells, "nope") is None
    shared = SharedCell(ycell)
    assert shared.source == "print(1)" and shared.cell_type == "code"
    shared.begin()
    assert ycell["execution_status"] == "running" and ycell["execution_count"] is None
    outputs = CellOutputs(shared.outputs(), "c1", DisplayMap())
    for chunk in ["é😀 1\n", "\rzz", "\rb", "\n"]:
        outputs.apply("stream", stream(chunk))
    outputs.apply("execute_result", {"data": {"text/plain": "1"}, "execution_count": 4})
    shared.finish(4)
    youtputs = ycell["outputs"]
    assert isinstance(youtputs[0], Map) and isinstance(youtputs[0]["text"], Text)
    assert json.loads(str(ycell))["outputs"] == [
        {"output_type": "stream", "name": "stdout", "text": "é😀 1\nbz\n"},
        {
            "output_type": "execute_result",
            "data": {"text/plain": "1"},
            "metadata": {},
            "execution_count": 4,
        },
    ]
    assert ycell["execution_status"] == "idle" and ycell["execution_count"] == 4


def test_y_stream_written_as_plain_json_by_someone_else_is_rewritten() -> None:
    _doc, cells = y_notebook()
    ycell = find_cell(cells, "c1")
    assert ycell is not None
    sink = YOutputs(ycell["outputs"])
    assert sink.stream_text(0) == "x"
    sink.set_stream_text(0, 1, "yz")
    assert sink.stream_text(0) == "xyz"
    assert sink.append_widget("m") is False


def test_y_widget_document_goes_into_the_outputs() -> None:
    _doc, cells = y_notebook()
    ycell = find_cell(cells, "c1")
    assert ycell is not None
    widget = Doc()
    sink = YOutputs(ycell["outputs"], lambda model_id: widget if model_id == "m" else None)
    assert sink.append_widget("m") is True
    assert isinstance(ycell["outputs"][1], Doc)
    assert sink.stream_text(1) is None
