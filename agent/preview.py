"""Render ESC/POS receipt bytes to a PNG of the paper strip, so a person can look at a receipt.

``tillsync print --preview receipt.png`` runs the bytes of ``render_receipt`` (the same bytes a
printer gets) through a small ESC/POS interpreter, :func:`decode`, and draws the result with
Pillow, :func:`render_image`: one dot per pixel, 384 dots across 58 mm paper and 576 across
80 mm, font A cells of 12 × 24 dots, text decoded in the code page selected with ESC t (ESC @
resets it to page 0, CP437, as printers do), emphasis, double width and height, alignment, line
and dot feeds, native QR codes (GS ( k, drawn with the pure-Python ``qrcode`` encoder) and cuts
(a dashed line).

It shows what the printer is told, not what a given model prints: the glyphs come from a
monospaced TrueType font (DejaVu Sans Mono where installed), not the printer's ROM. Commands the
receipts never send (raster images, 1D barcodes, page mode) are refused with a
:class:`PreviewError` naming the byte offset rather than silently left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from agent.currencies import currency_decimals
from drivers.escpos.commands import CODE_PAGES

PAPER_DOTS: dict[int, int] = {58: 384, 80: 576}
CHAR_W, CHAR_H = 12, 24  # font A
DEFAULT_LINE_SPACING = 30  # ESC 2: about 1/6 inch
TOP_MARGIN = 16  # blank paper above the first line, like the tear-off edge
TAB_STOP = 8
INK, PAPER = 0, 255
FONT_CANDIDATES = ("DejaVuSansMono.ttf", "LiberationMono-Regular.ttf", "consola.ttf",
                   "cour.ttf", "Menlo.ttc")
_CODE_PAGE_CODECS = {number: codec for codec, number in CODE_PAGES.items()}
_ALIGN = {0: "left", 48: "left", 1: "center", 49: "center", 2: "right", 50: "right"}
_QR_EC = {48: "L", 49: "M", 50: "Q", 51: "H"}

ESC, GS, DLE, FS = 0x1B, 0x1D, 0x10, 0x1C
LF, CR, HT = 0x0A, 0x0D, 0x09


class PreviewError(ValueError):
    """Bytes or a transaction that cannot be previewed; the message is one line."""


@dataclass(frozen=True)
class Style:
    """Character style in effect for a run of text."""

    bold: bool = False
    underline: bool = False
    width: int = 1  # size multipliers, 1..8
    height: int = 1


@dataclass(frozen=True)
class Span:
    """Text printed in one style."""

    text: str
    style: Style


@dataclass(frozen=True)
class Line:
    """One printed line (ended by LF): its spans, alignment and line spacing in dots."""

    spans: tuple[Span, ...]
    align: str = "left"
    spacing: int = DEFAULT_LINE_SPACING

    @property
    def text(self) -> str:
        """Return the line's text without styles."""
        return "".join(span.text for span in self.spans)


@dataclass(frozen=True)
class Qr:
    """A native QR code (GS ( k): its data, module size in dots and error correction level."""

    data: str
    module: int = 3
    ec: str = "L"
    align: str = "left"


@dataclass(frozen=True)
class Feed:
    """Paper fed without printing, in dots."""

    dots: int


@dataclass(frozen=True)
class Cut:
    """A paper cut (partial or full)."""

    partial: bool = False


Element = Line | Qr | Feed | Cut


@dataclass
class _State:
    codec: str = "cp437"
    style: Style = field(default_factory=Style)
    align: str = "left"
    spacing: int = DEFAULT_LINE_SPACING
    qr_module: int = 3
    qr_ec: str = "L"
    qr_data: bytes | None = None


