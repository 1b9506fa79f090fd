"""ESC/POS status answers as data: DLE EOT n=1..4, automatic status back, and byte classification.

One TCP or serial stream carries every answer the printer sends: real-time status (DLE EOT),
automatic status back frames (GS a) it may send unasked (a DIP switch can enable them), GS ( H
process-ID blocks, XON/XOFF and noise. :class:`StatusParser` classifies every incoming byte by
the bit patterns of "identification of send status" (hardware.md §2.2.5) instead of assuming the
next byte answers the last question. It is incremental: a frame split across reads is kept.

The bit tables below are the one place these protocol facts live; the emulator derives its
answers from the same tables, so a wrong bit would show up as a disagreement with hardware.md in
review rather than being silently consistent in two places.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace

XON = 0x11
XOFF = 0x13
PROCESS_ID_HEADER = 0x37  # GS ( H fn=48 answer: 37 22 d1 d2 d3 d4 00
PROCESS_ID_KIND = 0x22
GS_I_BLOCK_HEADER = 0x5F  # GS I n>=65 answer: 5F <0-15 bytes> 00
# A block answer longer than this is not one: treat it as junk instead of waiting forever.
MAX_BLOCK_LEN = 80

# Fact names, all "true means the condition is present".
FACTS = (
    "drawer_pin3_high",
    "offline",
    "cover_open",
    "feed_button",
    "paper_end_stop",
    "error",
    "mechanical_error",
    "autocutter_error",
    "unrecoverable_error",
    "auto_recoverable_error",
    "paper_near_end",
    "paper_out",
)

# DLE EOT n answers (hardware.md §2.2.1-§2.2.4): n -> ((mask, fact), ...). A fact is set when any
# bit of its mask is set. Bits not listed are fixed or vendor-specific and are ignored.
DLE_EOT_BITS: Mapping[int, tuple[tuple[int, str], ...]] = {
    1: ((0x04, "drawer_pin3_high"), (0x08, "offline")),
    2: ((0x04, "cover_open"), (0x08, "feed_button"), (0x20, "paper_end_stop"), (0x40, "error")),
    # n=3 bit 2 is undefined on Epson/Bixolon and "black mark error" on Citizen: not read.
    3: (
        (0x08, "autocutter_error"),
        (0x20, "unrecoverable_error"),
        (0x40, "auto_recoverable_error"),
    ),
    # Near end: any of bits 2,3 (Citizen reports two near-end sensors separately, so requiring
    # both, as python-escpos does, misses them). Paper end: bit 5 only, because bit 6 is the
    # presenter sensor on Citizen PPU-231II while Epson sets both.
    4: ((0x0C, "paper_near_end"), (0x20, "paper_out")),
}

# Automatic status back, 4 bytes (hardware.md §2.3): byte index -> ((mask, fact), ...).
ASB_BITS: tuple[tuple[tuple[int, str], ...], ...] = (
    ((0x04, "drawer_pin3_high"), (0x08, "offline"), (0x20, "cover_open"), (0x40, "feed_button")),
    (
        (0x04, "mechanical_error"),
        (0x08, "autocutter_error"),
        (0x20, "unrecoverable_error"),
        (0x40, "auto_recoverable_error"),
    ),
    # Note the shift against DLE EOT 4: in ASB byte 3, near end is bits 0-1 and paper end 2-3.
    ((0x03, "paper_near_end"), (0x0C, "paper_out")),
    (),  # reserved
)

# Fixed bits of each frame kind; the emulator adds these, the parser tests them.
DLE_EOT_FIXED = 0x12  # 0xx1xx10
ASB_FIRST_FIXED = 0x10  # 0xx1xx00
ASB_OTHER_FIXED = 0x00  # 0xx0xxxx


@dataclass(frozen=True)
class StatusFacts:
    """What the printer said about itself; ``None`` means "not reported by this answer"."""

    drawer_pin3_high: bool | None = None
    offline: bool | None = None
    cover_open: bool | None = None
    feed_button: bool | None = None
    paper_end_stop: bool | None = None
    error: bool | None = None
    mechanical_error: bool | None = None
    autocutter_error: bool | None = None
    unrecoverable_error: bool | None = None
    auto_recoverable_error: bool | None = None
    paper_near_end: bool | None = None
    paper_out: bool | None = None

    def merged(self, newer: StatusFacts) -> StatusFacts:
        """Return these facts updated by every fact ``newer`` reports."""
        changes = {
            f.name: getattr(newer, f.name)
            for f in fields(newer)
            if getattr(newer, f.name) is not None
        }
        return replace(self, **changes)

    @property
    def any_error(self) -> bool:
        """Tell whether any error bit is set."""
        return bool(
            self.error
            or self.mechanical_error
            or self.autocutter_error
            or self.unrecoverable_error
            or self.auto_recoverable_error
        )

    @property
    def cannot_print(self) -> bool:
        """Tell whether the printer reported a condition that stops printing.

        Offline counts for any cause (the feed button, "waiting for online recovery"):
        bytes sent then wait in the printer's buffer and print whenever it is back, which
        could be after the job expired (CONTRACT §4: never printed late).
        """
        return bool(self.paper_out or self.paper_end_stop or self.cover_open or self.any_error
                    or self.offline)


def _facts_from(byte: int, table: Iterable[tuple[int, str]]) -> dict[str, bool]:
    return {name: bool(byte & mask) for mask, name in table}


def parse_dle_eot(n: int, byte: int) -> StatusFacts:
    """Return the facts of a DLE EOT ``n`` answer byte."""
    if n not in DLE_EOT_BITS:
        raise ValueError(f"DLE EOT n must be 1..4, not {n}")
    return StatusFacts(**_facts_from(byte, DLE_EOT_BITS[n]))


def parse_asb(frame: bytes) -> StatusFacts:
    """Return the facts of a 4-byte automatic status back frame."""
    if len(frame) != 4:
        raise ValueError(f"an ASB frame has 4 bytes, not {len(frame)}")
    facts: dict[str, bool] = {}
    for byte, table in zip(frame, ASB_BITS, strict=True):
        facts.update(_facts_from(byte, table))
    return StatusFacts(**facts)


def encode_dle_eot(n: int, facts: StatusFacts) -> int:
    """Return the DLE EOT ``n`` answer byte for ``facts`` (used by the emulator)."""
    byte = DLE_EOT_FIXED
    for mask, name in DLE_EOT_BITS[n]:
        if getattr(facts, name):
            byte |= mask
    return byte


def encode_asb(facts: StatusFacts) -> bytes:
    """Return the 4-byte ASB frame for ``facts`` (used by the emulator)."""
    out = bytearray([ASB_FIRST_FIXED, ASB_OTHER_FIXED, ASB_OTHER_FIXED, ASB_OTHER_FIXED])
    for i, table in enumerate(ASB_BITS):
        for mask, name in table:
            if getattr(facts, name):
                out[i] |= mask
    return bytes(out)


class ByteKind(enum.StrEnum):
    """What an incoming byte (or frame) is, per "identification of send status"."""

    XON = "xon"
    XOFF = "xoff"
    REALTIME = "realtime"  # DLE EOT answer, 0xx1xx10
    ASB = "asb"  # 4-byte automatic status back frame, first byte 0xx1xx00
    SINGLE = "single"  # 0xx0xxxx outside an ASB frame: GS r / GS I one-byte answers
    PROCESS_ID = "process_id"  # GS ( H fn=48 answer 37 22 d1 d2 d3 d4 00
    BLOCK = "block"  # other header ... NUL block answers (GS I n>=65, other 37 xx)
    JUNK = "junk"  # fits no pattern, or a frame broken off


@dataclass(frozen=True)
class Incoming:
    """One classified unit of the incoming stream."""

    kind: ByteKind
    data: bytes

    @property
    def process_id(self) -> bytes | None:
        """Return the 4-byte job id of a GS ( H answer, else None."""
        if self.kind is ByteKind.PROCESS_ID:
            return self.data[2:6]
        return None


class StatusParser:
    """Classify every byte the printer sends, keeping partial frames across ``feed`` calls."""

    def __init__(self) -> None:
        self._asb = bytearray()  # ASB frame being collected (first byte included)
        self._block = bytearray()  # block answer being collected (header included)

    def feed(self, data: bytes) -> list[Incoming]:
        """Classify ``data`` and return the complete units it finishes, in order."""
        out: list[Incoming] = []
        for b in data:
            self._step(b, out)
        return out

    def _step(self, b: int, out: list[Incoming]) -> None:
        if self._block:
            self._block.append(b)
            if b == 0x00:
                block = bytes(self._block)
                self._block.clear()
                kind = ByteKind.BLOCK
                if len(block) == 7 and block[:2] == bytes([PROCESS_ID_HEADER, PROCESS_ID_KIND]):
                    kind = ByteKind.PROCESS_ID
                out.append(Incoming(kind, block))
            elif len(self._block) >= MAX_BLOCK_LEN:
                out.append(Incoming(ByteKind.JUNK, bytes(self._block)))
                self._block.clear()
            return
        if self._asb:
            # XON/XOFF may be interleaved in an ASB frame; they are not part of it.
            if b in (XON, XOFF):
                out.append(Incoming(ByteKind.XON if b == XON else ByteKind.XOFF, bytes([b])))
                return
            if b & 0x90 == ASB_OTHER_FIXED:
                self._asb.append(b)
                if len(self._asb) == 4:
                    out.append(Incoming(ByteKind.ASB, bytes(self._asb)))
                    self._asb.clear()
                return
            # A frame broken off: report what we had as junk and read this byte afresh.
            out.append(Incoming(ByteKind.JUNK, bytes(self._asb)))
            self._asb.clear()
        self._classify_first(b, out)

    def _classify_first(self, b: int, out: list[Incoming]) -> None:
        if b == XON:
            out.append(Incoming(ByteKind.XON, bytes([b])))
        elif b == XOFF:
            out.append(Incoming(ByteKind.XOFF, bytes([b])))
        elif b in (PROCESS_ID_HEADER, GS_I_BLOCK_HEADER):
            self._block.append(b)
        elif b & 0x93 == DLE_EOT_FIXED:
            out.append(Incoming(ByteKind.REALTIME, bytes([b])))
        elif b & 0x93 == ASB_FIRST_FIXED:
            self._asb.append(b)
        elif b & 0x90 == 0x00:
            out.append(Incoming(ByteKind.SINGLE, bytes([b])))
        else:
            out.append(Incoming(ByteKind.JUNK, bytes([b])))
