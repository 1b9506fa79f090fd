"""Terminal events (CONTRACT §5): parse, check every rule, derive their keys and outbox bytes.

A body goes through four gates, and the first that fails decides the error code:

1. ``invalid_json``: UTF-8, one JSON object, no duplicate keys, no NaN/Infinity, no unpaired
   surrogate, at most ``MAX_DEPTH`` levels of nesting.
2. ``card_number_not_allowed``: no string anywhere (keys included) holds what looks like a
   payment card number. Runs before validation so no later message can echo one.
3. ``validation_failed``: the pydantic models below; every error becomes one ``Problem``.
4. Accepted: ``data`` is the object exactly as parsed, ``canonical`` its sorted, compact
   encoding, so a resend with other whitespace or key order is the same content.

A resend is "the same content" when ``same_content`` says so: the outbox compares the exact
payload bytes first (its fingerprint), and on a mismatch the API asks ``same_content``, which
also takes an optional field sent as ``null`` and one left out as equal (docs/events.md: both
mean "not given"). The payload itself always keeps the body as sent (CONTRACT §6).

Other bodies a terminal posts (``POST /v1/print``) go through the same gates with
``load_json``, ``check_transaction`` and ``validation_problems``, so they answer with the same
codes.

Rules that span fields (decimals per currency, total against lines, tenders against total,
refunds naming their sale) run inside the models on the fields already found valid: they are
skipped, not guessed at, when a field they depend on has its own problem. docs/events.md is
the vendor-facing description of every rule here.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Context, Decimal, Inexact
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

from agent.currencies import MINOR_UNITS

__all__ = [
    "CARD_MESSAGE",
    "KINDS",
    "MAX_DEPTH",
    "NAMESPACE",
    "Accepted",
    "Customer",
    "Identifier",
    "InvalidEvent",
    "InventoryAdjustment",
    "Line",
    "Problem",
    "Tender",
    "Transaction",
    "check_transaction",
    "content_form",
    "dedupe_key",
    "field_error",
    "find_card_numbers",
    "idempotency_key",
    "json_type",
    "line_total",
    "load_json",
    "outbox_payload",
    "parse_adjustment",
    "parse_transaction",
    "same_content",
    "tendered",
    "terminal_mismatch",
    "text_check",
    "validation_problems",
]

KINDS = ("transaction", "inventory_adjustment")

# Fixed forever: changing it would give every sale a new idempotency key, and a cloud would
# take a resend after an upgrade for a new sale.
NAMESPACE = uuid.UUID("41d7c2b1-8315-4838-8c25-4f9883ec229e")

MAX_DEPTH = 32  # a valid event nests 3 deep; the cap keeps every later walk shallow

ID_PATTERN = r"[A-Za-z0-9._:-]{1,64}"
DECIMAL_PATTERN = r"-?[0-9]+(\.[0-9]+)?"
TRANSACTION_TYPES = ("sale", "refund", "void")
ADJUSTMENT_REASONS = (
    "received", "sold", "returned", "damaged", "lost", "counted", "transferred", "other",
)  # fmt: skip
MAX_CUSTOM_FIELDS = 50
QUANTITY_DECIMALS = 6  # weighed goods: grams of a kilogram and finer
TAX_RATE_DECIMALS = 4
MAX_DECIMAL_CHARS = 40  # bounds the arithmetic below; 18 digits each side still fit

# Stock must move the way the reason says; the other reasons go either way.
_REASON_SIGN = {"received": 1, "sold": -1, "damaged": -1, "lost": -1}

# Exact arithmetic: inputs are capped at MAX_DECIMAL_CHARS, so 200 digits never round, and
# the Inexact trap turns a broken cap into a loud error instead of a silently wrong total.
_EXACT = Context(prec=200, traps=[Inexact])
_ROUNDING = Context(prec=200, rounding=ROUND_HALF_EVEN)


# -- public results -------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One reason a body was refused: the field's dotted path ("" for the body), a code, a text."""

    field: str
    code: str
    message: str


class InvalidEvent(Exception):
    """A refused body: ``code`` for the error, ``problems`` with one entry per bad field."""

    def __init__(self, code: str, problems: list[Problem]) -> None:
        self.code = code
        self.problems = problems
        self.message = _summary(code, problems)
        super().__init__(self.message)

    def error_body(self) -> dict[str, Any]:
        """Return the CONTRACT §4 error object for a 422 answer."""
        details = [{"field": p.field, "code": p.code, "message": p.message}
                   for p in self.problems]
        return {"error": {"code": self.code, "message": self.message, "details": details}}


