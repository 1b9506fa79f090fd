"""HID keyboard-wedge scanners on Linux: evdev key events decoded into scans (hardware.md §4.4).

The decoder is pure: it takes ``(type, code, value)`` events and returns the text of each scan
when the terminator key (Enter) goes down. It reads key *codes* through a fixed US keymap, so
the scanner must be set to "USA keyboard"; this avoids AZERTY/QWERTZ corruption without X11.

`HidScannerDriver` reads ``/dev/input/event*`` with the stdlib only (``struct input_event`` and
the EVIOCGRAB ioctl, so scans do not also type into the desktop); no ``evdev`` package needed.
It cannot be tested here (no /dev/input, no /dev/uinput in CI): only the decoder and the event
struct parsing are tested, with synthetic events.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import random
import struct
from collections.abc import Iterable
from typing import ClassVar

from drivers.base import DeviceError, DeviceSpec, DeviceState, DeviceStatus, DeviceUnavailable
from drivers.gs1 import DEFAULT_VARIABLE_MEASURE_RULES
from drivers.scanner import ScanPublisher, decode_frame

log = logging.getLogger(__name__)

EV_SYN, EV_KEY, EV_MSC = 0, 1, 4
KEY_UP, KEY_DOWN, KEY_REPEAT = 0, 1, 2
KEY_TAB, KEY_ENTER, KEY_KPENTER = 15, 28, 96
KEY_LEFTCTRL, KEY_RIGHTCTRL = 29, 97
KEY_LEFTSHIFT, KEY_RIGHTSHIFT, KEY_CAPSLOCK = 42, 54, 58
KEY_RIGHTBRACE = 27

# US keymap: key code -> (plain, shifted). Keypad keys assume Num Lock on (scanners that type
# on the keypad do so to be layout-independent).
US_KEYMAP: dict[int, tuple[str, str]] = {
    **{code: (ch, sh) for code, ch, sh in zip(range(2, 12), "1234567890", "!@#$%^&*()",
                                               strict=True)},
    12: ("-", "_"), 13: ("=", "+"),
    **{code: (ch, ch.upper()) for code, ch in zip(range(16, 26), "qwertyuiop", strict=True)},
    26: ("[", "{"), 27: ("]", "}"),
    **{code: (ch, ch.upper()) for code, ch in zip(range(30, 39), "asdfghjkl", strict=True)},
    39: (";", ":"), 40: ("'", '"'), 41: ("`", "~"), 43: ("\\", "|"),
    **{code: (ch, ch.upper()) for code, ch in zip(range(44, 51), "zxcvbnm", strict=True)},
    51: (",", "<"), 52: (".", ">"), 53: ("/", "?"), 57: (" ", " "),
    55: ("*", "*"), 74: ("-", "-"), 78: ("+", "+"), 83: (".", "."), 98: ("/", "/"),
    71: ("7", "7"), 72: ("8", "8"), 73: ("9", "9"), 75: ("4", "4"), 76: ("5", "5"),
    77: ("6", "6"), 79: ("1", "1"), 80: ("2", "2"), 81: ("3", "3"), 82: ("0", "0"),
}
_CHAR_TO_KEY: dict[str, tuple[int, bool]] = {}
for _code, (_plain, _shifted) in sorted(US_KEYMAP.items(), reverse=True):
    _CHAR_TO_KEY[_plain] = (_code, False)  # main-block keys win over keypad (lower codes last)
    _CHAR_TO_KEY.setdefault(_shifted, (_code, True))
    if _shifted != _plain:
        _CHAR_TO_KEY[_shifted] = (_code, True)


class HidWedgeDecoder:
    """Turn key events into scan texts; Enter (or keypad Enter) ends a scan."""

    def __init__(self, *, terminators: Iterable[int] = (KEY_ENTER, KEY_KPENTER)) -> None:
        self.terminators = frozenset(terminators)
        self.unknown_keys = 0  # key codes with no character, skipped
        self._buf: list[str] = []
        self._shift: set[int] = set()
        self._ctrl: set[int] = set()
        self._caps = False

    def feed(self, type_: int, code: int, value: int) -> str | None:
        """Take one event; return the scan text when it completes one, else None."""
        if type_ != EV_KEY:
            return None  # EV_MSC scan codes and EV_SYN reports carry nothing we need
        if code in (KEY_LEFTSHIFT, KEY_RIGHTSHIFT):
            (self._shift.add if value else self._shift.discard)(code)
            return None
        if code in (KEY_LEFTCTRL, KEY_RIGHTCTRL):
            (self._ctrl.add if value else self._ctrl.discard)(code)
            return None
        if value != KEY_DOWN:
            return None  # key up, and autorepeat (a scanner never holds a key)
        if code == KEY_CAPSLOCK:
            self._caps = not self._caps
            return None
        if code in self.terminators:
            text, self._buf = "".join(self._buf), []
            return text or None
        if self._ctrl and code == KEY_RIGHTBRACE:
            self._buf.append("\x1d")  # Ctrl+] types GS: how wedges send GS1 FNC1
            return None
        keys = US_KEYMAP.get(code)
        if keys is None:
            self.unknown_keys += 1
            return None
        plain, shifted = keys
        upper = bool(self._shift)
        if self._caps and plain.isalpha():
            upper = not upper
        self._buf.append(shifted if upper else plain)
        return None

    def feed_many(self, events: Iterable[tuple[int, int, int]]) -> list[str]:
        """Feed several events; return the completed scans in order."""
        out = []
        for type_, code, value in events:
            text = self.feed(type_, code, value)
            if text is not None:
                out.append(text)
        return out


def events_for_text(text: str) -> list[tuple[int, int, int]]:
    """Return the key events a US-layout wedge types for ``text`` (for tests and emulators)."""
    events: list[tuple[int, int, int]] = []
    for ch in text:
        if ch == "\x1d":
            events += [(EV_KEY, KEY_LEFTCTRL, 1), (EV_KEY, KEY_RIGHTBRACE, 1),
                       (EV_KEY, KEY_RIGHTBRACE, 0), (EV_KEY, KEY_LEFTCTRL, 0)]
            continue
        code, shift = _CHAR_TO_KEY[ch]
        if shift:
            events.append((EV_KEY, KEY_LEFTSHIFT, 1))
        events += [(EV_MSC, 4, 0x70000 + code), (EV_KEY, code, 1), (EV_SYN, 0, 0),
                   (EV_KEY, code, 0), (EV_SYN, 0, 0)]
        if shift:
            events.append((EV_KEY, KEY_LEFTSHIFT, 0))
    return events


# struct input_event: struct timeval (two C longs), u16 type, u16 code, s32 value. Native sizes:
# 24 bytes on 64-bit, 16 on 32-bit ARM.
INPUT_EVENT = struct.Struct("@llHHi")
EVIOCGRAB = 0x40044590  # _IOW('E', 0x90, int)


def parse_input_events(data: bytes) -> list[tuple[int, int, int]]:
    """Split raw ``struct input_event`` records into (type, code, value) tuples."""
    size = INPUT_EVENT.size
    return [INPUT_EVENT.unpack_from(data, off)[2:] for off in range(0, len(data) - size + 1, size)]


class HidScannerDriver(ScanPublisher):
    """A keyboard-wedge scanner read from its evdev node (Linux only, untested without one)."""

    kind: ClassVar[str] = "scanner"

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        if not spec.url.startswith("evdev://"):
            raise DeviceError(f"scanner {spec.name!r}: url must be evdev:///dev/input/…")
        self._path = spec.url.removeprefix("evdev://")
        self._grab = bool(spec.options.get("grab", True))
        self._reconnect_max_s = float(spec.options.get("reconnect_max_s", 1.0))
        self._fd: int | None = None
        self._buf = bytearray()
        self._decoder = HidWedgeDecoder()
        self._detail: str | None = "not opened"
        self._retry: asyncio.Task[None] | None = None
        self._closing = False
        self._init_publisher()

    def _open_blocking(self) -> int:
        fd = os.open(self._path, os.O_RDONLY | os.O_NONBLOCK)
        if self._grab:
            try:
                fcntl.ioctl(fd, EVIOCGRAB, 1)  # exclusive: keys no longer reach the console
            except OSError:
                os.close(fd)
                raise
        return fd

    async def _attach(self) -> None:
        try:
            fd = await asyncio.to_thread(self._open_blocking)
        except OSError as err:
            self._detail = f"unplugged: {err}"
            raise DeviceUnavailable(f"{self._path}: {err}") from err
        self._fd, self._detail = fd, None
        self._buf.clear()
        self._decoder = HidWedgeDecoder()
        asyncio.get_running_loop().add_reader(fd, self._on_readable)

    def _detach(self, reason: str) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing releases the grab
            self._fd = None
        self._detail = reason

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, INPUT_EVENT.size * 64)
        except BlockingIOError:
            return
        except OSError as err:  # ENODEV when the scanner is unplugged
            data = b""
            if err.errno not in (errno.ENODEV, errno.EIO):
                log.warning("scanner %s: read failed: %s", self.spec.name, err)
        if not data:
            self._detach("unplugged")
            log.warning("scanner %s disconnected", self.spec.name)
            if not self._closing:
                self._retry = asyncio.get_running_loop().create_task(self._reconnect())
            return
        self._buf += data
        usable = len(self._buf) - len(self._buf) % INPUT_EVENT.size
        events, self._buf = parse_input_events(bytes(self._buf[:usable])), self._buf[usable:]
        for text in self._decoder.feed_many(events):
            self._publish(decode_frame(text.encode(), rules=DEFAULT_VARIABLE_MEASURE_RULES))

    async def _reconnect(self) -> None:
        delay = 0.05
        while not self._closing and self._fd is None:
            try:
                await self._attach()
            except DeviceUnavailable:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._reconnect_max_s)
        log.info("scanner %s reconnected", self.spec.name)

    async def open(self) -> None:
        """Open and grab the input device; DeviceUnavailable when it is absent."""
        self._closing = False
        if self._fd is None:
            await self._attach()

    async def close(self) -> None:
        """Release the device; idempotent."""
        self._closing = True
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
            self._retry = None
        self._detach("closed")
        self._end_subscriptions()

    async def status(self) -> DeviceStatus:
        """Report CONNECTED while the input device is open."""
        if self._fd is not None:
            return DeviceStatus(DeviceState.CONNECTED)
        return DeviceStatus(DeviceState.DISCONNECTED, self._detail)

    @classmethod
    async def probe(cls, url: str, timeout_s: float = 1.0) -> bool:
        """Tell whether an input device node exists at ``url``."""
        if not url.startswith("evdev://"):
            return False
        return await asyncio.to_thread(os.path.exists, url.removeprefix("evdev://"))
