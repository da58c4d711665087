"""Pure pieces of the Origin and Host checks, and of the path checks of bodies."""

from __future__ import annotations

import pytest

from fps_kernels.access import AccessRules
from fps_kernels.errors import BadRequest
from fps_kernels.models import CreateSession, parse_body, path_problem


def test_origin_rules() -> None:
    rules = AccessRules()
    assert rules.origin_refusal(None, "127.0.0.1:8000") is None  # not a browser
    assert rules.origin_refusal("http://127.0.0.1:8000", "127.0.0.1:8000") is None
    assert rules.origin_refusal("HTTP://LocalHost:8000", "localhost:8000") is None
    for foreign in ["http://evil.example", "http://127.0.0.1:9999", "null", "file://"]:
        refusal = rules.origin_refusal(foreign, "127.0.0.1:8000")
        assert refusal is not None and "kernels.allow_origin" in refusal
    listed = AccessRules(allow_origin=["https://Lab.Example/"], allow_origin_pat=r"https://\w+\.x$")
    assert listed.origin_refusal("https://lab.example", "h") is None
    assert listed.origin_refusal("https://team.x", "h") is None
    assert listed.origin_refusal("https://team.x.evil", "h") is not None
    assert AccessRules(allow_origin=["*"]).origin_refusal("http://any.where", "h") is None


def test_host_rules() -> None:
    rules = AccessRules(local_hostnames=["localhost", "box.internal"])
    for host in [
        "localhost:8000",
        "LOCALHOST",
        "127.0.0.1:1",
        "127.1.2.3",
        "[::1]:80",
        "box.internal",
    ]:
        assert rules.host_refusal(host, "127.0.0.1") is None, host
    refusal = rules.host_refusal("evil.example:8000", "127.0.0.1")
    assert refusal is not None and "allow_remote_access" in refusal
    assert rules.host_refusal("evil.example", "::1") is not None
    # only a server reached on a loopback address is a DNS rebinding target
    assert rules.host_refusal("evil.example", "192.168.1.5") is None
    assert rules.host_refusal("evil.example", None) is None
    assert AccessRules(allow_remote_access=True).host_refusal("evil.example", "127.0.0.1") is None


def test_path_problems() -> None:
    assert path_problem("a/b.ipynb") is None
    assert path_problem("é" * 127 + "/x") is None  # 254 bytes
    assert "NUL" in (path_problem("a\x00b") or "")
    assert "255 bytes" in (path_problem("é" * 128) or "")  # 256 bytes
    with pytest.raises(BadRequest, match="path: must not contain a NUL"):
        parse_body(CreateSession, {"path": "a\x00", "type": "notebook"})
    with pytest.raises(BadRequest, match="name: must not contain a NUL"):
        parse_body(CreateSession, {"path": "a", "type": "notebook", "name": "x\x00"})