@dataclass(frozen=True)
class Accepted:
    """A valid event: its routing ids, the object as sent, and its canonical bytes."""

    kind: str
    terminal_id: str
    object_id: str
    data: dict[str, Any]
    canonical: bytes


# -- public functions -----------------------------------------------------------------------


def parse_transaction(body: bytes) -> Accepted:
    """Parse and check one sale, refund or void; raise InvalidEvent listing every problem."""
    return _parse(body, "transaction", Transaction, "transaction_id")


def parse_adjustment(body: bytes) -> Accepted:
    """Parse and check one inventory adjustment; raise InvalidEvent listing every problem."""
    return _parse(body, "inventory_adjustment", InventoryAdjustment, "adjustment_id")


def load_json(body: bytes) -> dict[str, Any]:
    """Run only the JSON gate: return the one object in ``body``, or raise InvalidEvent."""
    return _load(body)


def check_transaction(data: dict[str, Any]) -> Accepted:
    """Check a transaction already read by ``load_json`` (e.g. one inside a print request)."""
    return _accept(data, "transaction", Transaction, "transaction_id")


def validation_problems(err: ValidationError, *, unknown_hint: str = "put vendor-specific"
                        " data in custom_fields") -> list[Problem]:
    """Turn a model's ValidationError into Problems with this module's detail codes."""
    return [_problem(e, unknown_hint) for e in err.errors()]


def terminal_mismatch(token_terminal: str, sent: str, field: str = "terminal_id"
                      ) -> tuple[str, list[dict[str, str]]]:
    """Return the message and details of a ``403 terminal_mismatch`` (CONTRACT §4)."""
    return (f"this token belongs to terminal {token_terminal}, not {sent}",
            [{"field": field, "code": "terminal_mismatch", "message": f"must be {token_terminal}"}])


def same_content(stored: bytes, new: bytes) -> bool:
    """Tell whether two outbox payloads of one event id hold the same content.

    Equal bytes are the same content. Otherwise both are compared in their ``content_form``:
    in a valid event ``null`` can only be the value of an optional field, where it means "not
    given" just as leaving the field out does, so a till whose serializer writes
    ``"original_transaction_id": null`` one time and leaves it out the next resends the same
    sale. Any other difference (a value, a type: ``1`` vs ``1.0`` vs ``true``) still differs.
    A payload that is not JSON is never the same as another.
    """
    if stored == new:
        return True
    try:
        return content_form(stored) == content_form(new)
    except (ValueError, RecursionError):
        return False


def content_form(payload: bytes) -> bytes:
    """Return a payload's JSON value without null object members, sorted and compact."""
    value = _without_nulls(json.loads(payload))
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def idempotency_key(store_id: str, kind: str, terminal_id: str, object_id: str) -> str:
    """Return the UUIDv5 that names this event at every sink, across reinstalls."""
    _check_key_parts(store_id, kind, terminal_id, object_id, kind=kind)
    return str(uuid.uuid5(NAMESPACE, f"{store_id}/{kind}/{terminal_id}/{object_id}"))


def dedupe_key(kind: str, terminal_id: str, object_id: str) -> str:
    """Return the outbox's dedupe key: one event per (kind, terminal, id) in a store."""
    _check_key_parts(kind, terminal_id, object_id, kind=kind)
    return f"{kind}/{terminal_id}/{object_id}"


def outbox_payload(store_id: str, accepted: Accepted) -> bytes:
    """Return the bytes the outbox keeps and every sink attempt is built from."""
    head = (f'{{"store_id":{json.dumps(store_id, ensure_ascii=False)},'
            f'"kind":{json.dumps(accepted.kind)},"data":')
    return head.encode() + accepted.canonical + b"}"


def find_card_numbers(value: Any, path: str = "") -> list[str]:
    """Return the paths of every string (or key, or integer) holding a card-like number.

    A key that holds one is named by position (``custom_fields.<key 0>``), so that no path
    repeats the number; that path stands for the whole entry, key and value, and is listed
    once. Two readings are narrower, both to spare real product codes and ids: a ``sku``
    that is a GTIN with a valid GS1 check digit is exempt (see ``_is_gtin_sku``), and in the
    id fields a dash separates numbers rather than joining them.
    """
    return list(dict.fromkeys(_card_paths(value, path)))


# -- JSON gate ------------------------------------------------------------------------------


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


class _NotJsonError(ValueError):
    pass


class _LossyFloat(float):
    """A JSON number a binary double cannot hold exactly; refused where numbers are allowed."""


