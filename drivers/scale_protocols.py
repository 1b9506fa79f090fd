"""Scale protocol facts and frame parsers: Mettler-Toledo 8217, NCI/Avery "W", CAS ECR.

Pure functions over bytes (hardware.md §5.1, §5.3, §5.4); the drivers in `drivers.scale` do
the I/O. Every parser returns a `Weight` or raises `ScaleFrameError`; a status-only answer has
``value=None`` and is never turned into 0 (§5.5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal
from functools import reduce

STX, ETX, EOT, SOH = 0x02, 0x03, 0x04, 0x01
ENQ, ACK, NAK, DC1 = 0x05, 0x06, 0x15, 0x11
CR, LF = 0x0D, 0x0A


class ScaleFrameError(ValueError):
    """Bytes that are not a well-formed answer of the protocol."""


class ScaleCommandError(ScaleFrameError):
    """The scale answered that it did not understand the command."""


@dataclass(frozen=True)
class Weight:
    """One scale reading, normalised across protocols."""

    value: Decimal | None  # None when the scale sent status only (motion, over, under…)
    unit: str
    stable: bool
    motion: bool
    over: bool
    under: bool
    zero: bool
    net: bool = False
    faults: tuple[str, ...] = ()  # hardware errors the scale reports (RAM, calibration…)


# Serial line settings each protocol ships with (§5.1, §5.3, §5.4).
SERIAL_DEFAULTS: dict[str, dict[str, int | str]] = {
    "toledo8217": {"baudrate": 9600, "bytesize": 7, "parity": "E"},
    "nci": {"baudrate": 9600, "bytesize": 7, "parity": "E"},
    "cas": {"baudrate": 9600, "bytesize": 8, "parity": "N"},  # CAS/AP-1 doc: 9600 8N1
}


def _seven_bit(data: bytes) -> bytes:
    # On a 7-bit line the 8th bit is parity; a link that passes it through must not change the
    # meaning of a frame.
    return bytes(b & 0x7F for b in data)


# ---------------------------------------------------------------- Mettler-Toledo 8217

TOLEDO_WEIGHT_REQUEST = b"W"
TOLEDO_ECHO_PROBE = b"Ehello"  # answer: STX "E" CR, then the echoed "hello"; "F" ends echo
TOLEDO_ECHO_END = b"F"
# Status byte bits (§5.1). Bit 6 is always 1 (it makes the byte printable), bit 5 "net" on
# DIVA but "always 1" on Rice Lake BenchPro, so it is not read.
TOLEDO_MOTION, TOLEDO_OVER, TOLEDO_UNDER = 0x01, 0x02, 0x04
TOLEDO_OUTSIDE_ZERO_CAPTURE, TOLEDO_CENTER_OF_ZERO = 0x08, 0x10
_TOLEDO_WEIGHT = re.compile(rb"(\d+)\.(\d+)(N?)")


def toledo_frame_end(buf: bytes) -> int | None:
    """Return the end of the first complete ``STX … CR`` frame in ``buf``, or None."""
    start = buf.find(bytes([STX]))
    if start < 0:
        return None
    end = buf.find(bytes([CR]), start)
    return None if end < 0 else end + 1


def parse_toledo_8217(frame: bytes, unit: str | None = None) -> Weight:
    """Parse ``STX ww.www[N] CR`` or ``STX ? status CR``."""
    data = _seven_bit(frame)
    start = data.find(bytes([STX]))
    if start < 0 or not data.endswith(bytes([CR])):
        raise ScaleFrameError(f"not an 8217 frame: {frame!r}")
    body = data[start + 1:-1]
    if body.startswith(b"?"):
        if len(body) != 2 or not body[1] & 0x40:
            raise ScaleFrameError(f"bad 8217 status: {frame!r}")
        status = body[1]
        motion = bool(status & TOLEDO_MOTION)
        return Weight(value=None, unit=unit or "", stable=not motion, motion=motion,
                      over=bool(status & TOLEDO_OVER), under=bool(status & TOLEDO_UNDER),
                      zero=bool(status & TOLEDO_CENTER_OF_ZERO))
    m = _TOLEDO_WEIGHT.fullmatch(body)
    if m is None:
        raise ScaleFrameError(f"bad 8217 weight: {frame!r}")
    value = Decimal(f"{m.group(1).decode()}.{m.group(2).decode()}")
    # lb is sent with 2 decimals, kg with 3 (§5.1); a configured unit wins.
    unit = unit or ("kg" if len(m.group(2)) == 3 else "lb")
    return Weight(value=value, unit=unit, stable=True, motion=False, over=False, under=False,
                  zero=value == 0, net=bool(m.group(3)))


# ---------------------------------------------------------------- NCI / Avery "W"

NCI_WEIGHT_REQUEST = b"W\r"
NCI_STATUS_REQUEST = b"S\r"
# Status bytes (§5.3): (byte index, bit) -> meaning. High nibble is always 0x3 ('0'…'?').
NCI_MOTION, NCI_AT_ZERO = (0, 0x01), (0, 0x02)
NCI_RAM_ERROR, NCI_EEPROM_ERROR = (0, 0x04), (0, 0x08)
NCI_UNDER, NCI_OVER, NCI_ROM_ERROR, NCI_BAD_CAL = (1, 0x01), (1, 0x02), (1, 0x04), (1, 0x08)
NCI_NET, NCI_INITIAL_ZERO_ERROR = (2, 0x04), (2, 0x08)
NCI_MORE = 0x40  # in byte 2 and 3: another status byte follows
NCI_FAULTS = {NCI_RAM_ERROR: "RAM error", NCI_EEPROM_ERROR: "EEPROM error",
              NCI_ROM_ERROR: "ROM error", NCI_BAD_CAL: "faulty calibration",
              NCI_INITIAL_ZERO_ERROR: "initial zero error"}
# Weight fields that are not numbers (NCI 6702).
NCI_OVER_FIELD, NCI_UNDER_FIELD, NCI_ZERO_ERROR_FIELD = b"^", b"_", b"-"
_NCI_WEIGHT = re.compile(rb"\s*(-?)\s*(\d*\.?\d+)\s*([A-Za-z]*)\s*")


def nci_frame_end(buf: bytes) -> int | None:
    """Return the end of the first frame (up to ETX) in ``buf``, or None."""
    end = buf.find(bytes([ETX]))
    return None if end < 0 else end + 1


def _nci_status(field: bytes) -> dict[tuple[int, int], bool]:
    if field[:1] == b"S":  # Ohaus prefixes the status with 'S'
        field = field[1:]
    if len(field) < 2 or any(b & 0xF0 != 0x30 and b & 0xF0 != 0x70 for b in field):
        raise ScaleFrameError(f"bad NCI status {field!r}")
    used = 3 if field[1] & NCI_MORE and len(field) >= 3 else 2
    bits: dict[tuple[int, int], bool] = {}
    for idx in range(used):
        for bit in (0x01, 0x02, 0x04, 0x08):
            bits[(idx, bit)] = bool(field[idx] & bit)
    return bits


def parse_nci(frame: bytes) -> Weight:
    """Parse ``LF weight units CR LF status CR ETX`` or ``LF status CR ETX``."""
    data = _seven_bit(frame)
    if not data.endswith(bytes([ETX])) or not data.startswith(bytes([LF])):
        raise ScaleFrameError(f"not an NCI frame: {frame!r}")
    fields = [f.strip(b"\n") for f in data[1:-1].split(b"\r")]
    fields = [f for f in fields if f]
    if fields == [b"?"]:
        raise ScaleCommandError("scale did not understand the command")
    if not 1 <= len(fields) <= 2:
        raise ScaleFrameError(f"bad NCI frame: {frame!r}")
    bits = _nci_status(fields[-1])
    value: Decimal | None = None
    unit = ""
    over, under = bits[NCI_OVER], bits[NCI_UNDER]
    faults = [name for key, name in NCI_FAULTS.items() if bits.get(key)]
    if len(fields) == 2:
        weight = fields[0].strip()
        if weight and set(weight) == set(NCI_OVER_FIELD):
            over = True
        elif weight and set(weight) == set(NCI_UNDER_FIELD):
            under = True
        elif weight and set(weight) == set(NCI_ZERO_ERROR_FIELD):
            faults.append("zero error")
        else:
            m = _NCI_WEIGHT.fullmatch(weight)
            if m is None:
                raise ScaleFrameError(f"bad NCI weight {weight!r}")
            value = Decimal(m.group(1).decode() + m.group(2).decode())
            unit = m.group(3).decode().lower()
    motion = bits[NCI_MOTION]
    return Weight(value=value, unit=unit, stable=not motion, motion=motion, over=over,
                  under=under, zero=bits[NCI_AT_ZERO], net=bits.get(NCI_NET, False),
                  faults=tuple(faults))


# ---------------------------------------------------------------- CAS ECR (ENQ / DC1)

CAS_ENQ, CAS_WEIGHT_REQUEST = bytes([ENQ]), bytes([DC1])
CAS_STABLE, CAS_UNSTABLE = ord("S"), ord("U")
CAS_SIGN_POSITIVE, CAS_SIGN_NEGATIVE, CAS_SIGN_OVERFLOW = ord(" "), ord("-"), ord("F")


def cas_handshake_end(buf: bytes) -> int | None:
    """Return 1 once an ACK or NAK arrived (the answer to ENQ)."""
    for i, b in enumerate(buf):
        if b in (ACK, NAK):
            return i + 1
    return None


def cas_frame_end(buf: bytes) -> int | None:
    """Return the end of the first ``SOH … EOT`` frame, or None."""
    start = buf.find(bytes([SOH]))
    if start < 0:
        return None
    end = buf.find(bytes([EOT]), start)
    return None if end < 0 else end + 1


def cas_bcc(data: bytes) -> int:
    """Return the XOR of ``data`` (the bytes between STX and BCC)."""
    return reduce(lambda a, b: a ^ b, data, 0)


def parse_cas_ecr(frame: bytes) -> Weight:
    """Parse ``SOH STX STA SIGN ww.www unit BCC ETX EOT``."""
    start = frame.find(bytes([SOH]))
    data = frame[start:] if start >= 0 else frame
    if len(data) < 8 or data[1] != STX or data[-2:] != bytes([ETX, EOT]):
        raise ScaleFrameError(f"not a CAS frame: {frame!r}")
    body, bcc = data[2:-3], data[-3]
    if cas_bcc(body) != bcc:
        raise ScaleFrameError(f"CAS BCC mismatch in {frame!r}")
    sta, sign, rest = body[0], body[1], body[2:]
    if sta not in (CAS_STABLE, CAS_UNSTABLE) or sign not in (
            CAS_SIGN_POSITIVE, CAS_SIGN_NEGATIVE, CAS_SIGN_OVERFLOW):
        raise ScaleFrameError(f"bad CAS status {frame!r}")
    m = re.fullmatch(rb"\s*(\d*\.?\d+)\s*([A-Za-z]*)\s*", rest)
    if m is None:
        raise ScaleFrameError(f"bad CAS weight {frame!r}")
    over = sign == CAS_SIGN_OVERFLOW
    value: Decimal | None = None if over else Decimal(m.group(1).decode())
    if value is not None and sign == CAS_SIGN_NEGATIVE:
        value = -value
    motion = sta == CAS_UNSTABLE
    return Weight(value=value, unit=m.group(2).decode().lower(), stable=not motion,
                  motion=motion, over=over, under=sign == CAS_SIGN_NEGATIVE,
                  zero=value is not None and value == 0)
