"""systemd notify messages sent over a real AF_UNIX datagram socket."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier

Listener = tuple[socket.socket, str]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def nothing_waiting(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    return False


def test_ready_sends_ready_and_status(listener: Listener) -> None:
    sock, path = listener
    Notifier({"NOTIFY_SOCKET": path}).ready("accepting; 2 sinks")
    assert received(sock) == b"READY=1\nSTATUS=accepting; 2 sinks"


def test_status_stopping_and_watchdog_send_their_exact_bytes(listener: Listener) -> None:
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    notifier.status("cloud offline")
    notifier.stopping()
    notifier.stopping("draining relays")
    notifier.watchdog()
    assert received(sock) == b"STATUS=cloud offline"
    assert received(sock) == b"STOPPING=1\nSTATUS=stopping"
    assert received(sock) == b"STOPPING=1\nSTATUS=draining relays"
    assert received(sock) == b"WATCHDOG=1"


def test_a_newline_in_a_status_cannot_add_an_assignment(listener: Listener) -> None:
    sock, path = listener
    Notifier({"NOTIFY_SOCKET": path}).status("bad\nREADY=1")
    assert received(sock) == b"STATUS=bad READY=1"


def test_non_ascii_status_is_sent_as_utf8(listener: Listener) -> None:
    sock, path = listener
    Notifier({"NOTIFY_SOCKET": path}).status("Kasse läuft, 12 €")
    assert received(sock) == "STATUS=Kasse läuft, 12 €".encode()


def test_an_abstract_socket_address_starting_with_at_is_reached() -> None:
    name = f"tillsync-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        notifier.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_without_notify_socket_the_notifier_is_disabled_and_sends_nothing(
        listener: Listener) -> None:
    sock, _ = listener
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("up")
    notifier.status("x")
    notifier.stopping()
    notifier.watchdog()
    assert nothing_waiting(sock)


def test_an_empty_notify_socket_counts_as_unset() -> None:
    assert not Notifier({"NOTIFY_SOCKET": ""}).enabled


def test_a_missing_socket_path_never_raises_and_warns_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    with caplog.at_level(logging.DEBUG, logger="agent.sdnotify"):
        notifier.ready("up")
        notifier.watchdog()
        notifier.stopping()
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_a_socket_that_is_not_listening_never_raises(tmp_path: Path) -> None:
    # A stream socket at the path: a datagram sent to it is refused.
    path = tmp_path / "stream"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        Notifier({"NOTIFY_SOCKET": str(path)}).ready("up")


def test_the_notifier_reads_os_environ_by_default(
        listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Notifier().watchdog()
    assert received(sock) == b"WATCHDOG=1"


def test_watchdog_interval_is_half_the_timeout() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s() == 15.0
    assert Notifier({"WATCHDOG_USEC": "500"}).watchdog_interval_s() == 0.00025


def test_watchdog_interval_applies_when_watchdog_pid_is_this_process() -> None:
    env = {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env).watchdog_interval_s() == 10.0


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    env = {"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(env).watchdog_interval_s() is None


@pytest.mark.parametrize("env", [
    {},
    {"WATCHDOG_USEC": ""},
    {"WATCHDOG_USEC": "0"},
    {"WATCHDOG_USEC": "-5"},
    {"WATCHDOG_USEC": "soon"},
    {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "me"},
    {"WATCHDOG_PID": "1"},
])
def test_watchdog_interval_is_none_when_unset_or_malformed(env: dict[str, str]) -> None:
    assert Notifier(env).watchdog_interval_s() is None