class _LossyInt(int):
    """A JSON integer beyond ±2**53, where most JSON readers start rounding; refused too."""


_SURROGATE = re.compile("[\ud800-\udfff]")


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # JSON readers disagree on which duplicate wins: refuse
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(key)
            seen.add(key)
    return obj


def _parse_float(text: str) -> float:
    value = float(text)
    # "1.10" and 1.1 are the same number; "0.30000000000000000001" is not 0.3.
    if math.isfinite(value) and Decimal(repr(value)) == Decimal(text):
        return value
    return _LossyFloat(value)


def _parse_int(text: str) -> int:
    value = int(text)
    return value if abs(value) <= 2**53 else _LossyInt(value)


def _parse_constant(name: str) -> Any:
    raise _NotJsonError(f"{name} is not a JSON value")


def _load(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _json_problem("not_utf8", f"the body is not UTF-8 (byte {err.start})") from err
    try:
        data = json.loads(text, object_pairs_hook=_object_pairs, parse_float=_parse_float,
                          parse_int=_parse_int, parse_constant=_parse_constant)
    except json.JSONDecodeError as err:
        raise _json_problem("syntax_error", f"not valid JSON: {err.msg} at line {err.lineno}"
                            f" column {err.colno}") from err
    except _DuplicateKeyError as err:
        raise _json_problem("duplicate_key", f"the key {_show_key(err.key)} appears twice in"
                            " one object; send each field once") from err
    except _NotJsonError as err:
        raise _json_problem("syntax_error", f"not valid JSON: {err}") from err
    except ValueError as err:  # an integer longer than Python's 4300-digit conversion limit
        raise _json_problem("number_too_long", "a number in the body has too many digits") from err
    except RecursionError as err:
        raise _json_problem("too_deep", f"nested deeper than {MAX_DEPTH} levels") from err
    if not isinstance(data, dict):
        raise _json_problem("not_an_object",
                            f"the body must be a JSON object, not {_json_type(data)}")
    # Surrogates can only arrive as \u escapes (raw ones fail UTF-8 decoding above), so the
    # strings of a body without one need no look; the depth walk runs either way.
    _check_shape(data, surrogates="\\u" in text)
    return data


def _check_shape(data: dict[str, Any], *, surrogates: bool = True) -> None:
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_DEPTH:
                raise _json_problem("too_deep", f"nested deeper than {MAX_DEPTH} levels")
            for key, item in value.items():
                if surrogates:
                    _check_text(key)
                if isinstance(item, dict | list) or (surrogates and isinstance(item, str)):
                    stack.append((item, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise _json_problem("too_deep", f"nested deeper than {MAX_DEPTH} levels")
            stack.extend((item, depth + 1) for item in value
                         if isinstance(item, dict | list) or (surrogates and isinstance(item, str)))
        elif isinstance(value, str):
            _check_text(value)


def _check_text(text: str) -> None:
    # "\ud800" is valid JSON syntax but no Unicode text: it cannot be stored as UTF-8.
    if _SURROGATE.search(text):
        raise _json_problem("unpaired_surrogate",
                            "a string holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)")


def _json_problem(code: str, message: str) -> InvalidEvent:
    return InvalidEvent("invalid_json", [Problem("", code, message)])


# -- card gate ------------------------------------------------------------------------------

# Digit groups joined by spaces, tabs or any dash; "4111 1111-1111 1111" is one number.
_DIGIT_RUN = re.compile("[0-9]+(?:[\\s\\-\u2010-\u2015\u2212]+[0-9]+)*")
# In ids a dash is structure, not spacing: "T01-20261122-000122" holds two numbers, not the
# 14-digit 20261122000122, which passes the Luhn check (as one sequence number in ten does).
_ID_DIGIT_RUN = re.compile("[0-9]+(?:\\s+[0-9]+)*")
_ID_PATHS = frozenset({"transaction_id", "terminal_id", "original_transaction_id",
                       "adjustment_id"})
_GROUP = re.compile("[0-9]+")
_SKU_PATH = re.compile(r"(lines\[[0-9]+\]\.)?sku")
CARD_MESSAGE = ("holds what looks like a payment card number (13 to 19 digits that pass the"
                " Luhn check); the agent never stores card numbers: remove it or mask all but"
                " the last four digits")


def _card_paths(value: Any, path: str) -> Iterator[str]:
    # Iterative, so a deeply nested value cannot exhaust the stack. A path is spelled out
    # only for containers and for scalars long enough to hold 13 digits: building every
    # leaf's path cost more than the Luhn scan itself on an ordinary sale.
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        here, item = stack.pop()
        if isinstance(item, dict):
            children = []
            for index, (key, child) in enumerate(item.items()):
                if _holds_card(key):
                    name = f"<key {index}>"
                    yield _join(here, name)
                    children.append((_join(here, name), child))
                elif _may_hold_card(child):
                    children.append((_join(here, key), child))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(reversed([(f"{here}[{i}]", c) for i, c in enumerate(item)
                                   if _may_hold_card(c)]))
        elif _scalar_holds_card(item, _ID_DIGIT_RUN if here in _ID_PATHS else _DIGIT_RUN):
            if not (_SKU_PATH.fullmatch(here) and _is_gtin_sku(item)):
                yield here


def _may_hold_card(value: Any) -> bool:
    """Whether ``value`` needs a closer look: a container, or a scalar of 13+ characters."""
    if isinstance(value, str):
        return len(value) >= 13
    if isinstance(value, (dict, list)):
        return True
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, int):
        return not -10**12 < value < 10**12
    return isinstance(value, float)  # repr decides; rare enough to check in full


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _scalar_holds_card(value: Any, runs: re.Pattern[str]) -> bool:
    if isinstance(value, str):
        return _holds_card(value, runs)
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return _holds_card(str(int(value)))
    if isinstance(value, float) and math.isfinite(value):
        return _holds_card(repr(float(value)))
    return False


def _holds_card(text: str, runs: re.Pattern[str] = _DIGIT_RUN) -> bool:
    """Tell whether ``text`` holds a 13-19 digit Luhn-valid number, separators ignored.

    Digit groups joined by spaces or dashes are read as one number. Stretches of such a run
    are tried too, so a card standing next to another number ("4111 1111 1111 1111 12/27")
    is found; a stretch must begin and end at the run's ends or at a group of 3 or more
    digits, as card groups are, which also keeps the scan linear on junk like "1 1 1 1 ...".
    """
    if len(text) < 13:
        return False  # 13 digits need 13 characters: most keys and values stop here
    for run in runs.finditer(text):
        if len(run.group()) >= 13 and _run_holds_card(_GROUP.findall(run.group())):
            return True
    return False


def _run_holds_card(groups: list[str]) -> bool:
    digits = "".join(groups)
    # plain[i] / swapped[i]: the Luhn sum of digits[:i] if even / odd indexes stay undoubled;
    # the sum of any stretch is then a difference of two entries.
    plain, swapped = [0], [0]
    for index, char in enumerate(digits):
        value = ord(char) - 48
        even, odd = (value, _DOUBLED[value]) if index % 2 == 0 else (_DOUBLED[value], value)
        plain.append(plain[-1] + even)
        swapped.append(swapped[-1] + odd)
    bounds = [0]
    for group in groups:
        bounds.append(bounds[-1] + len(group))
    last = len(groups)
    for first in range(last):
        if first and len(groups[first]) < 3:
            continue
        start = bounds[first]
        stop = bisect_left(bounds, start + 13, first + 1)
        while stop <= last and bounds[stop] - start <= 19:
            end = bounds[stop]
            if stop == last or len(groups[stop - 1]) >= 3:
                sums = plain if (end - 1) % 2 == 0 else swapped
                if (sums[end] - sums[start]) % 10 == 0 and _issued_range(digits[start:end]):
                    return True
            stop += 1
    return False


_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)  # Luhn: a doubled digit, its two digits summed


def _issued_range(number: str) -> bool:
    """Tell whether ``number`` starts like a payment card (ISO/IEC 7812 issuer ranges).

    Payment networks issue from major industry identifiers 3-6 (Amex, Diners, JCB, Visa,
    Mastercard, Maestro, Discover, UnionPay), Mastercard's 2221-2720 and UATP's 15-digit
    1-range. Dates and sequence numbers ("20261122000006", "0120261122000123") pass the
    Luhn check one time in ten but start outside them; without this, a receipt number in a
    custom field would be refused one time in five.
    """
    first = number[0]
    if first in "3456":
        return True
    if first == "2":
        return 2221 <= int(number[:4]) <= 2720
    return first == "1" and len(number) == 15


def _is_gtin_sku(value: Any) -> bool:
    """Tell whether a sku is a GS1 product code (GTIN-13 or GTIN-14) with a valid check digit.

    About one product barcode in ten also passes the Luhn check (Coca-Cola's 5449000000996
    does); refusing those would make them unsellable. Card numbers of 15 to 19 digits are
    never exempt, and the exemption holds only in ``sku`` fields.
    """
    if not (isinstance(value, str) and value.isascii() and value.isdigit()):
        return False
    if len(value) not in (13, 14):
        return False
    weights = (3, 1) * 7
    total = sum(int(d) * w for d, w in zip(reversed(value[:-1]), weights, strict=False))
    return (10 - total % 10) % 10 == int(value[-1])


def _card_problems(data: dict[str, Any]) -> list[Problem]:
    return [Problem(path, "card_number", CARD_MESSAGE) for path in find_card_numbers(data)]


# -- field types ----------------------------------------------------------------------------


def _error(code: str, message: str) -> PydanticCustomError:
    # The text goes in through the context, so braces in a sent value are never a template.
    return PydanticCustomError(code, "{detail}", {"detail": message})


def field_error(code: str, message: str) -> PydanticCustomError:
    """Return the error a field validator raises: ``code`` becomes the detail's code."""
    return _error(code, message)


def json_type(value: Any) -> str:
    """Name a JSON value's type for a message ("null", "a string", "the number 5" …)."""
    return _json_type(value)


def text_check(max_chars: int, *, lines: bool = False) -> Callable[[Any], str]:
    """Return the check of a text field: a string, at most ``max_chars``, no control characters."""
    return _text(max_chars, lines=lines)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {_show_number(value)}"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _show_number(value: float) -> str:
    text = str(int(value)) if isinstance(value, int) else repr(float(value))
    return text if len(text) <= 24 else text[:21] + "..."


def _show(value: str) -> str:
    """Quote a sent string for a message, cut short: bodies can be 256 KiB."""
    shown = value if len(value) <= 40 else value[:37] + "..."
    quoted = json.dumps(shown, ensure_ascii=False)
    # Only a duplicate key is shown before the surrogate check; escape it then.
    return json.dumps(shown) if _SURROGATE.search(quoted) else quoted


def _show_key(key: str) -> str:
    return "(a key that looks like a card number)" if _holds_card(key) else _show(key)


def _string(value: Any, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise _error("wrong_type", f"must be {what}, not {_json_type(value)}")
    return value


_ID = re.compile(ID_PATTERN)
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # keeps \t \n \r


def _identifier(value: Any) -> str:
    text = _string(value)
    if len(text) > 64:
        raise _error("too_long", f"{_show(text)} is {len(text)} characters; ids have at most 64")
    if not _ID.fullmatch(text):
        raise _error("invalid_format", f"{_show(text)} is not an id: use 1 to 64 of A-Z a-z"
                     " 0-9 . _ : -")
    return text


def _text(max_chars: int, *, lines: bool = False, required: bool = False
          ) -> Callable[[Any], str]:
    control = _CONTROL_BUT_LINES if lines else _CONTROL

    def check(value: Any) -> str:
        text = _string(value)
        if len(text) > max_chars:
            raise _error("too_long", f"is {len(text)} characters; at most {max_chars}")
        if required and not text.strip():
            raise _error("invalid_format", "must not be empty or blank")
        found = control.search(text)
        if found:  # receipts are printed: an ESC in a name would be a printer command
            raise _error("invalid_format", f"contains the control character"
                         f" U+{ord(found.group()):04X}")
        return text

    return check


_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")


def _email(value: Any) -> str:
    text = _text(254)(value)
    if not _EMAIL.fullmatch(text):
        raise _error("invalid_format", f"{_show(text)} is not an email address")
    return text


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _string(value)
        if text not in options:
            raise _error("invalid_choice", f"{_show(text)} is not one of {', '.join(options)}")
        return text

    return check


_DECIMAL = re.compile(DECIMAL_PATTERN)


def _decimal(value: Any) -> Decimal:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise _error("wrong_type", f"must be a decimal string, not a number: send"
                     f" \"{_show_number(value)}\" in quotes")
    text = _string(value, "a decimal string")
    if len(text) > MAX_DECIMAL_CHARS:
        raise _error("too_long", f"is {len(text)} characters; at most {MAX_DECIMAL_CHARS}")
    if not _DECIMAL.fullmatch(text):
        raise _error("invalid_format", f"{_show(text)} is not a decimal string such as"
                     " \"12.50\" or \"-3\" (no exponent, spaces, + or thousands separators)")
    return Decimal(text)


def _decimals(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _currency_context(info: ValidationInfo) -> tuple[str | None, int | None]:
    context = info.context or {}
    return context.get("currency"), context.get("minor_units")


def _money(value: Any, info: ValidationInfo) -> Decimal:
    amount = _decimal(value)
    currency, minor = _currency_context(info)
    if minor is not None and _decimals(amount) > minor:
        allowed = f"allows {minor}" if minor else "has no decimals"
        raise _error("too_many_decimals", f"{_show(value)} has {_decimals(amount)} decimals;"
                     f" {currency} {allowed}")
    return amount


def _unsigned_money(value: Any, info: ValidationInfo) -> Decimal:
    amount = _money(value, info)
    if amount < 0:
        raise _error("negative_not_allowed", f"{_show(value)} is negative; amounts are"
                     " positive and the transaction type says which way money moved")
    return amount


def _quantity(value: Any) -> Decimal:
    amount = _decimal(value)
    if _decimals(amount) > QUANTITY_DECIMALS:
        raise _error("too_many_decimals", f"{_show(value)} has {_decimals(amount)} decimals;"
                     f" at most {QUANTITY_DECIMALS}")
    if amount == 0:
        raise _error("zero_not_allowed", f"{_show(value)} is zero; leave out what changes nothing")
    return amount


def _tax_rate(value: Any) -> Decimal:
    rate = _decimal(value)
    if _decimals(rate) > TAX_RATE_DECIMALS:
        raise _error("too_many_decimals", f"{_show(value)} has {_decimals(rate)} decimals;"
                     f" at most {TAX_RATE_DECIMALS}")
    if not 0 <= rate <= 100:
        raise _error("out_of_range", f"{_show(value)} is not a percentage from 0 to 100")
    return rate


def _currency(value: Any) -> str:
    code = _string(value)
    if code in MINOR_UNITS:
        return code
    hint = f": use {code.upper()}" if code.upper() in MINOR_UNITS else ""
    raise _error("unknown_currency", f"{_show(code)} is not an active ISO 4217 currency"
                 f" code{hint}")


_TIMESTAMP = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                        r"(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})?")


def _timestamp(value: Any) -> datetime:
    text = _string(value)
    match = _TIMESTAMP.fullmatch(text)
    if not match:
        raise _error("invalid_format", f"{_show(text)} is not an RFC 3339 date-time such as"
                     " 2026-11-22T10:15:00+01:00")
    if not match[8]:
        raise _error("missing_offset", f"{_show(text)} has no UTC offset: add Z or +01:00"
                     " (the till's offset when the sale happened)")
    try:
        year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
        return datetime(year, month, day, hour, minute, second, tzinfo=_offset(match[8]))
    except ValueError as err:
        raise _error("invalid_format", f"{_show(text)} is not a real date and time") from err


def _offset(text: str) -> timezone:
    if text in ("Z", "z"):
        return UTC
    hours, minutes = int(text[1:3]), int(text[4:6])
    if hours > 23 or minutes > 59:
        raise ValueError(text)
    sign = -1 if text[0] == "-" else 1
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _custom_key(value: Any) -> str:
    key = _text(64)(value)
    if not key:
        raise _error("invalid_format", "a custom field name must not be empty")
    return key


def _custom_value(value: Any) -> str | int | float | bool:
    if isinstance(value, _LossyFloat | _LossyInt):
        raise _error("lossy_number", f"the number {_show_number(value)} cannot be held"
                     " exactly by most JSON readers; send it as a string")
    if isinstance(value, str):
        return _text(1000, lines=True)(value)
    if isinstance(value, bool | int | float):
        return value
    raise _error("wrong_type", f"must be a string, number or boolean, not {_json_type(value)}")


def _at_most_fifty(value: Any) -> Any:
    if isinstance(value, dict) and len(value) > MAX_CUSTOM_FIELDS:
        raise _error("too_many", f"has {len(value)} keys; at most {MAX_CUSTOM_FIELDS}")
    return value


def _string_schema(**schema: Any) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", **schema})


_DECIMAL_SCHEMA = _string_schema(pattern=f"^{DECIMAL_PATTERN}$",
                                 description="decimal string, never a JSON number")
Identifier = Annotated[str, PlainValidator(_identifier),
                       _string_schema(pattern=f"^{ID_PATTERN}$")]
Sku = Annotated[str, PlainValidator(_text(64, required=True)),
                _string_schema(minLength=1, maxLength=64)]
Money = Annotated[Decimal, PlainValidator(_money), _DECIMAL_SCHEMA]
UnsignedMoney = Annotated[Decimal, PlainValidator(_unsigned_money), _DECIMAL_SCHEMA]
Quantity = Annotated[Decimal, PlainValidator(_quantity), _DECIMAL_SCHEMA]
TaxRate = Annotated[Decimal, PlainValidator(_tax_rate), _DECIMAL_SCHEMA]
Currency = Annotated[str, PlainValidator(_currency), _string_schema(enum=sorted(MINOR_UNITS))]
Timestamp = Annotated[datetime, PlainValidator(_timestamp), _string_schema(format="date-time")]
CustomFields = Annotated[
    dict[
        Annotated[str, PlainValidator(_custom_key), _string_schema(maxLength=64)],
        Annotated[Any, PlainValidator(_custom_value),
                  WithJsonSchema({"type": ["string", "number", "boolean"]})],
    ],
    BeforeValidator(_at_most_fifty),
    WithJsonSchema({"type": "object", "maxProperties": MAX_CUSTOM_FIELDS,
                    "additionalProperties": {"type": ["string", "number", "boolean"]}}),
]


Text64 = Annotated[str, PlainValidator(_text(64)), _string_schema(maxLength=64)]
Text200 = Annotated[str, PlainValidator(_text(200)), _string_schema(maxLength=200)]
Phone = Annotated[str, PlainValidator(_text(32)), _string_schema(maxLength=32)]
Note = Annotated[str, PlainValidator(_text(500, lines=True)), _string_schema(maxLength=500)]
Email = Annotated[str, PlainValidator(_email), _string_schema(format="email", maxLength=254)]


# -- models ---------------------------------------------------------------------------------


class _Event(BaseModel):
    # Unknown fields are refused: a misspelt "discont" must not pass as "no discount".
    model_config = ConfigDict(extra="forbid")


class Line(_Event):
    """One line of a transaction: quantity × unit_price − discount."""

    sku: Sku
    description: Text200 | None = None
    quantity: Quantity
    unit_price: UnsignedMoney
    discount: Money | None = None
    tax_rate: TaxRate | None = None

    @field_validator("discount")
    @classmethod
    def _discount_follows_quantity(cls, discount: Decimal | None, info: ValidationInfo
                                   ) -> Decimal | None:
        quantity = info.data.get("quantity")
        if discount and quantity is not None and (discount < 0) != (quantity < 0):
            raise _error("wrong_sign", f"discount {discount} must have the sign of quantity"
                         f" {quantity}: it is the amount taken off this line")
        return discount


class Tender(_Event):
    """One payment: amount handed over, change given back."""

    method: Identifier
    amount: UnsignedMoney
    change: UnsignedMoney | None = None
    reference: Text64 | None = None


class Customer(_Event):
    """Who bought, when the till knows; every field optional."""

    id: Text64 | None = None
    email: Email | None = None
    name: Text200 | None = None
    phone: Phone | None = None


class Transaction(_Event):
    """A sale, refund or void (CONTRACT §5). Field order matters: later checks read earlier."""

    transaction_id: Identifier
    terminal_id: Identifier
    type: Annotated[str, PlainValidator(_choice(TRANSACTION_TYPES)),
                    _string_schema(enum=list(TRANSACTION_TYPES))]
    original_transaction_id: Identifier | None = Field(default=None, validate_default=True)
    occurred_at: Timestamp
    currency: Currency
    lines: list[Line] = Field(min_length=1)
    total: UnsignedMoney
    tenders: list[Tender]
    customer: Customer | None = None
    custom_fields: CustomFields | None = None

    @field_validator("original_transaction_id")
    @classmethod
    def _original_matches_type(cls, original: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("type")
        if kind in ("refund", "void") and original is None:
            raise _error("required", f"a {kind} must name the transaction it reverses in"
                         " original_transaction_id")
        if kind == "sale" and original is not None:
            raise _error("not_allowed", "a sale has no original_transaction_id: send null or"
                         " leave it out")
        return original

    @field_validator("total")
    @classmethod
    def _total_matches_lines(cls, total: Decimal, info: ValidationInfo) -> Decimal:
        lines: list[Line] | None = info.data.get("lines")
        currency, minor = _currency_context(info)
        if lines is None or minor is None:
            return total
        expected = line_total(lines, minor)
        if total != expected:
            raise _error("total_mismatch", f"total {total} does not match the lines: the sum of"
                         f" quantity × unit_price − discount is {expected} {currency} (rounded"
                         f" half-even to {minor} decimals)")
        return total

    @field_validator("tenders")
    @classmethod
    def _tenders_pay_total(cls, tenders: list[Tender], info: ValidationInfo) -> list[Tender]:
        total: Decimal | None = info.data.get("total")
        if total is None:
            return tenders
        paid = tendered(tenders)
        if paid != total:
            raise _error("tender_mismatch", f"the tenders come to {paid} (amount − change) but"
                         f" total is {total}")
        return tenders


class InventoryAdjustment(_Event):
    """A stock change for one sku: positive adds stock, negative removes it."""

    adjustment_id: Identifier
    terminal_id: Identifier
    sku: Sku
    reason: Annotated[str, PlainValidator(_choice(ADJUSTMENT_REASONS)),
                      _string_schema(enum=list(ADJUSTMENT_REASONS))]
    delta: Quantity
    occurred_at: Timestamp
    note: Note | None = None
    custom_fields: CustomFields | None = None

    @field_validator("delta")
    @classmethod
    def _delta_follows_reason(cls, delta: Decimal, info: ValidationInfo) -> Decimal:
        reason = info.data.get("reason")
        sign = _REASON_SIGN.get(reason or "")
        if sign is not None and (delta > 0) != (sign > 0):
            direction = "positive" if sign > 0 else "negative"
            raise _error("wrong_sign", f"delta {delta} must be {direction} for reason {reason}")
        return delta


def line_total(lines: list[Line], minor_units: int) -> Decimal:
    """Return Σ quantity × unit_price − discount, rounded half-even once, on the sum."""
    exact = Decimal(0)
    for line in lines:
        amount = _EXACT.multiply(line.quantity, line.unit_price)
        exact = _EXACT.add(exact, _EXACT.subtract(amount, line.discount or Decimal(0)))
    return exact.quantize(Decimal(1).scaleb(-minor_units), context=_ROUNDING)


def tendered(tenders: list[Tender]) -> Decimal:
    """Return Σ amount − change over the tenders."""
    paid = Decimal(0)
    for tender in tenders:
        paid = _EXACT.add(paid, _EXACT.subtract(tender.amount, tender.change or Decimal(0)))
    return paid


# -- validation gate ------------------------------------------------------------------------


def _parse(body: bytes, kind: str, model: type[_Event], id_field: str) -> Accepted:
    return _accept(_load(body), kind, model, id_field)


def _accept(data: dict[str, Any], kind: str, model: type[_Event], id_field: str) -> Accepted:
    cards = _card_problems(data)
    if cards:
        raise InvalidEvent("card_number_not_allowed", cards)
    try:
        model.model_validate(data, context=_validation_context(data))
    except ValidationError as err:
        raise InvalidEvent("validation_failed", validation_problems(err)) from err
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=False).encode()
    return Accepted(kind=kind, terminal_id=data["terminal_id"], object_id=data[id_field],
                    data=data, canonical=canonical)


def _validation_context(data: dict[str, Any]) -> dict[str, Any]:
    # Amounts are checked against the currency; pydantic validates fields one by one, so the
    # currency is read here first (and checked again as a field in its own right).
    code = data.get("currency")
    minor = MINOR_UNITS.get(code) if isinstance(code, str) else None
    return {"currency": code, "minor_units": minor}


_EXPECTED = {"model_type": "an object", "model_attributes_type": "an object",
             "dict_type": "an object", "list_type": "an array"}


def _problem(error: Any, unknown_hint: str = "put vendor-specific data in custom_fields"
             ) -> Problem:
    loc = tuple(error["loc"])
    if len(loc) >= 2 and loc[-1] == "[key]":  # a bad custom field name: report the name
        loc = loc[:-1]
    field = _path(loc)
    kind = error["type"]
    if kind == "missing":
        return Problem(field, "required", "is required")
    if kind == "extra_forbidden":
        return Problem(field, "unknown_field", f"{_show(str(loc[-1]))} is not a field here;"
                       f" {unknown_hint}")
    if kind in _EXPECTED:
        return Problem(field, "wrong_type",
                       f"must be {_EXPECTED[kind]}, not {_json_type(error.get('input'))}")
    if kind == "too_short":
        return Problem(field, "empty", "must not be empty")
    detail = (error.get("ctx") or {}).get("detail")
    return Problem(field, kind, detail if isinstance(detail, str) else error["msg"])


def _path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
    return path


def _summary(code: str, problems: list[Problem]) -> str:
    if code == "card_number_not_allowed":
        return (f"{len(problems)} field(s) hold what looks like a payment card number; the"
                " agent never stores card numbers")
    shown = "; ".join(f"{p.field or 'body'}: {p.message}" for p in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"{shown}{more}"


def _check_key_parts(*parts: str, kind: str | None = None) -> None:
    # "/" joins the parts: one inside a part would make two different events share a key.
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown event kind {kind!r}; known: {', '.join(KINDS)}")
    for part in parts:
        if not part or "/" in part:
            raise ValueError(f"key part {part!r} must be non-empty and free of '/'")
