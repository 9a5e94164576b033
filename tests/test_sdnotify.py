"""sd_notify against a real unix datagram socket the test binds (a path and an abstract name)."""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.sdnotify import Notifier, socket_address


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX/SOCK_DGRAM socket at a path: (socket, NOTIFY_SOCKET value)."""
    path = tmp_path / "notify"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2.0)
    yield s, str(path)
    s.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound socket in the abstract namespace: (socket, "@name")."""
    name = f"edgekit-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(2.0)
    yield s, "@" + name
    s.close()


def recv(s: socket.socket) -> str:
    return s.recv(4096).decode()


def nothing_queued(s: socket.socket) -> bool:
    readable, _, _ = select.select([s], [], [], 0.05)
    return not readable


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("") is None
    assert socket_address("vsock:2:1234") is None  # systemd 254+ address family: not spoken here
    assert socket_address("relative/path") is None


def test_no_socket_every_method_is_a_no_op() -> None:
    n = Notifier.from_env({})
    assert not n.enabled and n.watchdog_interval_s == 0.0
    assert n.ready("x") is False and n.status("x") is False and n.watchdog() is False
    assert n.reloading() is False and n.stopping() is False and n.extend_timeout(5) is False
    n.close()


def test_ready_and_status_on_a_path_socket(path_socket: tuple[socket.socket, str]) -> None:
    s, value = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert n.enabled
    assert n.ready("serving mlp 1.0.0")
    assert recv(s) == "READY=1\nSTATUS=serving mlp 1.0.0"
    assert n.ready()
    assert recv(s) == "READY=1"
    assert n.status("line one\nline two")  # one assignment per line: newlines would split it
    assert recv(s) == "STATUS=line one line two"
    n.close()


def test_abstract_namespace_socket(abstract_socket: tuple[socket.socket, str]) -> None:
    s, value = abstract_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert n.stopping("SIGTERM: finishing the current window")
    assert recv(s) == "STOPPING=1\nSTATUS=SIGTERM: finishing the current window"
    assert n.extend_timeout(90)
    assert recv(s) == "EXTEND_TIMEOUT_USEC=90000000"
    n.close()


def test_the_sender_is_this_process(path_socket: tuple[socket.socket, str]) -> None:
    """systemd accepts NotifyAccess=main messages by the sender's pid (SCM_CREDENTIALS)."""
    s, value = path_socket
    s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    Notifier.from_env({"NOTIFY_SOCKET": value}).ready()
    data, ancdata, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    assert data == b"READY=1"
    creds = [d for level, kind, d in ancdata if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    pid, uid, gid = array.array("i", creds[0][:12])
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


def test_reloading_sends_monotonic_usec(path_socket: tuple[socket.socket, str]) -> None:
    s, value = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": value})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading("reloading /etc/edge-agent/config.toml")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = recv(s).split("\n")
    assert lines[0] == "RELOADING=1" and lines[2] == "STATUS=reloading /etc/edge-agent/config.toml"
    key, usec = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    n.ready("serving")
    assert recv(s) == "READY=1\nSTATUS=serving"


def test_watchdog_interval_from_the_environment(path_socket: tuple[socket.socket, str]) -> None:
    _, value = path_socket
    env = {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval_s == 30.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 30.0
    # started by our main process for another pid: the watchdog is not ours
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s == 0.0
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval_s == 0.0
    # a watchdog without a socket to ping is no watchdog
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s == 0.0


def test_watchdog_is_rate_limited_to_half_the_interval(path_socket: tuple[socket.socket, str]) -> None:
    s, value = path_socket
    now = [100.0]
    n = Notifier(socket_address(value), watchdog_usec=2_000_000, clock=lambda: now[0])
    assert n.watchdog() is True  # the first ping goes out at once
    assert recv(s) == "WATCHDOG=1"
    for _ in range(50):  # the loop calls it every 0.1 s slice
        now[0] += 0.019
        assert n.watchdog() is False
    assert nothing_queued(s)
    now[0] = 101.0  # half the 2 s interval after the first ping
    assert n.watchdog() is True and recv(s) == "WATCHDOG=1"
    now[0] = 101.5
    assert n.watchdog() is False
    now[0] = 102.0
    assert n.watchdog() is True and recv(s) == "WATCHDOG=1"


def test_watchdog_without_watchdog_usec_sends_nothing(path_socket: tuple[socket.socket, str]) -> None:
    s, value = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert n.watchdog() is False
    assert nothing_queued(s)


def test_watchdog_is_cheap(path_socket: tuple[socket.socket, str]) -> None:
    """Called every loop slice: a call that sends nothing costs a clock read and a compare."""
    s, value = path_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "60000000"})
    t0 = time.perf_counter()
    sent = sum(n.watchdog() for _ in range(100_000))
    assert sent == 1 and time.perf_counter() - t0 < 2.0
    assert recv(s) == "WATCHDOG=1"


def test_a_failed_send_is_logged_once_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens"), "WATCHDOG_USEC": "1000000"})
    with caplog.at_level(logging.WARNING, logger="edge_agent.sdnotify"):
        assert n.ready("x") is False
        assert n.status("y") is False
        assert n.stopping() is False
    warnings = [r for r in caplog.records if r.name == "edge_agent.sdnotify"]
    assert len(warnings) == 1 and "cannot notify systemd" in warnings[0].getMessage()
    assert str(tmp_path / "nobody-listens") in warnings[0].getMessage()


def test_unsupported_notify_socket_is_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edge_agent.sdnotify"):
        n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and n.ready() is False
    assert "vsock:2:1234" in caplog.text


def test_a_child_process_notifies_through_the_environment(path_socket: tuple[socket.socket, str]) -> None:
    """The way systemd hands the socket over: the environment of a new process."""
    import subprocess
    import sys

    s, value = path_socket
    code = ("from edge_agent.sdnotify import Notifier; n = Notifier.from_env(); "
            "n.ready('up'); n.watchdog(); n.stopping()")
    env = {**os.environ, "NOTIFY_SOCKET": value, "WATCHDOG_USEC": "5000000"}
    env.pop("WATCHDOG_PID", None)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert [recv(s) for _ in range(3)] == ["READY=1\nSTATUS=up", "WATCHDOG=1", "STOPPING=1"]
