"""ESC/POS command bytes: python-escpos for text, styles and QR; constants for real-time commands.

python-escpos is imported only through :func:`escpos_module`, which contains its import-time side
effects (hardware.md §2.10): version 3.1 calls ``logging.basicConfig()`` (reconfiguring the root
logger of the daemon) and creates an empty temp directory per process for its capability cache
(even when ``ESCPOS_CAPABILITIES_PICKLE_DIR`` is set). We undo the first and give the second a
private directory that is removed at exit.

Real-time and status commands are written by hand: they are short, fixed, and python-escpos 3.1
wraps only part of them (and with bugs, §2.10).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from types import ModuleType
from typing import Any

# --- real-time and status commands (hardware.md §2.2-§2.5) ---------------------------------------
INIT = b"\x1b\x40"  # ESC @; also resets the code page, so ESC t must follow it
DLE_EOT = b"\x10\x04"  # + n (1..4): real-time status, answered before buffered data


def dle_eot(n: int) -> bytes:
    """Return DLE EOT ``n``, the real-time status request (n = 1..4)."""
    if n not in (1, 2, 3, 4):
        raise ValueError(f"DLE EOT n must be 1..4, not {n}")
    return DLE_EOT + bytes([n])


# GS a n: automatic status back on change of drawer (1), online (2), error (4), paper (8).
ASB_DRAWER = 0x01
ASB_ONLINE = 0x02
ASB_ERROR = 0x04
ASB_PAPER = 0x08
ASB_ALL = ASB_DRAWER | ASB_ONLINE | ASB_ERROR | ASB_PAPER


def gs_a(mask: int) -> bytes:
    """Return GS a ``mask`` (enable automatic status back for the given items; 0 disables)."""
    if not 0 <= mask <= 0x0F:
        raise ValueError(f"ASB mask must be 0..15, not {mask}")
    return b"\x1d\x61" + bytes([mask])


def process_id_request(job_id: bytes) -> bytes:
    """Return GS ( H fn=48: answered ``37 22 id 00`` once everything before it is printed."""
    if len(job_id) != 4 or any(not 0x20 <= b <= 0x7E for b in job_id):
        raise ValueError("a GS ( H process id is 4 bytes in 0x20..0x7E")
    return b"\x1d\x28\x48\x06\x00\x30\x30" + job_id


def process_id_answer(job_id: bytes) -> bytes:
    """Return the printer's completion answer for ``job_id``."""
    return b"\x37\x22" + job_id + b"\x00"


# Drawer pulse ESC p m t1 t2 (§2.5): m 0 = pin 2, 1 = pin 5; times in units of 2 ms, 1..255.
DRAWER_PINS: dict[int, int] = {2: 0, 5: 1}
DRAWER_TIME_UNIT_MS = 2
# Citizen's guideline, the strictest we found: ON / (ON + OFF) <= 0.2 ("make n2 four times n1").
DRAWER_MAX_DUTY = 0.2
# Solenoids need a minimum pulse to pull; vendors' samples go from 50 ms to 200 ms.
DRAWER_MIN_ON_MS = 10
DRAWER_MAX_ON_MS = 254 * DRAWER_TIME_UNIT_MS  # t1 is one byte


def drawer_pulse(pin: int = 2, on_ms: int = 50, off_ms: int = 240) -> bytes:
    """Return ESC p for a drawer pulse, refusing pins and timings outside the duty-cycle limits."""
    if pin not in DRAWER_PINS:
        raise ValueError(f"drawer pin must be 2 or 5, not {pin}")
    if not DRAWER_MIN_ON_MS <= on_ms <= DRAWER_MAX_ON_MS:
        raise ValueError(
            f"drawer on time must be {DRAWER_MIN_ON_MS}..{DRAWER_MAX_ON_MS} ms, not {on_ms}"
        )
    if off_ms > 255 * DRAWER_TIME_UNIT_MS:
        raise ValueError(f"drawer off time must be at most {255 * DRAWER_TIME_UNIT_MS} ms")
    if on_ms % DRAWER_TIME_UNIT_MS or off_ms % DRAWER_TIME_UNIT_MS:
        raise ValueError("drawer times are sent in 2 ms units: use even milliseconds")
    if on_ms / (on_ms + off_ms) > DRAWER_MAX_DUTY:
        raise ValueError(
            f"drawer duty cycle {on_ms}/{on_ms + off_ms} ms exceeds {DRAWER_MAX_DUTY:.0%}: "
            f"make the off time at least {4 * on_ms} ms"
        )
    return bytes(
        [0x1B, 0x70, DRAWER_PINS[pin], on_ms // DRAWER_TIME_UNIT_MS, off_ms // DRAWER_TIME_UNIT_MS]
    )


# --- code pages (§2.8, Epson numbering of ESC t) -------------------------------------------------
# Python codec -> ESC t number. CP858 is CP850 plus "€" (0xD5) and covers Western European
# accents; it is our default because the numbering 19 is common to Epson and most clones.
CODE_PAGES: dict[str, int] = {
    "cp437": 0,
    "cp850": 2,
    "cp860": 3,
    "cp863": 4,
    "cp865": 5,
    "cp1252": 16,
    "cp866": 17,
    "cp852": 18,
    "cp858": 19,
    "iso8859_2": 39,
    "iso8859_15": 40,
}


def select_code_page(codec: str) -> bytes:
    """Return ESC t for ``codec`` (a Python codec name listed in CODE_PAGES)."""
    try:
        return b"\x1b\x74" + bytes([CODE_PAGES[codec]])
    except KeyError:
        raise ValueError(
            f"unknown code page {codec!r} (known: {', '.join(sorted(CODE_PAGES))})"
        ) from None


# --- python-escpos, imported with its side effects contained --------------------------------------
_import_lock = threading.Lock()
_cache_dir: str | None = None


def _private_cache_dir(*_args: Any, **_kwargs: Any) -> str:
    # Stands in for tempfile.mkdtemp while escpos.capabilities is imported: one 0700 directory,
    # removed at exit (the pickle cache loaded from it must not be writable by other users).
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = _real_mkdtemp(prefix="tillsync-escpos-")
        atexit.register(shutil.rmtree, _cache_dir, True)
    return _cache_dir


_real_mkdtemp = tempfile.mkdtemp


def escpos_module(name: str = "escpos.printer") -> ModuleType:
    """Import a python-escpos module without letting it reconfigure logging or litter /tmp."""
    if name in sys.modules:
        return sys.modules[name]
    with _import_lock:
        if name in sys.modules:
            return sys.modules[name]
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        env_dir = os.environ.get("ESCPOS_CAPABILITIES_PICKLE_DIR")
        # escpos.capabilities does `from tempfile import mkdtemp` and evaluates it eagerly as a
        # default, so patching the attribute during the import is enough.
        tempfile.mkdtemp = (lambda *a, **k: env_dir) if env_dir else _private_cache_dir  # type: ignore[assignment]
        try:
            module = importlib.import_module(name)
        finally:
            tempfile.mkdtemp = _real_mkdtemp
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)
            root.setLevel(level)
        return module


class Encoder:
    """Build a job's bytes with python-escpos's ``Dummy`` printer, on a fixed code page."""

    def __init__(self, *, codec: str = "cp858", profile: str | None = None) -> None:
        printer = escpos_module("escpos.printer")
        self._dummy = printer.Dummy(profile=profile) if profile else printer.Dummy()
        self.codec = codec
        self._dummy._raw(INIT)
        # Set the page ourselves rather than through MagicEncode, which picks pages per
        # character (it chose Greek ISO-8859-7 for "€", §2.8) and may skip ESC t after ESC @.
        self._dummy._raw(select_code_page(codec))

    def raw(self, data: bytes) -> None:
        """Append raw command bytes."""
        self._dummy._raw(data)

    def text(self, line: str) -> None:
        """Append one line of text in the job's code page (unmappable characters become "?")."""
        self._dummy._raw(line.encode(self.codec, errors="replace") + b"\n")

    def style(
        self,
        *,
        align: str = "left",
        bold: bool = False,
        double_height: bool = False,
        double_width: bool = False,
    ) -> None:
        """Set alignment and emphasis; every call states them all so no style leaks."""
        self._dummy.set(
            align=align,
            bold=bold,
            double_height=double_height,
            double_width=double_width,
            normal_textsize=not (double_height or double_width),
        )

    def qr(self, data: str, *, size: int = 6) -> None:
        """Append a native QR code (GS ( k), error correction M."""
        escpos_constants = escpos_module("escpos.constants")
        self._dummy.qr(data, ec=escpos_constants.QR_ECLEVEL_M, size=size, native=True)

    def feed(self, lines: int) -> None:
        """Feed ``lines`` lines (ESC d)."""
        self._dummy._raw(b"\x1b\x64" + bytes([lines]))

    def cut(self) -> None:
        """Feed to the cutter and cut (partial cut leaves the receipt hanging, full cut on B)."""
        self._dummy.cut()

    @property
    def output(self) -> bytes:
        """Return the bytes built so far."""
        return bytes(self._dummy.output)