class _Decoder:
    def __init__(self, data: bytes, codec: str) -> None:
        self.data = data
        self.pos = 0
        self.state = _State(codec=codec)
        self.spans: list[Span] = []
        self.pending = bytearray()
        self.out: list[Element] = []

    # -- text ---------------------------------------------------------------------------------
    def _end_span(self) -> None:
        if self.pending:
            text = bytes(self.pending).decode(self.state.codec, errors="replace")
            self.spans.append(Span(text, self.state.style))
            self.pending.clear()

    def _line_feed(self) -> None:
        self._end_span()
        self.out.append(Line(tuple(self.spans), self.state.align, self.state.spacing))
        self.spans = []

    def _flush(self) -> None:
        # Commands that print the buffer (ESC d, ESC J, cut) end an unfinished line first.
        if self.pending or self.spans:
            self._line_feed()

    def _set_style(self, **changes: Any) -> None:
        self._end_span()
        self.state.style = replace(self.state.style, **changes)

    def _set_codec(self, codec: str) -> None:
        self._end_span()
        self.state.codec = codec

    # -- bytes --------------------------------------------------------------------------------
    def _take(self, count: int, what: str) -> bytes:
        if self.pos + count > len(self.data):
            raise PreviewError(f"{what} at byte {self.pos} is cut short")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def run(self) -> list[Element]:
        while self.pos < len(self.data):
            start = self.pos
            byte = self._take(1, "byte")[0]
            if byte == LF:
                self._line_feed()
            elif byte == CR:
                continue
            elif byte == HT:
                column = sum(len(s.text) for s in self.spans) + len(self.pending)
                self.pending += b" " * (TAB_STOP - column % TAB_STOP)
            elif byte == ESC:
                self._esc(start)
            elif byte == GS:
                self._gs(start)
            elif byte == DLE:
                self._dle(start)
            elif byte >= 0x20:
                self.pending.append(byte)
            else:
                raise PreviewError(f"control byte 0x{byte:02x} at byte {start} is not previewed")
        self._flush()
        return self.out

    def _esc(self, start: int) -> None:
        command = self._take(1, "ESC command")[0]
        if command == ord("@"):
            self._flush()
            self.state = _State(codec="cp437")
        elif command == ord("t"):
            number = self._take(1, "ESC t")[0]
            if number not in _CODE_PAGE_CODECS:
                raise PreviewError(f"code page {number} (ESC t at byte {start}) is not known")
            self._set_codec(_CODE_PAGE_CODECS[number])
        elif command == ord("!"):
            mode = self._take(1, "ESC !")[0]
            self._set_style(bold=bool(mode & 0x08), height=2 if mode & 0x10 else 1,
                            width=2 if mode & 0x20 else 1, underline=bool(mode & 0x80))
        elif command in (ord("E"), ord("G")):
            self._set_style(bold=bool(self._take(1, "ESC E")[0] & 1))
        elif command == ord("-"):
            self._set_style(underline=bool(self._take(1, "ESC -")[0] & 3))
        elif command == ord("a"):
            self.state.align = _ALIGN.get(self._take(1, "ESC a")[0], "left")
        elif command == ord("M"):
            self._take(1, "ESC M")  # font B is shown in font A's cells
        elif command == ord("d"):
            lines = self._take(1, "ESC d")[0]
            self._flush()
            self.out.append(Feed(lines * self.state.spacing))
        elif command == ord("J"):
            dots = self._take(1, "ESC J")[0]
            self._flush()
            self.out.append(Feed(dots))
        elif command == ord("2"):
            self.state.spacing = DEFAULT_LINE_SPACING
        elif command == ord("3"):
            self.state.spacing = self._take(1, "ESC 3")[0]
        elif command == ord("p"):
            self._take(3, "ESC p")  # drawer pulse: nothing on paper
        else:
            raise PreviewError(f"ESC 0x{command:02x} at byte {start} is not previewed")

    def _gs(self, start: int) -> None:
        command = self._take(1, "GS command")[0]
        if command == ord("!"):
            size = self._take(1, "GS !")[0]
            self._set_style(width=(size >> 4 & 7) + 1, height=(size & 7) + 1)
        elif command == ord("V"):
            mode = self._take(1, "GS V")[0]
            if mode in (65, 66, 97, 98, 103, 104):
                self._take(1, "GS V")  # feed amount before the cut
            self._flush()
            self.out.append(Cut(partial=mode in (1, 49, 66, 98, 104)))
        elif command == ord("("):
            function = self._take(1, "GS (")[0]
            low, high = self._take(2, "GS (")
            body = self._take(low + high * 256, "GS ( data")
            if function == ord("k"):
                self._symbol(body, start)
            # GS ( H (process id), GS ( A and the like print nothing.
        elif command in (ord("a"), ord("B"), ord("b"), ord("H"), ord("f"), ord("h"),
                         ord("w")):
            self._take(1, "GS command")  # status back, reverse, smoothing, barcode settings
        else:
            raise PreviewError(f"GS 0x{command:02x} at byte {start} is not previewed")

    def _symbol(self, body: bytes, start: int) -> None:
        if len(body) < 2 or body[0] != ord("1"):
            raise PreviewError(f"2D symbol at byte {start} is not a QR code; not previewed")
        function = body[1]
        if function == ord("C") and len(body) >= 3:
            self.state.qr_module = max(1, min(body[2], 16))
        elif function == ord("E") and len(body) >= 3:
            self.state.qr_ec = _QR_EC.get(body[2], "L")
        elif function == ord("P"):
            self.state.qr_data = bytes(body[3:])
        elif function == ord("Q"):
            if self.state.qr_data is None:
                raise PreviewError(f"QR print at byte {start} without stored data")
            self._flush()
            text = self.state.qr_data.decode("latin-1")
            self.out.append(Qr(text, self.state.qr_module, self.state.qr_ec, self.state.align))

    def _dle(self, start: int) -> None:
        command = self._take(1, "DLE command")[0]
        if command == 0x04:
            self._take(1, "DLE EOT")  # real-time status request
        elif command == 0x14:
            function = self._take(1, "DLE DC4")[0]
            self._take(8 if function == 8 else 3, "DLE DC4")
        else:
            raise PreviewError(f"DLE 0x{command:02x} at byte {start} is not previewed")


