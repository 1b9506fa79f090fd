"""GS1 rules a till needs: check digits, element strings, in-store variable-measure codes.

Everything here is pure and synchronous. Sources: hardware.md §4.3 and the GS1 General
Specifications (AI table, §7.9.1 mod-10 check digit, §7.9.3/§7.9.4 price/weight verifiers).

Invariants:
- every failure raises `GS1Error` (a `ValueError`), never anything else, whatever the input;
- `parse_element_string(encode_element_string(x)) == x` for every valid mapping ``x``;
- variable-measure layouts are data (`VariableMeasureRule`), because GS1 leaves them to each
  national member organisation or retailer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

GS = "\x1d"  # FNC1 as transmitted by scanners (ASCII group separator)


class GS1Error(ValueError):
    """A code or element string that breaks a GS1 rule."""


# --------------------------------------------------------------------------------------------
# Mod-10 check digit (GTIN-8/12/13/14, GLN, SSCC)


def check_digit(body: str) -> int:
    """Return the mod-10 check digit for the digits ``body`` (without its check digit)."""
    if not body or not body.isascii() or not body.isdigit():
        raise GS1Error(f"not a digit string: {body!r}")
    # Weights 3,1,3,1… from the rightmost digit of the body.
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(body)))
    return (10 - total % 10) % 10


def has_valid_check_digit(code: str) -> bool:
    """Return True when the last digit of ``code`` is its mod-10 check digit."""
    if len(code) < 2 or not code.isascii() or not code.isdigit():
        return False
    return check_digit(code[:-1]) == int(code[-1])


GTIN_LENGTHS = (8, 12, 13, 14)


def is_valid_gtin(code: str) -> bool:
    """Return True for a GTIN-8/12/13/14 with a correct check digit."""
    return len(code) in GTIN_LENGTHS and has_valid_check_digit(code)


def to_gtin14(code: str) -> str:
    """Return the GTIN-14 form (left zero-padded) of a valid GTIN-8/12/13/14."""
    if not is_valid_gtin(code):
        raise GS1Error(f"not a valid GTIN: {code!r}")
    return code.rjust(14, "0")


# --------------------------------------------------------------------------------------------
# Application Identifiers: one table, data only.


@dataclass(frozen=True)
class AISpec:
    """How one Application Identifier's data field is formed."""

    ai: str
    title: str
    length: int  # exact length when fixed, maximum length when variable
    fixed: bool
    numeric: bool
    check_digit: bool = False  # last digit is a mod-10 check digit (GTIN, SSCC, GLN)
    decimals: bool = False  # last AI digit gives the implied decimal places (310n, 392n, …)


def _ai(ai: str, title: str, fmt: str, *, check: bool = False) -> list[AISpec]:
    """Expand one table row; fmt is "N14" (fixed), "N..20"/"X..20" (variable)."""
    numeric = fmt[0] == "N"
    fixed = ".." not in fmt
    length = int(fmt.lstrip("NX.").strip())
    if ai.endswith("n"):  # a family: the 4th digit is the decimal-point position
        return [
            AISpec(ai[:-1] + str(n), title, length, fixed, numeric, check, True) for n in range(10)
        ]
    return [AISpec(ai, title, length, fixed, numeric, check)]


