"""The jupyter-server-nbmodel request records (fps_kernels/nbmodel.py), without a kernel."""

from __future__ import annotations

import json

import pytest

from fps_kernels.nbmodel import Request, RequestNotFound, Requests


def test_a_request_answers_202_then_300_then_200_once() -> None:
    requests = Requests()
    request = Request("k1", cell_id="c", document_id="json:notebook:f")
    requests.add(request)
    assert request.accepted()["request_status"] == "queued"
    status, body, headers = requests.poll("k1", request.id)
    assert status == 202 and headers["Location"] == request.url and body["pending"] is True
    request.started()
    request.output("stream", {"name": "stdout", "text": "a"})
    request.output("stream", {"name": "stdout", "text": "b\n"})
    request.input_requested({"msg_id": "m", "msg_type": "input_request"}, {"prompt": "? "})
    status, body, headers = requests.poll("k1", request.id)
    assert status == 300 and headers["Location"] == "/api/kernels/k1/input"
    assert body["input_request"] == {"prompt": "? ", "password": False}
    assert body["parent_header"]["msg_id"] == "m"
    request.input_answered()
    assert requests.poll("k1", request.id)[0] == 202
    assert [r["request_id"] for r in requests.pending("k1")] == [request.id]
    request.finished_with({"status": "ok", "execution_count": 3})
    status, body, _ = requests.poll("k1", request.id)
    assert status == 200 and body["status"] == "ok" and body["execution_count"] == 3
    assert json.loads(body["outputs"]) == [
        {"output_type": "stream", "name": "stdout", "text": "ab\n"}
    ]
    with pytest.raises(RequestNotFound, match="handed out"):
        requests.poll("k1", request.id)
    assert requests.pending("k1") == []


def test_aborted_and_unrun_requests_answer_500_and_the_wrong_kernel_404() -> None:
    requests = Requests()
    aborted, unrun, ran = Request("k1"), Request("k1"), Request("k1")
    for request in (aborted, unrun, ran):
        requests.add(request)
    with pytest.raises(RequestNotFound):
        requests.poll("k2", aborted.id)
    aborted.finished_with({"status": "aborted"})
    unrun.failed("KernelRestarted", "not run", started=False)
    ran.started()
    ran.failed("KernelRestarted", "while running", started=True)
    status, body, _ = requests.poll("k1", aborted.id)
    assert status == 500 and "earlier" in body["message"]
    status, body, _ = requests.poll("k1", unrun.id)
    assert status == 500 and "KernelRestarted" in body["message"]
    status, body, _ = requests.poll("k1", ran.id)
    assert status == 200 and body["status"] == "error"
    assert json.loads(body["outputs"])[0]["ename"] == "KernelRestarted"


def test_finished_results_are_kept_for_a_bounded_time_and_number() -> None:
    requests = Requests(keep_seconds=3600, keep_finished=2)
    done = [Request("k") for _ in range(3)]
    running = Request("k")
    for request in done:
        requests.add(request)
        request.finished_with({"status": "ok", "execution_count": 1})
    requests.add(running)  # expires the oldest finished one, never one in flight
    assert [r["request_id"] for r in requests.pending("k")] == [
        done[1].id,
        done[2].id,
        running.id,
    ]
    expiring = Requests(keep_seconds=0, keep_finished=10)
    old = Request("k")
    expiring.add(old)
    old.finished_with({"status": "ok"})
    old.finished_at = (old.finished_at or 0) - 1
    assert expiring.pending("k") == []
