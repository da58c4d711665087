"""Pure-ish pieces of the kernel side: kernelspecs, connection files, ports, exit causes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import zmq

from fps_kernels.kernel_driver.channel import KernelChannel, Reply, watch_link
from fps_kernels.kernel_driver.connection import (
    ConnectionInfo,
    InvalidConnectionFile,
    PortAllocator,
    new_connection_info,
    read_connection_file,
    write_connection_file,
)
from fps_kernels.kernel_driver.kernelspec import (
    InvalidKernelSpec,
    find_kernelspecs,
    load_kernelspec,
    scan_kernelspecs,
)
from fps_kernels.kernel_driver.ownership import (
    OWNER_KEY,
    process_start,
    remove_stale_connection_files,
)
from fps_kernels.kernel_driver.process import describe_exit
from fps_kernels.kernel_driver.wire import DELIMITER, join_frames, make_message_parts
from fps_kernels.registry import kernel_cwd


def _spec(tmp: Path, name: str, data: object) -> Path:
    path = tmp / name
    path.mkdir(parents=True)
    (path / "kernel.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_kernelspec_command_and_environment(tmp_path: Path) -> None:
    spec = load_kernelspec(
        _spec(
            tmp_path,
            "py",
            {
                "argv": ["python3", "-m", "k", "-f", "{connection_file}", "{resource_dir}"],
                "display_name": "Py",
                "language": "python",
                "env": {"A": "${HOME}/x", "B": "b"},
            },
        )
    )
    argv = spec.command("/c.json")
    assert argv[0] == sys.executable
    assert argv[4:] == ["/c.json", str(tmp_path / "py")]
    env = spec.environment({"HOME": "/home/me", "PYTHONEXECUTABLE": "x"})
    assert env["A"] == "/home/me/x" and env["B"] == "b" and "PYTHONEXECUTABLE" not in env


def test_kernelspec_validation(tmp_path: Path) -> None:
    for name, data in [
        ("noargv", {"display_name": "x"}),
        ("emptyargv", {"argv": []}),
        ("badenv", {"argv": ["x"], "env": {"A": 1}}),
        ("badmode", {"argv": ["x"], "interrupt_mode": "bogus"}),
        ("notjson", "{"),
        ("list", "[]"),
    ]:
        with pytest.raises(InvalidKernelSpec):
            load_kernelspec(_spec(tmp_path, name, data))


def test_first_directory_wins_and_broken_are_skipped(tmp_path: Path) -> None:
    high, low = tmp_path / "high", tmp_path / "low"
    _spec(high, "k", {"argv": ["high"], "display_name": "High"})
    _spec(low, "k", {"argv": ["low"], "display_name": "Low"})
    _spec(low, "broken", "{")
    specs = find_kernelspecs([high, low, tmp_path / "missing"])
    assert specs["k"].argv == ["high"]
    assert "broken" not in specs


def test_broken_kernelspecs_are_kept_with_why_and_warned_once_per_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    high, low = tmp_path / "high", tmp_path / "low"
    _spec(high, "shadowed", "{")  # broken, but a usable one of that name comes later
    _spec(low, "shadowed", {"argv": ["low"]})
    spec_file = _spec(high, "bad", {"display_name": "no argv"}) / "kernel.json"
    caplog.set_level("WARNING")
    for _ in range(3):
        scan = scan_kernelspecs([high, low])
    assert scan.specs["shadowed"].argv == ["low"]
    assert set(scan.broken) == {"bad"}
    assert scan.broken["bad"].path == spec_file
    assert scan.broken["bad"].problem == "'argv' must be a non-empty list of strings"
    bad_lines = [r for r in caplog.records if "Skipping kernelspec bad" in r.getMessage()]
    assert len(bad_lines) == 1 and str(spec_file) in bad_lines[0].getMessage()
    spec_file.write_text("[1, 2]")
    scan_kernelspecs([high, low])
    scan_kernelspecs([high, low])
    bad_lines = [r for r in caplog.records if "Skipping kernelspec bad" in r.getMessage()]
    assert len(bad_lines) == 2 and "not a JSON object" in bad_lines[1].getMessage()


def test_only_our_files_of_servers_that_are_gone_are_removed(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    me = {"pid": os.getpid(), "start": process_start(os.getpid())}
    files = {
        "kernel-gone.json": {"key": "k", OWNER_KEY: {"pid": gone.pid, "start": "x:1"}},
        "kernel-reused.json": {"key": "k", OWNER_KEY: {**me, "start": "x:1"}},
        "kernel-alive.json": {"key": "k", OWNER_KEY: me},
        "kernel-foreign.json": {"key": "k"},
        "kernel-odd.json": {"key": "k", OWNER_KEY: {"pid": "nope"}},
        "other-gone.json": {"key": "k", OWNER_KEY: {"pid": gone.pid}},
    }
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    (tmp_path / "kernel-notjson.json").write_text("{")
    assert remove_stale_connection_files(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kernel-alive.json",
        "kernel-foreign.json",
        "kernel-notjson.json",
        "kernel-odd.json",
        "other-gone.json",
    ]


def test_our_connection_files_say_which_server_wrote_them(tmp_path: Path) -> None:
    info = new_connection_info(PortAllocator(), "python3")
    path = tmp_path / "kernel-x.json"
    write_connection_file(path, info)
    owner = json.loads(path.read_text())[OWNER_KEY]
    assert owner == {"pid": os.getpid(), "start": process_start(os.getpid())}
    assert remove_stale_connection_files(tmp_path) == 0 and path.exists()


def test_connection_file_is_private_and_round_trips(tmp_path: Path) -> None:
    info = new_connection_info(PortAllocator(), "python3")
    path = tmp_path / "kernel.json"
    write_connection_file(path, info)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_connection_file(path) == info
    assert len(info.key) == 64


@pytest.mark.parametrize(
    "content",
    ["", "{", "[]", '{"key": "k"}', '{"shell_port": "x", "key": "k"}'],
)
def test_bad_connection_files(tmp_path: Path, content: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(InvalidConnectionFile):
        read_connection_file(path)


def test_unknown_connection_fields_are_kept() -> None:
    info = ConnectionInfo.model_validate(
        {
            "shell_port": 1,
            "iopub_port": 2,
            "stdin_port": 3,
            "control_port": 4,
            "hb_port": 5,
            "key": "k",
            "jupyter_session": "/x.ipynb",
        }
    )
    assert info.model_dump()["jupyter_session"] == "/x.ipynb"
    assert info.url("iopub") == "tcp://127.0.0.1:2"


def test_ports_are_never_handed_out_twice() -> None:
    allocator = PortAllocator()
    taken: set[int] = set()
    for _ in range(40):
        ports = allocator.allocate(5)
        assert not taken & set(ports)
        taken.update(ports)
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(port < low for port in taken)
    allocator.release(taken)


def test_exit_causes() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL, likely out of memory"
    assert describe_exit(-signal.SIGTERM) == "killed by SIGTERM"


def test_kernel_cwd_stays_inside_root(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert kernel_cwd(tmp_path, "a/b/c/x.ipynb") == tmp_path / "a" / "b"
    assert kernel_cwd(tmp_path, "a/b") == tmp_path / "a" / "b"
    assert kernel_cwd(tmp_path, "../../etc/x.ipynb") == tmp_path
    assert kernel_cwd(tmp_path, "/etc") == tmp_path
    assert kernel_cwd(tmp_path, None) == tmp_path
    outside = tmp_path.parent / "outside-link-target"
    outside.mkdir(exist_ok=True)
    os.symlink(outside, tmp_path / "escape")
    assert kernel_cwd(tmp_path, "escape/x.ipynb") == tmp_path


def test_kernel_channel_checks_signature_and_replay(caplog: pytest.LogCaptureFixture) -> None:
    """Every user of the channel gets the same checks (the control copy once had no replay
    guard); a restarted kernel may sign anew what it signed before."""
    info = new_connection_info(PortAllocator(), "python3")
    channel = KernelChannel(info, Reply, name="k")
    _msg_id, parts = make_message_parts("status", {}, "s", {"msg_id": "parent-1"})
    frames = [b"id", *join_frames(parts, [b"buffer"], channel.signer)]
    message = channel.verify("iopub", frames)  # type: ignore[arg-type]
    assert message is not None
    assert message.parent_msg_id == "parent-1" and message.buffers == [b"buffer"]
    assert channel.verify("iopub", frames) is None  # type: ignore[arg-type]
    assert "duplicate signature" in caplog.text
    forged = [DELIMITER, b"0" * 64, *parts]
    assert channel.verify("shell", forged) is None
    assert "invalid signature" in caplog.text
    assert channel.verify("shell", [DELIMITER, b"sig", b"{}"]) is None
    channel.clear_replay_guard()
    assert channel.verify("iopub", frames) is not None  # type: ignore[arg-type]


def _listening(
    context: zmq.Context[zmq.Socket[bytes]], port: int = 0
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes], int]:
    """A ROUTER on `port` (any when 0), and a monitor of it that tells when a peer is in."""
    deadline = time.monotonic() + 20  # the port comes free once the reaper closed the last one
    while True:
        sock = context.socket(zmq.ROUTER)
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED, addr=f"inproc://test-{uuid.uuid4().hex}"
        )
        try:
            if not port:
                return sock, monitor, sock.bind_to_random_port("tcp://127.0.0.1")
            sock.bind(f"tcp://127.0.0.1:{port}")
            return sock, monitor, port
        except zmq.ZMQError:
            _close(sock, monitor)
            assert time.monotonic() < deadline, "libzmq's I/O thread is stuck"
            time.sleep(0.001)


def _close(sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
    sock.disable_monitor()
    monitor.close(0)
    sock.close(0)


def test_an_unread_link_monitor_never_stops_the_zmq_context() -> None:
    # libzmq's I/O thread writes monitor events with a blocking send: with pyzmq's
    # get_monitor_socket (a bounded queue, 2000 messages in all), about 1000 connections made
    # and lost while nobody reads the monitor stop that thread, and every socket of the
    # context with it.
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router, router_monitor, port = _listening(context)
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RECONNECT_IVL, 1)
    monitor = watch_link(dealer)  # type: ignore[arg-type]
    dealer.connect(f"tcp://127.0.0.1:{port}")
    for _ in range(1100):  # connected, then lost: two events each
        assert router_monitor.poll(20_000), "libzmq's I/O thread is stuck"
        _close(router, router_monitor)
        router, router_monitor, _ = _listening(context, port)
    # A new pair of sockets still connects and talks.
    server = context.socket(zmq.ROUTER)
    client = context.socket(zmq.DEALER)
    client.connect(f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}")
    client.send(b"ping")
    assert server.poll(20_000), "the context no longer connects"
    assert server.recv_multipart()[1] == b"ping"
    events = 0
    while monitor.poll(0):
        monitor.recv_multipart()
        events += 1
    assert events >= 2200, events  # all kept
    dealer.disable_monitor()
    _close(router, router_monitor)
    for sock in (monitor, dealer, server, client):
        sock.close(0)
    context.term()
