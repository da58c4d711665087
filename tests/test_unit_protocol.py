"""Pure pieces: signing, the wire format, WebSocket framing, state tracking, models."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

import pytest

from fps_kernels.config import KernelsPluginConfig
from fps_kernels.errors import BadRequest, InvalidField
from fps_kernels.kernel_driver.signing import ReplayGuard, SignatureError, Signer
from fps_kernels.kernel_driver.wire import DELIMITER, WireError, join_frames, split_frames
from fps_kernels.kernel_server.activity import KernelActivity
from fps_kernels.kernel_server.framing import (
    FrameError,
    check_json,
    decode_legacy_binary,
    decode_legacy_text,
    decode_v1,
    depth,
    encode_legacy_binary,
    encode_legacy_text,
    encode_v1,
    has_lone_surrogate,
)
from fps_kernels.kernel_server.readiness import Readiness, ReadinessState
from fps_kernels.kernel_server.settings import ServerSettings
from fps_kernels.models import CreateSession, StartKernel, parse_body

PARTS = [b'{"msg_id":"a","msg_type":"status"}', b"{}", b"{}", b'{"execution_state":"idle"}']


def test_signature_is_hmac_sha256_of_the_four_parts() -> None:
    signer = Signer("key")
    expected = hmac.new(b"key", b"".join(PARTS), hashlib.sha256).hexdigest().encode()
    assert signer.sign(PARTS) == expected
    signer.check(expected, PARTS)
    with pytest.raises(SignatureError, match="invalid"):
        signer.check(b"0" * 64, PARTS)
    with pytest.raises(SignatureError, match="unsigned"):
        signer.check(b"", PARTS)
    # buffers are not signed
    assert signer.sign(PARTS + [b"buffer"]) == expected


def test_empty_key_disables_signing() -> None:
    signer = Signer("")
    assert signer.sign(PARTS) == b""
    signer.check(b"", PARTS)


def test_unsupported_scheme() -> None:
    with pytest.raises(ValueError):
        Signer("k", "md5")
    with pytest.raises(ValueError):
        Signer("k", "hmac-nothing")


def test_replay_guard_is_bounded() -> None:
    guard = ReplayGuard(size=2)
    guard.check(b"a")
    with pytest.raises(SignatureError, match="duplicate"):
        guard.check(b"a")
    guard.check(b"b")
    guard.check(b"c")  # forgets "a"
    guard.check(b"a")


def test_wire_split_and_join() -> None:
    signer = Signer("k")
    frames = [b"ident", *join_frames(PARTS, [b"buf"], signer)]
    wire = split_frames(frames)
    assert wire.identities == [b"ident"]
    assert wire.parts == PARTS and wire.buffers == [b"buf"]
    assert wire.signature == signer.sign(PARTS)
    with pytest.raises(WireError):
        split_frames([b"no delimiter"])
    with pytest.raises(WireError):
        split_frames([DELIMITER, b"sig", b"{}"])


def test_v1_matches_the_documented_layout() -> None:
    # the reference server's observed status frame: offset_count=6, channel "iopub"
    header = b"h" * 207
    parent = b"p" * 185
    frame = encode_v1("iopub", [header, parent, b"{}", b"c" * 27])
    count, *offsets = struct.unpack_from("<7Q", frame)
    assert count == 6
    assert offsets == [56, 61, 268, 453, 455, 482]
    assert len(frame) == 482
    assert frame[56:61] == b"iopub"


def test_v1_round_trip_with_buffers() -> None:
    parts = [b'{"msg_id":"x","msg_type":"comm_msg"}', b"{}", b"{}", b'{"a":1}']
    message = decode_v1(encode_v1("shell", parts, [b"\x00\x01", b""]))
    assert message.channel == "shell"
    assert message.parts == parts
    assert message.buffers == [b"\x00\x01", b""]
    assert message.header["msg_type"] == "comm_msg"


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"short",
        struct.pack("<Q", 2**64 - 1),
        struct.pack("<Q", 3) + b"\x00" * 24,
        struct.pack("<7Q", 6, 56, 61, 60, 70, 80, 90) + b"x" * 40,  # decreasing
        struct.pack("<7Q", 6, 56, 61, 62, 63, 64, 10**6) + b"shell{}",  # past the end
        struct.pack("<7Q", 6, 8, 61, 62, 63, 64, 65) + b"x" * 9,  # into the table
        encode_v1("shell", [b"not json", b"{}", b"{}", b"{}"]),
        encode_v1("shell", [b'{"no":"type"}', b"{}", b"{}", b"{}"]),
    ],
)
def test_v1_rejects_lies(frame: bytes) -> None:
    with pytest.raises(FrameError):
        decode_v1(frame)


def test_legacy_text_is_spliced_valid_json() -> None:
    text = encode_legacy_text("iopub", PARTS, "a", "status")
    data = json.loads(text)
    assert data["header"]["msg_id"] == "a"
    assert data["content"] == {"execution_state": "idle"}
    assert data["buffers"] == [] and data["channel"] == "iopub" and data["msg_type"] == "status"


def test_legacy_binary_layout_and_round_trip() -> None:
    frame = encode_legacy_binary("iopub", PARTS, [b"12345", b"xy"], "a", "status")
    nbufs, *offsets = struct.unpack_from(">4I", frame)
    assert nbufs == 3 and offsets[0] == 16
    assert frame[offsets[1] : offsets[2]] == b"12345" and frame[offsets[2] :] == b"xy"
    body = json.loads(frame[offsets[0] : offsets[1]])
    assert "buffers" not in body and body["msg_type"] == "status"
    message = decode_legacy_binary(frame)
    assert message.buffers == [b"12345", b"xy"] and message.channel == "iopub"


def test_legacy_decoding_checks_the_message() -> None:
    message = decode_legacy_text('{"header": {"msg_type": "execute_request"}, "content": {}}')
    assert message.channel == "shell"
    assert json.loads(message.parts[1]) == {}
    for bad in [
        "nope",
        "[1]",
        "{}",
        '{"header": {"msg_type": 1}}',
        '{"header": {"msg_type": "x"}, "content": 1}',
    ]:
        with pytest.raises(FrameError):
            decode_legacy_text(bad)
    for bad_frame in [b"\x00", struct.pack(">2I", 5, 12), struct.pack(">3I", 2, 100, 4)]:
        with pytest.raises(FrameError):
            decode_legacy_binary(bad_frame)


def test_activity_follows_the_reference_rules() -> None:
    activity = KernelActivity()
    assert activity.execution_state == "starting"
    # an untracked request's status flips starting to idle, never to busy
    activity.observe("status", "kernel_info_request", "busy")
    assert activity.execution_state == "idle"
    activity.observe("status", "execute_request", "busy")
    assert activity.execution_state == "busy"
    activity.observe("status", "debug_request", "idle")
    assert activity.execution_state == "busy"
    before = activity.last_activity
    activity.observe("stream", None)
    assert activity.last_activity >= before
    activity.observe("status", "execute_request", "idle")
    assert activity.execution_state == "idle"
    activity.observe("status", "execute_request", "weird")
    assert activity.execution_state == "idle"


def test_untracked_output_does_not_count_as_activity_when_idle() -> None:
    activity = KernelActivity()
    activity.observe("status", "execute_request", "idle")
    stamp = activity.last_activity
    activity.observe("status", "kernel_info_request", "busy")
    assert activity.last_activity == stamp


def test_bodies_name_the_field() -> None:
    with pytest.raises(BadRequest, match="No JSON data"):
        parse_body(CreateSession, None)
    with pytest.raises(BadRequest, match="Missing field in JSON data: type"):
        parse_body(CreateSession, {"path": "x"})
    with pytest.raises(InvalidField, match="kernel.name"):
        parse_body(CreateSession, {"path": "x", "type": "notebook", "kernel": {"name": 1}})
    legacy = parse_body(CreateSession, {"notebook": {"path": "a.ipynb"}})
    assert legacy.path == "a.ipynb" and legacy.type == "notebook"
    assert parse_body(
        StartKernel, {"kernel_id": "6F9619FF-8B86-D011-B42D-00C04FC964FF"}
    ).kernel_id == ("6f9619ff-8b86-d011-b42d-00c04fc964ff")


def test_v1_buffers_are_views_of_the_frame() -> None:
    frame = encode_v1("shell", PARTS, [b"x" * 1000])
    message = decode_v1(frame)
    assert isinstance(message.buffers[0], memoryview)
    assert bytes(message.buffers[0]) == b"x" * 1000


# --- hostile JSON in frames -----------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000
DEEPISH = b"[" * 600 + b"]" * 600  # parses, but deeper than MAX_DEPTH
BIG_INT = b"9" * 5000
LONE = b'"\\udc00"'


def _header_with(value: bytes) -> bytes:
    return b'{"msg_id":"a","msg_type":"execute_request","x":' + value + b"}"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (DEEP, "nested too deeply"),
        (DEEPISH, "nested deeper than"),
        (BIG_INT, "too many digits"),
        (LONE, "lone UTF-16 surrogate"),
        (b'"\\ud800x"', "lone UTF-16 surrogate"),
    ],
)
def test_hostile_json_is_a_frame_error_on_both_protocols(value: bytes, words: str) -> None:
    header = _header_with(value)
    for part in range(4):
        parts = [PARTS[0].replace(b"status", b"execute_request"), b"{}", b"{}", b"{}"]
        parts[part] = header if part == 0 else b'{"x":' + value + b"}"
        with pytest.raises(FrameError, match=words):
            decode_v1(encode_v1("shell", parts))
    message = b'{"header":' + header + b',"content":{}}'
    with pytest.raises(FrameError, match=words):
        decode_legacy_text(message.decode())
    with pytest.raises(FrameError, match=words):
        decode_legacy_binary(struct.pack(">2I", 1, 8) + message)


def test_surrogate_pairs_and_escaped_backslashes_are_fine() -> None:
    for value in [
        b'"\\ud83d\\ude00"',
        b'"\\\\ud800"',
        b'"\\u00e9\\u0041"',
        b"[" * 400 + b"]" * 400,
    ]:
        parts = [_header_with(value), b"{}", b"{}", b'{"x":' + value + b"}"]
        assert decode_v1(encode_v1("shell", parts)).parts == parts
        decode_legacy_text('{"header":' + parts[0].decode() + "}")


def test_check_json_parses_only_what_could_hide_a_problem() -> None:
    # small, no surrogate escape, few brackets: not parsed at all (even if invalid JSON:
    # the kernel answers that; the server only guards against what makes it choke)
    check_json(b'{"code": "print(1)" nonsense', "content")
    assert depth({"a": [[1], {"b": []}]}) == 4 and depth(5) == 0
    assert has_lone_surrogate(LONE, json.loads(LONE))
    assert not has_lone_surrogate(b'"\\ud83d\\ude00"', "\U0001f600")
    with pytest.raises(FrameError, match="too many digits"):
        check_json(BIG_INT, "content")


def test_server_settings_come_from_the_plugin_config() -> None:
    assert ServerSettings.from_config(KernelsPluginConfig()) == ServerSettings()
    config = KernelsPluginConfig(startup_timeout=5, autorestart=False, capture_kernel_output=False)
    settings = config.server_settings()
    assert settings.startup_timeout == 5 and not settings.autorestart
    assert not settings.capture_kernel_output


def test_readiness_is_one_state_with_a_wait_derived_from_it() -> None:
    readiness = ReadinessState()
    assert readiness.state is Readiness.NEW and not readiness.accepting
    for state, accepting in (
        (Readiness.STARTING, False),
        (Readiness.READY, True),
        (Readiness.RESTARTING, False),
        (Readiness.DEAD, True),
    ):
        readiness.set(state)
        assert readiness.accepting is accepting
        assert readiness.answered is (state is Readiness.READY)
