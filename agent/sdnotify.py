"""systemd's notify protocol (``Type=notify``, watchdog) without libsystemd.

The protocol is one datagram of ``KEY=value`` lines sent to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract address when it starts with "@"). Nothing here
ever raises: a service must not die, or stall its event loop, because its supervisor did not
hear a status line. The first failure is logged as a warning, later ones at debug level.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Send readiness, status, stopping and watchdog messages to systemd when it asks for them."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # Abstract socket names begin with a NUL byte, which an environment variable cannot
        # hold; systemd writes "@" in its place.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        # AF_UNIX is missing on some platforms (older Windows builds): notify is then a no-op.
        self.enabled: bool = bool(address) and hasattr(socket, "AF_UNIX")
        self._watchdog_usec = environ.get("WATCHDOG_USEC")
        self._watchdog_pid = environ.get("WATCHDOG_PID")
        self._warned = False

    def ready(self, status: str) -> None:
        """Tell systemd that start-up finished, with a status line."""
        self._send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> None:
        """Update the status line shown by ``systemctl status``."""
        self._send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str = "stopping") -> None:
        """Tell systemd that a graceful stop has begun."""
        self._send(f"STOPPING=1\nSTATUS={_one_line(status)}")

    def watchdog(self) -> None:
        """Feed the service watchdog."""
        self._send("WATCHDOG=1")

    def watchdog_interval_s(self) -> float | None:
        """Return how often to feed the watchdog (half its timeout), or None when it is off."""
        if not self._watchdog_usec:
            return None
        # WATCHDOG_PID names the process the watchdog is meant for; a child that inherited
        # the environment must not feed its parent's watchdog.
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def _send(self, message: str) -> None:
        if not self.enabled:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                # Non-blocking: when systemd's queue is full the message is dropped rather
                # than the caller (the event loop) waiting for room.
                sock.setblocking(False)
                sock.sendto(message.encode(), self._address)
        except OSError as err:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "systemd notify to %r failed: %s", self._address, err)


def _one_line(text: str) -> str:
    # A newline would start a new assignment: a status text could otherwise say READY=1.
    return " ".join(text.splitlines())