def decode(data: bytes, *, codec: str = "cp437") -> list[Element]:
    """Interpret ESC/POS bytes as printed lines, QR codes, feeds and cuts."""
    return _Decoder(data, codec).run()


def text_lines(data: bytes) -> list[str]:
    """Return the text lines ESC/POS bytes print, decoded in their code pages."""
    return [element.text for element in decode(data) if isinstance(element, Line)]


# -- drawing ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _font() -> Any:
    from PIL import ImageFont

    for name in FONT_CANDIDATES:
        try:
            return ImageFont.truetype(name, 20)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=20)
    except (TypeError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


@lru_cache(maxsize=1024)
def glyph(char: str, bold: bool = False) -> Any:
    """Return the 12 × 24 ink mask (mode "L", 255 = ink) a character is drawn with."""
    from PIL import Image, ImageChops, ImageDraw

    cell = Image.new("L", (CHAR_W, CHAR_H), 0)
    font = _font()
    offset = max(0.0, (CHAR_W - font.getlength(char)) / 2)
    ImageDraw.Draw(cell).text((offset, 0), char, fill=255, font=font)
    if bold:  # emphasised: the dots again, one to the right, as printers do
        cell = ImageChops.lighter(cell, ImageChops.offset(cell, 1, 0))
    return cell


def _rows(line: Line, width: int) -> Iterator[list[tuple[str, Style]]]:
    # Characters that do not fit wrap to the next row, as on the printer.
    row: list[tuple[str, Style]] = []
    used = 0
    for span in line.spans:
        for char in span.text:
            cell = CHAR_W * span.style.width
            if row and used + cell > width:
                yield row
                row, used = [], 0
            row.append((char, span.style))
            used += cell
    yield row


def _row_height(row: list[tuple[str, Style]], spacing: int) -> int:
    tallest = max((style.height for _, style in row), default=1)
    return max(spacing, CHAR_H * tallest + spacing - CHAR_H)


def _qr_matrix(qr: Qr) -> list[list[bool]]:
    import qrcode
    from qrcode import constants

    levels = {"L": constants.ERROR_CORRECT_L, "M": constants.ERROR_CORRECT_M,
              "Q": constants.ERROR_CORRECT_Q, "H": constants.ERROR_CORRECT_H}
    code = qrcode.QRCode(error_correction=levels[qr.ec], border=0)
    code.add_data(qr.data)
    code.make(fit=True)
    return [list(row) for row in code.get_matrix()]


def _x(align: str, used: int, width: int) -> int:
    if align == "center":
        return max(0, (width - used) // 2)
    if align == "right":
        return max(0, width - used)
    return 0


def render_image(data: bytes, *, width_mm: int = 80) -> Any:
    """Draw ESC/POS bytes on a paper strip and return the Pillow image (mode "L")."""
    from PIL import Image, ImageDraw

    if width_mm not in PAPER_DOTS:
        raise PreviewError(f"paper width must be 58 or 80 mm, not {width_mm}")
    width = PAPER_DOTS[width_mm]
    elements = decode(data)
    ops: list[tuple[int, Any]] = []  # (y, what to draw)
    y = TOP_MARGIN
    for element in elements:
        if isinstance(element, Line):
            for row in _rows(element, width):
                ops.append((y, (element.align, row)))
                y += _row_height(row, element.spacing)
        elif isinstance(element, Qr):
            matrix = _qr_matrix(element)
            ops.append((y, element))
            y += len(matrix) * element.module + CHAR_H // 2
        elif isinstance(element, Feed):
            y += element.dots
        else:
            ops.append((y + CHAR_H // 2, element))
            y += CHAR_H
    image = Image.new("L", (width, max(y, TOP_MARGIN + CHAR_H)), PAPER)
    draw = ImageDraw.Draw(image)
    for top, what in ops:
        if isinstance(what, Qr):
            matrix = _qr_matrix(what)
            size = len(matrix) * what.module
            left = _x(what.align, size, width)
            for r, modules in enumerate(matrix):
                for c, dark in enumerate(modules):
                    if dark:
                        x0, y0 = left + c * what.module, top + r * what.module
                        draw.rectangle((x0, y0, x0 + what.module - 1, y0 + what.module - 1),
                                       fill=INK)
        elif isinstance(what, Cut):
            for x in range(0, width, 12):
                draw.line((x, top, x + 6, top), fill=INK)
        else:
            align, row = what
            tallest = max((style.height for _, style in row), default=1)
            x = _x(align, sum(CHAR_W * style.width for _, style in row), width)
            for char, style in row:
                w, h = CHAR_W * style.width, CHAR_H * style.height
                mask = glyph(char, style.bold)
                if (w, h) != mask.size:
                    mask = mask.resize((w, h), Image.Resampling.NEAREST)
                base = top + CHAR_H * (tallest - style.height)  # characters share a baseline
                image.paste(INK, (x, base, x + w, base + h), mask)
                if style.underline:
                    draw.line((x, base + h - 1, x + w - 1, base + h - 1), fill=INK)
                x += w
    return image


# -- transactions -----------------------------------------------------------------------------

SAMPLE_TRANSACTION: dict[str, Any] = {
    "transaction_id": "T01-20261122-000123",
    "terminal_id": "T01",
    "type": "sale",
    "occurred_at": "2026-11-22T10:15:00+01:00",
    "currency": "EUR",
    "lines": [
        {"sku": "4006381333931", "description": "Café crème", "quantity": "2",
         "unit_price": "2.50", "discount": "0.00", "tax_rate": "19"},
        {"sku": "APL", "description": "Äpfel (kg)", "quantity": "0.735",
         "unit_price": "2.99", "discount": "0.20", "tax_rate": "7"},
        {"sku": "BRT", "description": "Brötchen à 0,45 €", "quantity": "4",
         "unit_price": "0.45", "discount": "0.00", "tax_rate": "7"},
    ],
    "tenders": [{"method": "cash", "amount": "10.00", "change": "1.20"}],
    "total": "8.80",
}


def load_transaction(path: Path) -> dict[str, Any]:
    """Read and check a §5 transaction from a JSON file; raise PreviewError in one line."""
    from agent.canonical import InvalidEvent, parse_transaction

    try:
        body = path.read_bytes()
    except OSError as err:
        raise PreviewError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        accepted = parse_transaction(body)
    except InvalidEvent as err:
        message = " ".join(err.message.split())
        raise PreviewError(f"{path} is not a valid transaction: {message}") from None
    return accepted.data


def render_receipt_png(
    txn: Mapping[str, Any], out: Path, *, width_mm: int = 80, store_name: str = "Store",
) -> Any:
    """Render the receipt of ``txn`` as ESC/POS bytes, draw them and write ``out`` (PNG)."""
    from drivers.escpos.receipt import render_receipt

    if width_mm not in PAPER_DOTS:
        raise PreviewError(f"paper width must be 58 or 80 mm, not {width_mm}")
    data = render_receipt(txn, width_mm=width_mm, store_name=store_name,
                          decimals=currency_decimals(txn))
    image = render_image(data, width_mm=width_mm)
    image.save(out, format="PNG")
    return image

