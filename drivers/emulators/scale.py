"""Scales on ptys: Mettler-Toledo 8217, NCI/Avery "W" and CAS ECR, built from hardware.md §5.

Each emulator answers requests in a thread on the pty master, from a `ScaleState` the test sets
(`set_weight`, `motion`, `over`, `under`, `silent`). The frame builders are written from the
manual tables, independently of the driver's parsers, so the tests check one against the other.
Like a real 7E1 device on a pty, the emulators send clean 7-bit ASCII (§3.3.3).
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from dataclasses import dataclass
from decimal import Decimal

from drivers.emulators.scanner import PtyLink

STX, ETX, EOT, SOH, ENQ, ACK, DC1 = b"\x02", b"\x03", b"\x04", b"\x01", b"\x05", b"\x06", b"\x11"


@dataclass
class ScaleState:
    """What is on the platter and what the display says about it."""

    weight: Decimal = Decimal("0")
    unit: str = "kg"
    motion: bool = False
    over: bool = False
    under: bool = False
    net: bool = False


# ---------------------------------------------------------------- frame builders (from §5)

def toledo_8217_weight_answer(state: ScaleState) -> bytes:
    """Answer to ``W``: ``STX ww.www[N] CR``, or ``STX ? status CR`` when not a clean weight."""
    places = 3 if state.unit == "kg" else 2
    text = f"{state.weight:0{3 + places}.{places}f}"
    if len(text) > 3 + places or state.weight < 0:  # beyond the display: over or under
        state = ScaleState(**{**state.__dict__, "over": state.over or state.weight > 0,
                              "under": state.under or state.weight < 0})
    if state.motion or state.over or state.under:
        return toledo_8217_status(state)
    return STX + text.encode() + (b"N" if state.net else b"") + b"\r"


def toledo_8217_status(state: ScaleState) -> bytes:
    """Return ``STX ? status CR``: bit 6 set, 0 motion, 1 over, 2 under, 4 centre of zero."""
    status = 0x40 | (0x01 if state.motion else 0) | (0x02 if state.over else 0)
    status |= 0x04 if state.under else 0
    status |= 0x10 if state.weight == 0 and not state.under else 0
    return STX + b"?" + bytes([status]) + b"\r"


def nci_status_bytes(state: ScaleState) -> bytes:
    """Return the NCI status bytes (high nibble 0x3; byte 2 bit 6 announces byte 3)."""
    b1 = 0x30 | (0x01 if state.motion else 0) | (0x02 if state.weight == 0 else 0)
    b2 = 0x30 | (0x01 if state.under else 0) | (0x02 if state.over else 0)
    if state.net:
        return bytes([b1, b2 | 0x40, 0x30 | 0x04])
    return bytes([b1, b2])


def nci_answer(state: ScaleState, *, high_resolution: bool = False) -> bytes:
    """Answer to ``W CR``: ``LF weight unit CR LF status CR ETX``, status only when not clean."""
    status = b"\n" + nci_status_bytes(state) + b"\r" + ETX
    if state.motion or state.over or state.under:
        return status
    places = (3 if state.unit == "kg" else 2) + (1 if high_resolution else 0)
    text = f"{state.weight:0{5 + places}.{places}f}{state.unit}"
    return b"\n" + text.encode() + b"\r" + status


def cas_ecr_answer(state: ScaleState) -> bytes:
    """Answer to DC1: ``SOH STX STA SIGN ww.www unit BCC ETX EOT``, BCC = XOR STX..BCC."""
    sta = b"U" if state.motion else b"S"
    sign = b"F" if state.over else b"-" if state.under else b" "
    digits = f"{abs(state.weight):06.3f}"[-6:] if not state.over else "99.999"
    body = sta + sign + digits.encode() + state.unit.encode().ljust(2)[:2]
    bcc = 0
    for byte in body:
        bcc ^= byte
    return SOH + STX + body + bytes([bcc]) + ETX + EOT


# ---------------------------------------------------------------- pty devices

class ScaleEmulator(PtyLink):
    """A request/response scale on a pty; subclasses implement `answer`."""

    def __init__(self, link: str | os.PathLike[str], *, unit: str = "kg") -> None:
        super().__init__(link)
        self.state = ScaleState(unit=unit)
        self.silent = False  # a scale that never answers (powered display, dead UART)
        self.requests: list[bytes] = []  # every chunk the host sent, for assertions
        self._thread: threading.Thread | None = None
        self._stop_r: int | None = None
        self._stop_w: int | None = None
        self._rx = b""

    # ---- state knobs

    def set_weight(self, value: Decimal | str | float, unit: str | None = None) -> None:
        """Put ``value`` on the platter (settled: clears motion, over and under)."""
        self.state.weight = Decimal(str(value))
        if unit is not None:
            self.state.unit = unit
        self.state.motion = self.state.over = self.state.under = False

    def motion(self, on: bool = True) -> None:
        """Make the platter swing (or settle)."""
        self.state.motion = on

    def over(self, on: bool = True) -> None:
        """Load beyond capacity (or not)."""
        self.state.over = on

    def under(self, on: bool = True) -> None:
        """Go below zero (or not)."""
        self.state.under = on

    # ---- device logic

    def answer(self, request: bytes) -> tuple[bytes, bytes]:
        """Consume one request from the head of ``request``; return (reply, rest)."""
        raise NotImplementedError

    def _on_plug(self) -> None:
        self._rx = b""
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._serve_blocking, daemon=True,
                                        name=f"scale emulator {self.link.name}")
        self._thread.start()

    def _on_unplug(self) -> None:
        if self._stop_w is not None:
            os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(2.0)
        for fd in (self._stop_r, self._stop_w):
            if fd is not None:
                os.close(fd)
        self._thread = None
        self._stop_r = self._stop_w = None

    def _serve_blocking(self) -> None:
        master, stop = self.master, self._stop_r
        assert master is not None and stop is not None
        while True:
            ready, _, _ = select.select([master, stop], [], [])
            if stop in ready:
                return
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            self.requests.append(data)
            self._rx += bytes(b & 0x7F for b in data)
            while self._rx:
                reply, rest = self.answer(self._rx)
                if rest == self._rx:
                    break  # an incomplete request: wait for more bytes
                self._rx = rest
                if reply and not self.silent:
                    with contextlib.suppress(OSError):
                        self.write(reply)


class MettlerToledo8217ScaleEmulator(ScaleEmulator):
    """8217: single-letter commands, no terminator; E starts an echo test ended by F."""

    def __init__(self, link: str | os.PathLike[str], *, unit: str = "kg") -> None:
        super().__init__(link, unit=unit)
        self._echo = False

    def answer(self, request: bytes) -> tuple[bytes, bytes]:
        """Answer W, Z, T, C, A, B, E/F; unknown letters are ignored."""
        head, rest = request[:1], request[1:]
        if self._echo:
            if head == b"F":
                self._echo = False
                return b"", rest
            return head, rest
        if head in (b"\r", b"\n"):
            return b"", rest  # some hosts append CR
        if head == b"W":
            return toledo_8217_weight_answer(self.state), rest
        if head == b"Z":
            if not (self.state.motion or self.state.over):
                self.state.weight, self.state.under = Decimal(0), False
            return toledo_8217_status(self.state), rest
        if head in (b"T", b"C", b"B"):
            return (STX + b"?@\r" if head == b"B" else toledo_8217_status(self.state)), rest
        if head == b"A":
            return STX + b"\r", rest
        if head == b"E":
            self._echo = True
            return STX + b"E\r", rest
        return b"", rest


class NciScaleEmulator(ScaleEmulator):
    """NCI "W": commands end with CR; W, S, Z, H, U; anything else answers ``LF ? CR ETX``."""

    def answer(self, request: bytes) -> tuple[bytes, bytes]:
        """Answer one CR-terminated command."""
        end = request.find(b"\r")
        if end < 0:
            return b"", request
        cmd, rest = request[:end].strip(b"\n"), request[end + 1:]
        status_only = b"\n" + nci_status_bytes(self.state) + b"\r" + ETX
        if cmd == b"W":
            return nci_answer(self.state), rest
        if cmd == b"H":
            return nci_answer(self.state, high_resolution=True), rest
        if cmd == b"S":
            return status_only, rest
        if cmd == b"Z":
            if not self.state.motion:
                self.state.weight, self.state.under = Decimal(0), False
            return b"\n" + nci_status_bytes(self.state) + b"\r" + ETX, rest
        if cmd == b"U":
            self.state.unit = "lb" if self.state.unit == "kg" else "kg"
            return status_only, rest
        return b"\n?\r" + ETX, rest


class CasScaleEmulator(ScaleEmulator):
    """CAS ECR: ENQ → ACK (NAK while ``busy``), DC1 → weight frame."""

    def __init__(self, link: str | os.PathLike[str], *, unit: str = "kg") -> None:
        super().__init__(link, unit=unit)
        self.busy = False

    def answer(self, request: bytes) -> tuple[bytes, bytes]:
        """Answer ENQ and DC1; other bytes are ignored."""
        head, rest = request[:1], request[1:]
        if head == ENQ:
            return (b"\x15" if self.busy else ACK), rest
        if head == DC1:
            return cas_ecr_answer(self.state), rest
        return b"", rest


EMULATORS: dict[str, type[ScaleEmulator]] = {
    "toledo8217": MettlerToledo8217ScaleEmulator,
    "nci": NciScaleEmulator,
    "cas": CasScaleEmulator,
}
