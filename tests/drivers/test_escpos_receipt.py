from __future__ import annotations

import os
from pathlib import Path

import pytest

from drivers.escpos import commands
from drivers.escpos.receipt import render_receipt

GOLDEN = Path(__file__).parent / "golden"

SALE = {
    "transaction_id": "T01-20261122-000123",
    "terminal_id": "T01",
    "type": "sale",
    "occurred_at": "2026-11-22T10:15:00+01:00",
    "currency": "EUR",
    "lines": [
        {"sku": "4006381333931", "description": "Café crème", "quantity": "2",
         "unit_price": "2.50", "tax_rate": "19"},
        {"sku": "APL", "description": "Äpfel (kg)", "quantity": "0.735",
         "unit_price": "2.99", "discount": "0.20", "tax_rate": "7"},
    ],
    "total": "7.00",
    "tenders": [{"method": "cash", "amount": "10.00", "change": "3.00"}],
}  # fmt: skip


def render(width_mm: int) -> bytes:
    return render_receipt(
        SALE,
        width_mm=width_mm,
        store_name="Bäckerei Müller",
        store_lines=["Hauptstraße 1, Köln", "Preise in €"],
    )


@pytest.mark.parametrize("width_mm", [58, 80])
def test_receipt_bytes_match_the_golden_file(width_mm: int) -> None:
    path = GOLDEN / f"receipt_sale_{width_mm}mm.bin"
    data = render(width_mm)
    if os.environ.get("TILLSYNC_UPDATE_GOLDEN"):
        path.write_bytes(data)
    assert data == path.read_bytes(), f"regenerate with TILLSYNC_UPDATE_GOLDEN=1 and review {path}"


def test_euro_and_accents_are_encoded_in_cp858_after_selecting_it() -> None:
    data = render(80)
    assert data.startswith(commands.INIT + commands.select_code_page("cp858"))
    assert "Preise in €".encode("cp858") in data
    assert b"\xd5" in data  # "€" in CP858
    assert "Bäckerei Müller".encode("cp858") in data
    assert "×".encode("cp858") in data


def test_receipt_has_qr_of_the_transaction_id_and_ends_with_a_cut() -> None:
    data = render(58)
    tid = b"T01-20261122-000123"
    store = b"\x1d\x28\x6b" + bytes([len(tid) + 3, 0]) + b"\x31\x50\x30" + tid
    assert store in data
    assert data.endswith(b"\x1d\x56\x00")


def test_lines_fit_the_paper_width() -> None:
    for width_mm, columns in ((58, 32), (80, 48)):
        text = render(width_mm).split(b"\x1d\x28\x6b")[0]
        for line in text.split(b"\n"):
            printable = bytes(b for b in line if b >= 0x20)
            # Style commands carry a few printable parameter bytes; text itself must fit.
            assert len(printable) <= columns + 12


def test_a_refund_says_so_and_names_the_original() -> None:
    refund = {**SALE, "type": "refund", "original_transaction_id": "T01-20261121-000001"}
    data = render_receipt(refund, width_mm=80, store_name="Shop")
    assert b"REFUND" in data
    assert b"of T01-20261121-000001" in data


def test_tax_summary_splits_gross_by_rate() -> None:
    text = render(80).decode("cp858", errors="replace")
    assert "19%" in text and "4.20    0.80    5.00" in text
    assert "7%" in text and "1.87    0.13    2.00" in text


def _text(data: bytes) -> str:
    return data.decode("cp858", errors="replace")


def test_amounts_have_the_currency_s_decimals_and_round_numbers_print_plainly() -> None:
    """JPY has no decimals and KWD three: line and tax amounts use exactly the currency's
    (the total is printed as sent). A quantity or tax rate of 10 prints as "10", never in
    Decimal's exponent form "1E+1"."""
    yen = {**SALE, "currency": "JPY", "total": "1500",
           "lines": [{"sku": "A", "description": "Tea", "quantity": "10",
                      "unit_price": "150", "tax_rate": "10"}],
           "tenders": [{"method": "cash", "amount": "1500"}]}
    text = _text(render_receipt(yen, store_name="S", decimals=0))
    assert "10 × 150 " in text and "1500" in text and "10%" in text
    assert "150.00" not in text and "E+" not in text
    assert "1364" in text and "136" in text  # net and tax of 1500 gross at 10 %

    dinar = {**SALE, "currency": "KWD", "total": "3.240",
             "lines": [{"sku": "A", "description": "Dates", "quantity": "1",
                        "unit_price": "1.235", "tax_rate": "20"},
                       {"sku": "B", "description": "Milk", "quantity": "1",
                        "unit_price": "2.005", "tax_rate": "20"}],
             "tenders": [{"method": "cash", "amount": "3.240"}]}
    text = _text(render_receipt(dinar, store_name="S", decimals=3))
    assert "1 × 1.235" in text and "1 × 2.005" in text and "20%" in text
    assert "1.24 " not in text and "E+" not in text