# The AIs a retail till meets; GS1 General Specifications §3.2. AIs are prefix-free, which is
# what lets a parser find where an AI ends without separators.
_AI_ROWS: list[list[AISpec]] = [
    _ai("00", "SSCC", "N18", check=True),
    _ai("01", "GTIN", "N14", check=True),
    _ai("02", "CONTENT", "N14", check=True),
    _ai("10", "BATCH/LOT", "X..20"),
    _ai("11", "PROD DATE", "N6"),
    _ai("12", "DUE DATE", "N6"),
    _ai("13", "PACK DATE", "N6"),
    _ai("15", "BEST BEFORE", "N6"),
    _ai("16", "SELL BY", "N6"),
    _ai("17", "USE BY", "N6"),
    _ai("20", "VARIANT", "N2"),
    _ai("21", "SERIAL", "X..20"),
    _ai("22", "CPV", "X..20"),
    _ai("240", "ADDITIONAL ID", "X..30"),
    _ai("241", "CUST. PART No.", "X..30"),
    _ai("250", "SECONDARY SERIAL", "X..30"),
    _ai("251", "REF. TO SOURCE", "X..30"),
    _ai("253", "GDTI", "X..30"),  # N13 + optional X..17 serial
    _ai("254", "GLN EXTENSION", "X..20"),
    _ai("30", "VAR. COUNT", "N..8"),
    _ai("310n", "NET WEIGHT (kg)", "N6"),
    _ai("311n", "LENGTH (m)", "N6"),
    _ai("312n", "WIDTH (m)", "N6"),
    _ai("313n", "HEIGHT (m)", "N6"),
    _ai("314n", "AREA (m2)", "N6"),
    _ai("315n", "NET VOLUME (l)", "N6"),
    _ai("316n", "NET VOLUME (m3)", "N6"),
    _ai("320n", "NET WEIGHT (lb)", "N6"),
    _ai("330n", "GROSS WEIGHT (kg)", "N6"),
    _ai("37", "COUNT", "N..8"),
    _ai("390n", "AMOUNT", "N..15"),
    _ai("391n", "AMOUNT + ISO", "N..18"),
    _ai("392n", "PRICE", "N..15"),
    _ai("393n", "PRICE + ISO", "N..18"),
    _ai("400", "ORDER NUMBER", "X..30"),
    _ai("401", "GINC", "X..30"),
    _ai("402", "GSIN", "N17", check=True),
    _ai("403", "ROUTE", "X..30"),
    _ai("410", "SHIP TO LOC", "N13", check=True),
    _ai("411", "BILL TO", "N13", check=True),
    _ai("412", "PURCHASE FROM", "N13", check=True),
    _ai("413", "SHIP FOR LOC", "N13", check=True),
    _ai("414", "LOC No.", "N13", check=True),
    _ai("415", "PAY TO", "N13", check=True),
    _ai("416", "PROD/SERV LOC", "N13", check=True),
    _ai("420", "SHIP TO POST", "X..20"),
    _ai("421", "SHIP TO POST + ISO", "X..12"),
    _ai("422", "ORIGIN", "N3"),
    _ai("7003", "EXPIRY TIME", "N10"),
    _ai("8003", "GRAI", "X..30"),
    _ai("8004", "GIAI", "X..30"),
    _ai("8005", "PRICE PER UNIT", "N6"),
    _ai("8008", "PROD TIME", "N..12"),
    _ai("8020", "REF No.", "X..25"),
    _ai("8200", "PRODUCT URL", "X..70"),
    _ai("90", "INTERNAL", "X..30"),
    *(_ai(f"9{d}", "INTERNAL", "X..90") for d in range(1, 10)),
]
AI_TABLE: dict[str, AISpec] = {spec.ai: spec for row in _AI_ROWS for spec in row}

# GS1 "invariant" character set 82 for X fields (letters, digits, and !"%&'()*+,-./:;<=>?_).
_CSET82 = re.compile(r"[!\"%&'()*+,\-./0-9:;<=>?A-Z_a-z]*")


def _lookup_ai(text: str, pos: int) -> AISpec:
    for size in (2, 3, 4):
        spec = AI_TABLE.get(text[pos : pos + size])
        if spec is not None:
            return spec
    raise GS1Error(f"unknown application identifier at {pos}: {text[pos : pos + 4]!r}")


def _check_value(spec: AISpec, value: str) -> None:
    if not value:
        raise GS1Error(f"AI ({spec.ai}) has no data")
    if spec.fixed and len(value) != spec.length:
        raise GS1Error(f"AI ({spec.ai}) needs {spec.length} characters, got {len(value)}")
    if len(value) > spec.length:
        raise GS1Error(f"AI ({spec.ai}) allows at most {spec.length} characters")
    if spec.numeric and not (value.isascii() and value.isdigit()):
        raise GS1Error(f"AI ({spec.ai}) must be digits: {value!r}")
    if not spec.numeric and not _CSET82.fullmatch(value):
        raise GS1Error(f"AI ({spec.ai}) has characters outside GS1 set 82: {value!r}")
    if spec.check_digit and not has_valid_check_digit(value):
        raise GS1Error(f"AI ({spec.ai}) check digit is wrong: {value}")


def parse_element_string(data: str) -> dict[str, str]:
    """Split a GS1 element string (FNC1 as GS, AIM ID already removed) into AI → value."""
    if not isinstance(data, str):
        raise GS1Error("element string must be text")
    text = data.removeprefix(GS)  # FNC1 in first position is sometimes transmitted
    if not text:
        raise GS1Error("empty element string")
    out: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        spec = _lookup_ai(text, pos)
        pos += len(spec.ai)
        if spec.fixed:
            value = text[pos : pos + spec.length]
            pos += len(value)
            if pos < len(text) and text[pos] == GS:
                pos += 1  # a redundant separator after a fixed field is tolerated
        else:
            end = text.find(GS, pos)
            end = len(text) if end < 0 else end
            value = text[pos:end]
            pos = end + 1 if end < len(text) else end
        _check_value(spec, value)
        if spec.ai in out:
            raise GS1Error(f"AI ({spec.ai}) appears twice")
        out[spec.ai] = value
    return out


