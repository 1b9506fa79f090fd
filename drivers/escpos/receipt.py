"""Render a canonical transaction (docs/events.md) as ESC/POS receipt bytes.

The receipt prints what the terminal sent: the total and tenders as given, never recomputed.
Line amounts (quantity × unit price − discount) are shown rounded half-even to the currency's
decimals, like the agent's total rule. The tax summary assumes tax-inclusive prices (the usual
case on European receipts): tax = gross × rate / (100 + rate) per rate.

Text goes out on one fixed code page (CP858 by default: CP850 plus "€"), selected right after
ESC @ because ESC @ resets it (hardware.md §2.8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from drivers.escpos.commands import Encoder

# Characters per line in font A (12 dots wide): 384 dots on 58 mm paper, 576 on 80 mm.
COLUMNS = {58: 32, 80: 48}
TYPE_TITLES = {"sale": None, "refund": "REFUND", "void": "VOID"}


def _money(value: Decimal, decimals: int) -> str:
    return str(value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_EVEN))


def _pair(left: str, right: str, width: int) -> str:
    # Right-aligned amount; a long left part is cut, never the amount.
    room = width - len(right) - 1
    if len(left) > room:
        left = left[: max(room, 0)]
    return left + " " * (width - len(left) - len(right)) + right


def _plain(value: Decimal) -> str:
    # normalize() alone turns 10 into "1E+1"; "f" keeps it positional.
    return format(value.normalize(), "f")


def _quantity(text: str) -> str:
    value = Decimal(text)
    return _plain(value) if value == value.to_integral() else text


def render_receipt(
    txn: Mapping[str, Any],
    *,
    width_mm: int = 80,
    store_name: str,
    store_lines: Sequence[str] = (),
    footer_lines: Sequence[str] = ("Thank you!",),
    decimals: int = 2,
    codec: str = "cp858",
    qr: bool = True,
) -> bytes:
    """Return the ESC/POS bytes of the receipt of ``txn``, ending with a cut.

    ``decimals`` is the currency's (JPY 0, EUR 2, KWD 3): line and tax amounts are shown
    with exactly that many, like the total the terminal sent.
    """
    if width_mm not in COLUMNS:
        raise ValueError(f"width_mm must be 58 or 80, not {width_mm}")
    width = COLUMNS[width_mm]
    currency = str(txn["currency"])
    enc = Encoder(codec=codec)

    enc.style(align="center", bold=True, double_height=True, double_width=width_mm == 80)
    enc.text(store_name)
    enc.style(align="center")
    for line in store_lines:
        enc.text(line)
    title = TYPE_TITLES.get(str(txn.get("type", "sale")))
    if title:
        enc.style(align="center", bold=True)
        enc.text(title)
        enc.style(align="center")
        if txn.get("original_transaction_id"):
            enc.text(f"of {txn['original_transaction_id']}")
    enc.style()
    enc.text("")
    enc.text(_pair("Receipt", str(txn["transaction_id"]), width))
    occurred = str(txn["occurred_at"])
    enc.text(_pair("Date", occurred[:16].replace("T", " "), width))
    enc.text(_pair("Till", str(txn["terminal_id"]), width))
    enc.text("-" * width)

    taxes: dict[Decimal, Decimal] = {}
    for line in txn["lines"]:
        quantity = Decimal(line["quantity"])
        price = Decimal(line["unit_price"])
        discount = Decimal(line.get("discount") or "0")
        gross = quantity * price - discount
        rate = Decimal(line["tax_rate"]) if line.get("tax_rate") is not None else None
        enc.text(str(line.get("description") or line["sku"])[:width])
        label = f"  {_quantity(line['quantity'])} × {_money(price, decimals)}"
        enc.text(_pair(label, _money(quantity * price, decimals), width))
        if discount:
            enc.text(_pair("  Discount", _money(-discount, decimals), width))
        if rate is not None:
            taxes[rate] = taxes.get(rate, Decimal(0)) + gross

    enc.text("-" * width)
    enc.style(bold=True, double_height=True)
    enc.text(_pair("TOTAL", f"{currency} {txn['total']}", width))
    enc.style()
    for tender in txn.get("tenders") or ():
        label = str(tender["method"]).replace("_", " ").capitalize()
        enc.text(_pair(label, str(tender["amount"]), width))
        if tender.get("change") and Decimal(tender["change"]):
            enc.text(_pair("  Change", str(tender["change"]), width))

    if taxes:
        enc.text("")
        enc.text(_pair("Tax", "net     tax   gross", width))
        for rate in sorted(taxes):
            gross = taxes[rate]
            tax = gross * rate / (100 + rate)
            amounts = f"{_money(gross - tax, decimals):>7} {_money(tax, decimals):>7} "
            amounts += f"{_money(gross, decimals):>7}"
            enc.text(_pair(f"{_plain(rate)}%", amounts, width))

    enc.text("")
    enc.style(align="center")
    for line in footer_lines:
        enc.text(line)
    if qr:
        enc.qr(str(txn["transaction_id"]), size=6 if width_mm == 80 else 4)
    enc.style()
    enc.cut()
    return enc.output
