"""``tillsync print --preview``: ESC/POS bytes decoded back to text and drawn on a paper strip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from agent.cli import main
from agent.preview import (
    CHAR_H,
    CHAR_W,
    PAPER,
    SAMPLE_TRANSACTION,
    TOP_MARGIN,
    Cut,
    Feed,
    Line,
    PreviewError,
    Qr,
    Style,
    decode,
    glyph,
    render_image,
    text_lines,
)
from drivers.escpos import commands
from drivers.escpos.receipt import render_receipt

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "drivers" / "golden"
CP858 = commands.INIT + commands.select_code_page("cp858")


def ink(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    """Dark pixels in ``box``."""
    return sum(image.crop(box).histogram()[:128])


def cell(image: Image.Image, column: int, top: int = TOP_MARGIN) -> Image.Image:
    return image.crop((column * CHAR_W, top, (column + 1) * CHAR_W, top + CHAR_H))


def as_ink(mask: Image.Image) -> Image.Image:
    """The glyph mask as it looks on paper (black ink on white)."""
    return ImageChops.invert(mask)


# -- the decoder ------------------------------------------------------------------------------


def test_the_golden_receipt_decodes_to_its_text_in_cp858():
    lines = text_lines((GOLDEN / "receipt_sale_58mm.bin").read_bytes())
    assert lines[:3] == ["Bäckerei Müller", "Hauptstraße 1, Köln", "Preise in €"]
    assert "Café crème" in lines and "Äpfel (kg)" in lines
    assert "  2 × 2.50                  5.00" in lines
    assert "TOTAL                   EUR 7.00" in lines
    assert lines[-1] == "Thank you!"
    assert all(len(line) <= 32 for line in lines)


def test_the_decoder_keeps_styles_alignment_the_qr_code_and_the_cut():
    elements = decode((GOLDEN / "receipt_sale_80mm.bin").read_bytes())
    header = elements[0]
    assert isinstance(header, Line) and header.align == "center"
    assert header.spans[0].style == Style(bold=True, width=2, height=2)
    [total] = [e for e in elements if isinstance(e, Line) and e.text.startswith("TOTAL")]
    assert total.align == "left" and total.spans[0].style == Style(bold=True, height=2)
    [qr] = [e for e in elements if isinstance(e, Qr)]
    assert qr == Qr("T01-20261122-000123", module=6, ec="M", align="center")
    assert isinstance(elements[-2], Feed) and elements[-1] == Cut(partial=False)


def test_esc_at_resets_the_code_page_so_bytes_decode_in_the_page_last_selected():
    euro = "€".encode("cp858")
    assert text_lines(CP858 + euro + b"\n") == ["€"]
    assert text_lines(CP858 + commands.INIT + euro + b"\n") == [euro.decode("cp437")]
    latin9 = commands.INIT + commands.select_code_page("iso8859_15")
    assert text_lines(latin9 + "€é".encode("iso8859_15") + b"\n") == ["€é"]


def test_style_changes_inside_a_line_make_spans_and_gs_bang_sets_the_size():
    data = CP858 + b"a\x1bE\x01b\x1d\x21\x11c\n"
    [line] = decode(data)
    assert isinstance(line, Line)
    assert [(s.text, s.style) for s in line.spans] == [
        ("a", Style()), ("b", Style(bold=True)), ("c", Style(bold=True, width=2, height=2))]


@pytest.mark.parametrize(("data", "message"), [
    (b"\x1bt\x63", "code page 99"),
    (b"\x1d\x76\x30\x00", "GS 0x76 at byte 0 is not previewed"),  # raster image
    (b"abc\x1b", "cut short"),
])
def test_bytes_it_cannot_show_are_refused_naming_where(data: bytes, message: str):
    with pytest.raises(PreviewError, match=message):
        decode(data)


# -- the image --------------------------------------------------------------------------------


@pytest.mark.parametrize(("width_mm", "pixels"), [(58, 384), (80, 576)])
def test_the_strip_is_as_wide_as_the_paper_has_dots(width_mm: int, pixels: int):
    data = render_receipt(SAMPLE_TRANSACTION, width_mm=width_mm, store_name="Shop")
    image = render_image(data, width_mm=width_mm)
    assert image.width == pixels
    assert image.height > 30 * len(text_lines(data))


def test_text_leaves_ink_where_it_is_and_nowhere_else():
    data = CP858 + b"X\n\n" + b"\x1ba\x02R\n"
    image = render_image(data, width_mm=58)
    assert ink(image, (0, TOP_MARGIN, CHAR_W, TOP_MARGIN + CHAR_H)) > 20
    assert ink(image, (CHAR_W, 0, image.width, TOP_MARGIN + 30)) == 0  # rest of line 1
    assert ink(image, (0, TOP_MARGIN + 30, image.width, TOP_MARGIN + 60)) == 0  # empty line
    right = (image.width - CHAR_W, TOP_MARGIN + 60, image.width, TOP_MARGIN + 60 + CHAR_H)
    assert ink(image, right) > 20  # right-aligned "R"
    assert ink(image, (0, TOP_MARGIN + 60, image.width - CHAR_W, TOP_MARGIN + 90)) == 0


def test_the_euro_sign_and_accented_letters_are_drawn_as_those_glyphs():
    text = "€éÄß"
    image = render_image(CP858 + text.encode("cp858") + b"\n", width_mm=58)
    for column, char in enumerate(text):
        drawn = cell(image, column)
        assert ImageChops.difference(drawn, as_ink(glyph(char))).getbbox() is None, char
        assert ImageChops.difference(drawn, as_ink(glyph("?"))).getbbox() is not None


def test_the_same_byte_in_another_code_page_is_another_glyph():
    image = render_image(commands.INIT + b"\xd5\n", width_mm=58)  # CP437 after ESC @
    assert ImageChops.difference(cell(image, 0), as_ink(glyph("€"))).getbbox() is not None
    assert ImageChops.difference(cell(image, 0), as_ink(glyph("╒"))).getbbox() is None


def test_bold_and_double_size_text_is_wider_and_darker():
    image = render_image(CP858 + b"M\n" + b"\x1b!\x38M\n", width_mm=58)
    plain = ink(image, (0, TOP_MARGIN, CHAR_W, TOP_MARGIN + CHAR_H))
    big_top = TOP_MARGIN + 30
    big = ink(image, (0, big_top, 2 * CHAR_W, big_top + 2 * CHAR_H))
    assert big > 4 * plain
    assert ink(image, (2 * CHAR_W, big_top, image.width, big_top + 2 * CHAR_H)) == 0


def test_the_qr_code_is_drawn_module_by_module_as_the_encoder_says():
    import qrcode

    enc = commands.Encoder()
    enc.style(align="center")
    enc.qr("T01-20261122-000123", size=6)
    [qr] = decode(enc.output)
    assert qr == Qr("T01-20261122-000123", module=6, ec="M", align="center")
    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=0)
    code.add_data(qr.data)
    code.make(fit=True)
    matrix = code.get_matrix()
    image = render_image(enc.output, width_mm=80)
    side = len(matrix) * 6
    left, top = (image.width - side) // 2, TOP_MARGIN
    assert ImageChops.invert(image).getbbox() == (left, top, left + side, top + side)
    for r, modules in enumerate(matrix):
        for c, dark in enumerate(modules):
            x, y = left + c * 6 + 3, top + r * 6 + 3
            assert (image.getpixel((x, y)) < 128) == dark, (r, c)


def test_paper_is_white_outside_the_print():
    image = render_image(CP858 + b"x\n", width_mm=80)
    assert image.getpixel((image.width - 1, 0)) == PAPER
    assert image.mode == "L"


# -- the command ------------------------------------------------------------------------------


def test_print_preview_writes_the_sample_receipt(tmp_path: Path, capsys):
    out = tmp_path / "receipt.png"
    assert main(["print", "--preview", str(out), "--width", "58",
                 "--store-name", "Bäckerei Müller"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("wrote the receipt of T01-20261122-000123 (58 mm, 384×")
    assert line.endswith(str(out))
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width == 384
        assert image.convert("L").getextrema()[0] == 0  # something was printed


def test_print_preview_of_a_transaction_file(tmp_path: Path, capsys):
    txn = {**SAMPLE_TRANSACTION, "transaction_id": "T02-1", "terminal_id": "T02"}
    source = tmp_path / "sale.json"
    source.write_text(json.dumps(txn))
    out = tmp_path / "r.png"
    assert main(["print", "--preview", str(out), "--transaction", str(source)]) == 0
    assert "T02-1 (80 mm, 576×" in capsys.readouterr().out
    assert Image.open(out).width == 576


@pytest.mark.parametrize(("content", "expected"), [
    (None, "cannot read"),
    ("{not json", "is not a valid transaction: body: not valid JSON"),
    (json.dumps({**SAMPLE_TRANSACTION, "total": "1.00"}), "is not a valid transaction: total"),
])
def test_a_bad_transaction_file_is_one_line_and_exit_2(tmp_path: Path, content: str | None,
                                                      expected: str):
    source = tmp_path / "sale.json"
    if content is not None:
        source.write_text(content)
    out = tmp_path / "r.png"
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "print", "--preview", str(out),
         "--transaction", str(source)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"tillsync: {source}" if content else "tillsync: cannot read")
    assert expected in line
    assert not out.exists()