_HRI_AI_RE = re.compile(r"\((\d{2,4})\)")


def parse_hri(text: str) -> dict[str, str]:
    """Parse the human-readable form ``(01)09506000134352(10)ABC`` into AI → value.

    A value runs to the next ``(AI)`` that names a known AI, so values may hold parentheses
    unless they contain such a marker (the human form cannot say which one was meant).
    """
    if not isinstance(text, str) or not text.startswith("("):
        raise GS1Error("human-readable form must start with '('")
    marks = [m for m in _HRI_AI_RE.finditer(text) if m.group(1) in AI_TABLE]
    if not marks or marks[0].start() != 0:
        raise GS1Error("human-readable form must start with a known (AI)")
    out: dict[str, str] = {}
    for mark, nxt in zip(marks, [*marks[1:], None], strict=True):
        ai = mark.group(1)
        value = text[mark.end():nxt.start() if nxt is not None else len(text)]
        _check_value(AI_TABLE[ai], value)
        if ai in out:
            raise GS1Error(f"AI ({ai}) appears twice")
        out[ai] = value
    return out


def encode_element_string(elements: Mapping[str, str]) -> str:
    """Encode AI → value as scanners send it: GS after every variable field but the last."""
    parts: list[str] = []
    items = list(elements.items())
    if not items:
        raise GS1Error("no elements")
    for i, (ai, value) in enumerate(items):
        spec = AI_TABLE.get(ai)
        if spec is None:
            raise GS1Error(f"unknown application identifier ({ai})")
        _check_value(spec, value)
        parts.append(ai + value)
        if not spec.fixed and i < len(items) - 1:
            parts.append(GS)
    return "".join(parts)


def format_hri(elements: Mapping[str, str]) -> str:
    """Return the human-readable form ``(01)…(10)…`` of AI → value."""
    return "".join(f"({ai}){value}" for ai, value in elements.items())


def ai_decimal(ai: str, value: str) -> Decimal:
    """Return the value of a measure AI (310n, 392n, …) with its implied decimal point."""
    spec = AI_TABLE.get(ai)
    if spec is None or not spec.decimals or not (value.isascii() and value.isdigit()):
        raise GS1Error(f"AI ({ai}) is not a decimal measure")
    digits = value[3:] if ai[:3] in ("391", "393") else value  # those start with an ISO 4217 code
    return Decimal(digits).scaleb(-int(ai[3]))


# --------------------------------------------------------------------------------------------
# In-store variable-measure codes (restricted circulation prefixes 02 and 20–29)

# Price/weight verifier weighting (GS1 GenSpecs §7.9.3): 2-, 3, 5+, 5- map a digit to a
# "weighted product". "+/-" means the tens digit of the plain product is added/subtracted.
_WEIGHTED: dict[str, tuple[int, ...]] = {
    "2-": tuple((d * 2 % 10 - d * 2 // 10) % 10 for d in range(10)),
    "3": tuple(d * 3 % 10 for d in range(10)),
    "5+": tuple((d * 5 % 10 + d * 5 // 10) % 10 for d in range(10)),
    "5-": tuple((d * 5 % 10 - d * 5 // 10) % 10 for d in range(10)),
}


def price_check_digit(value: str) -> int:
    """Return the GS1 verifier digit of a 4- or 5-digit price/weight field."""
    if not value.isascii() or not value.isdigit() or len(value) not in (4, 5):
        raise GS1Error(f"price/weight field must be 4 or 5 digits: {value!r}")
    d = [int(c) for c in value]
    if len(value) == 4:
        w4 = ("2-", "2-", "3", "5-")
        return sum(_WEIGHTED[f][x] for f, x in zip(w4, d, strict=True)) * 3 % 10
    w5 = ("5+", "2-", "5-", "5+", "2-")
    target = (10 - sum(_WEIGHTED[f][x] for f, x in zip(w5, d, strict=True)) % 10) % 10
    # The verifier is the digit whose 5- weighted product equals the target (a bijection).
    return _WEIGHTED["5-"].index(target)


@dataclass(frozen=True)
class VariableMeasureRule:
    """One store's layout of an EAN-13 price- or weight-embedded label.

    Layout: ``prefix + item + [verifier] + value + check`` = 13 digits.
    """

    prefixes: tuple[str, ...]
    kind: Literal["price", "weight"]
    item_digits: int
    value_digits: int
    decimals: int
    verifier: bool = False

    def __post_init__(self) -> None:
        sizes = {len(p) for p in self.prefixes}
        if len(sizes) != 1:
            raise GS1Error("all prefixes of a rule must have the same length")
        total = sizes.pop() + self.item_digits + int(self.verifier) + self.value_digits + 1
        if total != 13:
            raise GS1Error(f"layout covers {total} digits, not 13")
        if self.verifier and self.value_digits not in (4, 5):
            raise GS1Error("a verifier digit needs a 4- or 5-digit value field")


@dataclass(frozen=True)
class VariableMeasure:
    """A decoded in-store label: which item, and the price or weight printed into it."""

    code: str  # the GTIN-13 as scanned
    item_code: str  # the code with the value (and verifier) zeroed: the catalogue lookup key
    item_ref: str
    kind: Literal["price", "weight"]
    value: Decimal


# Examples, not a standard: 02 is the UPC-A in-store layout (number system 2, 5-digit item,
# verifier, 4-digit price in cents); 20-29 follow a common European split. Stores override.
DEFAULT_VARIABLE_MEASURE_RULES: tuple[VariableMeasureRule, ...] = (
    VariableMeasureRule(("02",), "price", item_digits=5, value_digits=4, decimals=2, verifier=True),
    VariableMeasureRule(
        ("20", "21", "22", "23", "24"), "price", item_digits=5, value_digits=5, decimals=2
    ),
    VariableMeasureRule(
        ("25", "26", "27", "28", "29"), "weight", item_digits=5, value_digits=5, decimals=3
    ),
)


def is_restricted_circulation(code: str) -> bool:
    """Return True for codes in the in-store prefixes (02, 20–29) after GTIN-13 normalisation."""
    gtin13 = code.rjust(13, "0") if len(code) == 12 else code
    return len(gtin13) == 13 and (gtin13.startswith("02") or gtin13[0] == "2")


def decode_variable_measure(
    code: str, rules: Iterable[VariableMeasureRule] = DEFAULT_VARIABLE_MEASURE_RULES
) -> VariableMeasure | None:
    """Decode an in-store label with the first matching rule; None when no rule applies."""
    if len(code) == 12:  # UPC-A: the EAN-13 form has a leading 0
        code = "0" + code
    if not is_valid_gtin(code) or len(code) != 13:
        if len(code) == 13 and code.isdigit():
            raise GS1Error(f"check digit is wrong: {code}")
        return None
    for rule in rules:
        prefix = next((p for p in rule.prefixes if code.startswith(p)), None)
        if prefix is None:
            continue
        pos = len(prefix)
        item_ref = code[pos : pos + rule.item_digits]
        pos += rule.item_digits
        verifier = code[pos] if rule.verifier else None
        pos += int(rule.verifier)
        value = code[pos : pos + rule.value_digits]
        if verifier is not None and price_check_digit(value) != int(verifier):
            raise GS1Error(f"{rule.kind} verifier digit is wrong: {code}")
        body = prefix + item_ref + "0" * (int(rule.verifier) + rule.value_digits)
        return VariableMeasure(
            code=code,
            item_code=body + str(check_digit(body)),
            item_ref=item_ref,
            kind=rule.kind,
            value=Decimal(value).scaleb(-rule.decimals),
        )
    return None


def encode_variable_measure(
    rule: VariableMeasureRule, prefix: str, item_ref: str, value: Decimal
) -> str:
    """Build the EAN-13 label a scale would print for ``value`` (used by emulators and tests)."""
    if prefix not in rule.prefixes or len(item_ref) != rule.item_digits or not item_ref.isdigit():
        raise GS1Error("prefix or item reference does not fit the rule")
    raw = value.scaleb(rule.decimals)
    if raw != raw.to_integral_value() or raw < 0 or raw >= 10**rule.value_digits:
        raise GS1Error(f"{value} does not fit {rule.value_digits} digits")
    digits = str(int(raw)).rjust(rule.value_digits, "0")
    verifier = str(price_check_digit(digits)) if rule.verifier else ""
    body = prefix + item_ref + verifier + digits
    return body + str(check_digit(body))
