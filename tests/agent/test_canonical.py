"""Terminal events (CONTRACT §5, docs/events.md): what is accepted, what is refused, and why.

Every test goes through the public entry points (``parse_transaction``, ``parse_adjustment``)
with real JSON bytes and asserts the outcome: the accepted data and canonical bytes, or the
exact list of (field, code) problems. Hypothesis drives the card rule, the rounding rule and
the fuzzing.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from agent.canonical import (
    NAMESPACE,
    Accepted,
    InvalidEvent,
    InventoryAdjustment,
    Transaction,
    dedupe_key,
    find_card_numbers,
    idempotency_key,
    outbox_payload,
    parse_adjustment,
    parse_transaction,
    same_content,
)
from agent.currencies import MINOR_UNITS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "events.md"

EXAMPLE: dict[str, Any] = {  # CONTRACT §5, verbatim
    "transaction_id": "T01-20261122-000123",
    "terminal_id": "T01",
    "type": "sale",
    "occurred_at": "2026-11-22T10:15:00+01:00",
    "currency": "EUR",
    "lines": [
        {"sku": "4006381333931", "description": "Ballpoint pen", "quantity": "2",
         "unit_price": "1.99", "discount": "0.00", "tax_rate": "19"},
    ],
    "tenders": [{"method": "cash", "amount": "5.00", "change": "1.02"}],
    "total": "3.98",
    "customer": {"id": "C-778", "email": "a@example.com"},
    "original_transaction_id": None,
    "custom_fields": {"gift_message": "Happy birthday"},
}

ADJUSTMENT: dict[str, Any] = {
    "adjustment_id": "T01-ADJ-000042",
    "terminal_id": "T01",
    "sku": "5449000000996",
    "reason": "damaged",
    "delta": "-2",
    "occurred_at": "2026-11-22T18:40:00+01:00",
    "note": "Crate dropped",
}

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


_DROP = object()  # as a change: leave the field out


def sale(**changes: Any) -> dict[str, Any]:
    """The contract example with top-level fields replaced or dropped."""
    body = copy.deepcopy(EXAMPLE)
    for key, value in changes.items():
        if value is _DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def refusal(body: Any, parse: Any = parse_transaction) -> InvalidEvent:
    raw = body if isinstance(body, bytes) else encode(body)
    with pytest.raises(InvalidEvent) as caught:
        parse(raw)
    return caught.value


def problems(body: Any, parse: Any = parse_transaction) -> list[tuple[str, str]]:
    err = refusal(body, parse)
    return [(p.field, p.code) for p in err.problems]


# -- accepted events ------------------------------------------------------------------------


def test_the_contract_example_is_accepted_and_its_data_round_trips_exactly():
    accepted = parse_transaction(encode(EXAMPLE))
    assert accepted == Accepted(kind="transaction", terminal_id="T01",
                                object_id="T01-20261122-000123", data=EXAMPLE,
                                canonical=accepted.canonical)
    assert json.loads(accepted.canonical) == EXAMPLE
    assert accepted.canonical == json.dumps(EXAMPLE, sort_keys=True, separators=(",", ":"),
                                            ensure_ascii=False).encode()


def test_every_example_in_the_vendor_docs_is_accepted():
    blocks = re.findall(r"```json\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    events = [json.loads(b) for b in blocks if "error" not in json.loads(b)]
    kinds = []
    for event in events:
        parse = parse_transaction if "transaction_id" in event else parse_adjustment
        accepted = parse(encode(event))
        assert accepted.data == event
        kinds.append(event.get("type", "adjustment"))
    assert sorted(kinds) == ["adjustment", "refund", "sale", "void"]


def test_an_inventory_adjustment_is_accepted_with_its_ids():
    accepted = parse_adjustment(encode(ADJUSTMENT))
    assert (accepted.kind, accepted.terminal_id, accepted.object_id) == (
        "inventory_adjustment", "T01", "T01-ADJ-000042")
    assert json.loads(accepted.canonical) == ADJUSTMENT


def test_non_ascii_text_is_kept_as_sent_and_encoded_as_utf8():
    body = sale(customer={"name": "Zoë Ångström 山田", "phone": "+49 30 1234567"},
                custom_fields={"emoji": "🎁", "gift\u00a0message": "Für dich"})
    accepted = parse_transaction(encode(body))
    assert accepted.data == body
    assert "Zoë Ångström 山田".encode() in accepted.canonical


@st.composite
def reshuffled(draw: st.DrawFn, value: Any) -> Any:
    """The same JSON value with every object's keys in a drawn order."""
    if isinstance(value, dict):
        keys = draw(st.permutations(list(value)))
        return {k: draw(reshuffled(value[k])) for k in keys}
    if isinstance(value, list):
        return [draw(reshuffled(v)) for v in value]
    return value


@SETTINGS
@given(shuffled=reshuffled(EXAMPLE),
       separators=st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", " :\t")]),
       indent=st.sampled_from([None, 0, 2, "\t"]))
def test_reordered_and_respaced_bodies_have_the_same_canonical_bytes(
        shuffled: dict[str, Any], separators: tuple[str, str], indent: Any):
    body = json.dumps(shuffled, separators=separators, indent=indent).encode()
    assert parse_transaction(body).canonical == parse_transaction(encode(EXAMPLE)).canonical


@pytest.mark.parametrize("change", [
    {"customer": {"id": "C-779", "email": "a@example.com"}},
    {"custom_fields": {"gift_message": "Happy birthday!"}},
    {"occurred_at": "2026-11-22T09:15:00Z"},  # the same instant, written differently
    {"original_transaction_id": _DROP},  # null and absent mean the same, but differ as sent
])
def test_changed_content_gives_other_canonical_bytes(change: dict[str, Any]):
    assert (parse_transaction(encode(sale(**change))).canonical
            != parse_transaction(encode(EXAMPLE)).canonical)


# -- one rule broken at a time --------------------------------------------------------------


def line(**changes: Any) -> list[dict[str, Any]]:
    """The example's lines with the first line's fields replaced or dropped."""
    first = {**EXAMPLE["lines"][0], **changes}
    return [{k: v for k, v in first.items() if v is not _DROP}]


def tender(**changes: Any) -> list[dict[str, Any]]:
    return [{**EXAMPLE["tenders"][0], **changes}]


SINGLE_VIOLATIONS: list[tuple[str, dict[str, Any], str, str]] = [
    ("missing id", {"transaction_id": _DROP}, "transaction_id", "required"),
    ("empty id", {"transaction_id": ""}, "transaction_id", "invalid_format"),
    ("slash in id", {"transaction_id": "T01/1"}, "transaction_id", "invalid_format"),
    ("space in id", {"terminal_id": "T 01"}, "terminal_id", "invalid_format"),
    ("65-char id", {"transaction_id": "x" * 65}, "transaction_id", "too_long"),
    ("numeric terminal", {"terminal_id": 1}, "terminal_id", "wrong_type"),
    ("unknown type", {"type": "return"}, "type", "invalid_choice"),
    ("refund without original", {"type": "refund"}, "original_transaction_id", "required"),
    ("void without original", {"type": "void"}, "original_transaction_id", "required"),
    ("sale with original", {"original_transaction_id": "T01-1"}, "original_transaction_id",
     "not_allowed"),
    ("bad original id", {"type": "refund", "original_transaction_id": "a b"},
     "original_transaction_id", "invalid_format"),
    ("naive time", {"occurred_at": "2026-11-22T10:15:00"}, "occurred_at", "missing_offset"),
    ("date only", {"occurred_at": "2026-11-22"}, "occurred_at", "invalid_format"),
    ("month 13", {"occurred_at": "2026-13-22T10:15:00Z"}, "occurred_at", "invalid_format"),
    ("offset 24h", {"occurred_at": "2026-11-22T10:15:00+24:00"}, "occurred_at",
     "invalid_format"),
    ("epoch number", {"occurred_at": 1795000000}, "occurred_at", "wrong_type"),
    ("unknown currency", {"currency": "EURO"}, "currency", "unknown_currency"),
    ("lower-case currency", {"currency": "eur"}, "currency", "unknown_currency"),
    ("withdrawn currency", {"currency": "HRK"}, "currency", "unknown_currency"),
    ("no lines", {"lines": []}, "lines", "empty"),
    ("lines not a list", {"lines": {"sku": "1"}}, "lines", "wrong_type"),
    ("line not an object", {"lines": ["pen"]}, "lines[0]", "wrong_type"),
    ("price as number", {"lines": line(unit_price=1.99)}, "lines[0].unit_price", "wrong_type"),
    ("price with comma", {"lines": line(unit_price="1,99")}, "lines[0].unit_price",
     "invalid_format"),
    ("price with exponent", {"lines": line(unit_price="199e-2")}, "lines[0].unit_price",
     "invalid_format"),
    ("price with space", {"lines": line(unit_price=" 1.99")}, "lines[0].unit_price",
     "invalid_format"),
    ("price with plus", {"lines": line(unit_price="+1.99")}, "lines[0].unit_price",
     "invalid_format"),
    ("price 3 decimals", {"lines": line(unit_price="1.990")}, "lines[0].unit_price",
     "too_many_decimals"),
    ("negative price", {"lines": line(unit_price="-1.99")}, "lines[0].unit_price",
     "negative_not_allowed"),
    ("price 41 chars", {"lines": line(unit_price="1" * 41)}, "lines[0].unit_price",
     "too_long"),
    ("missing price", {"lines": line(unit_price=_DROP)}, "lines[0].unit_price", "required"),
    ("zero quantity", {"lines": line(quantity="0.000")}, "lines[0].quantity",
     "zero_not_allowed"),
    ("7-decimal quantity", {"lines": line(quantity="2.0000001")}, "lines[0].quantity",
     "too_many_decimals"),
    ("quantity as number", {"lines": line(quantity=2)}, "lines[0].quantity", "wrong_type"),
    ("discount against quantity", {"lines": line(discount="-0.10")}, "lines[0].discount",
     "wrong_sign"),
    ("discount 3 decimals", {"lines": line(discount="0.001")}, "lines[0].discount",
     "too_many_decimals"),
    ("tax rate over 100", {"lines": line(tax_rate="101")}, "lines[0].tax_rate",
     "out_of_range"),
    ("blank sku", {"lines": line(sku="  ")}, "lines[0].sku", "invalid_format"),
    ("65-char sku", {"lines": line(sku="S" * 65)}, "lines[0].sku", "too_long"),
    ("ESC in description", {"lines": line(description="Pen\x1b@")}, "lines[0].description",
     "invalid_format"),
    ("unknown line field", {"lines": line(colour="red")}, "lines[0].colour", "unknown_field"),
    ("unknown top field", {"colour": "red"}, "colour", "unknown_field"),
    ("total off by a cent", {"total": "3.97", "tenders": tender(change="1.03")}, "total",
     "total_mismatch"),
    ("total as number", {"total": 3.98}, "total", "wrong_type"),
    ("total 3 decimals", {"total": "3.980"}, "total", "too_many_decimals"),
    ("tenders short", {"tenders": tender(change="1.03")}, "tenders", "tender_mismatch"),
    ("no tenders for a total", {"tenders": []}, "tenders", "tender_mismatch"),
    ("missing tenders", {"tenders": _DROP}, "tenders", "required"),
    ("negative change", {"tenders": tender(change="-1.02")}, "tenders[0].change",
     "negative_not_allowed"),
    ("tender method with space", {"tenders": tender(method="gift card")}, "tenders[0].method",
     "invalid_format"),
    ("customer not an object", {"customer": "C-778"}, "customer", "wrong_type"),
    ("bad email", {"customer": {"email": "a at example.com"}}, "customer.email",
     "invalid_format"),
    ("unknown customer field", {"customer": {"birthday": "01-01"}}, "customer.birthday",
     "unknown_field"),
    ("51 custom fields", {"custom_fields": {f"k{i}": i for i in range(51)}}, "custom_fields",
     "too_many"),
    ("null custom value", {"custom_fields": {"gift": None}}, "custom_fields.gift",
     "wrong_type"),
    ("nested custom value", {"custom_fields": {"gift": {"to": "Ann"}}}, "custom_fields.gift",
     "wrong_type"),
    ("list custom value", {"custom_fields": {"gift": ["Ann"]}}, "custom_fields.gift",
     "wrong_type"),
    ("65-char custom key", {"custom_fields": {"k" * 65: 1}}, "custom_fields." + "k" * 65,
     "too_long"),
    ("custom fields a list", {"custom_fields": [1]}, "custom_fields", "wrong_type"),
]


@pytest.mark.parametrize(("change", "field", "code"),
                         [case[1:] for case in SINGLE_VIOLATIONS],
                         ids=[case[0] for case in SINGLE_VIOLATIONS])
def test_each_rule_broken_alone_gives_exactly_one_problem_at_its_field(
        change: dict[str, Any], field: str, code: str):
    err = refusal(sale(**change))
    assert err.code == "validation_failed"
    assert [(p.field, p.code) for p in err.problems] == [(field, code)]
    assert err.problems[0].message


ADJUSTMENT_VIOLATIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"adjustment_id": "ADJ/1"}, "adjustment_id", "invalid_format"),
    ({"sku": _DROP}, "sku", "required"),
    ({"delta": "0"}, "delta", "zero_not_allowed"),
    ({"delta": -2}, "delta", "wrong_type"),
    ({"delta": "-0.0000001"}, "delta", "too_many_decimals"),
    ({"delta": "2"}, "delta", "wrong_sign"),  # damaged stock cannot grow
    ({"reason": "received", "delta": "-2"}, "delta", "wrong_sign"),
    ({"reason": "broken"}, "reason", "invalid_choice"),
    ({"occurred_at": "2026-11-22 18:40:00"}, "occurred_at", "invalid_format"),
    ({"note": "x" * 501}, "note", "too_long"),
    ({"quantity": "2"}, "quantity", "unknown_field"),
    ({"custom_fields": {"bin": None}}, "custom_fields.bin", "wrong_type"),
]


@pytest.mark.parametrize(("change", "field", "code"), ADJUSTMENT_VIOLATIONS)
def test_each_adjustment_rule_broken_alone_gives_exactly_one_problem(
        change: dict[str, Any], field: str, code: str):
    body = {**ADJUSTMENT, **change}
    body = {k: v for k, v in body.items() if v is not _DROP}
    assert problems(body, parse_adjustment) == [(field, code)]


@pytest.mark.parametrize(("reason", "delta"), [("counted", "3"), ("counted", "-3"),
                                               ("returned", "-1"), ("transferred", "12.5"),
                                               ("received", "0.750"), ("lost", "-1")])
def test_adjustment_reasons_accept_the_signs_they_allow(reason: str, delta: str):
    parse_adjustment(encode({**ADJUSTMENT, "reason": reason, "delta": delta}))


def test_several_bad_fields_give_one_problem_each_in_one_answer():
    body = sale(currency="EURO", occurred_at="2026-11-22T10:15:00", colour="red",
                lines=line(unit_price=1.99, quantity="0"),
                customer={"email": "nope"}, custom_fields={"a": None, "b": [1]})
    assert sorted(problems(body)) == sorted([
        ("occurred_at", "missing_offset"),
        ("currency", "unknown_currency"),
        ("lines[0].quantity", "zero_not_allowed"),
        ("lines[0].unit_price", "wrong_type"),
        ("customer.email", "invalid_format"),
        ("custom_fields.a", "wrong_type"),
        ("custom_fields.b", "wrong_type"),
        ("colour", "unknown_field"),
    ])


def test_problem_messages_name_the_bad_value_and_the_summary_names_the_fields():
    err = refusal(sale(currency="EURO", lines=line(unit_price="1.999")))
    by_field = {p.field: p.message for p in err.problems}
    assert '"EURO"' in by_field["currency"]
    assert "lines[0].unit_price" not in by_field  # no currency, so decimals are not judged
    assert "currency" in err.message and str(err) == err.message
    body = err.error_body()
    assert body == {"error": {"code": "validation_failed", "message": err.message,
                              "details": [{"field": p.field, "code": p.code,
                                           "message": p.message} for p in err.problems]}}


def test_a_huge_bad_value_is_quoted_short_in_the_message():
    err = refusal(sale(transaction_id="x" * 100_000))
    assert len(err.problems[0].message) < 200


def test_a_refund_and_a_void_with_their_original_are_accepted():
    for kind in ("refund", "void"):
        parse_transaction(encode(sale(type=kind, original_transaction_id="T01-1")))


def test_an_exchange_line_with_negative_quantity_and_discount_is_accepted():
    lines = [*EXAMPLE["lines"], {"sku": "4006381333931", "quantity": "-1",
                                 "unit_price": "1.99", "discount": "-0.50"}]
    total = "2.49"  # 3.98 − 1.99 + 0.50
    body = sale(lines=lines, total=total, tenders=[{"method": "cash", "amount": total}])
    parse_transaction(encode(body))


def test_a_basket_netting_below_zero_is_refused_as_a_sale():
    lines = [{"sku": "A", "quantity": "-1", "unit_price": "5.00"}]
    assert problems(sale(lines=lines, total="-5.00", tenders=[])) == [
        ("total", "negative_not_allowed")]


def test_a_zero_total_may_have_no_tenders():
    lines = line(discount="3.98")
    parse_transaction(encode(sale(lines=lines, total="0.00", tenders=[])))


def test_optional_fields_may_be_null_or_absent():
    body = sale(customer=None, custom_fields=None, lines=line(discount=None, tax_rate=None,
                                                              description=None))
    parse_transaction(encode(body))
    slim = {k: v for k, v in EXAMPLE.items()
            if k not in ("customer", "custom_fields", "original_transaction_id")}
    parse_transaction(encode(slim))


# -- JSON gate ------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "code"), [
    (b"", "syntax_error"),
    (b'{"transaction_id": ', "syntax_error"),
    (b"\xff\xfe{}", "not_utf8"),
    (b"\xef\xbb\xbf{}", "syntax_error"),  # a UTF-8 byte order mark
    (b"[1, 2]", "not_an_object"),
    (b'"sale"', "not_an_object"),
    (b"null", "not_an_object"),
    (b'{"total": NaN}', "syntax_error"),
    (b'{"total": -Infinity}', "syntax_error"),
    (b'{"type": "sale", "type": "refund"}', "duplicate_key"),
    (b'{"a": {"b": 1, "b": 1}}', "duplicate_key"),
    (b'{"a": "\\udc00"}', "unpaired_surrogate"),
    (b'{"\\ud800": 1}', "unpaired_surrogate"),
    (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "too_deep"),
    (b"[" * 100_000, "too_deep"),
    (b'{"a": ' + b"7" * 5000 + b"}", "number_too_long"),
])
def test_bodies_that_are_not_one_json_object_are_invalid_json(body: bytes, code: str):
    for parse in (parse_transaction, parse_adjustment):
        err = refusal(body, parse)
        assert err.code == "invalid_json"
        assert [(p.field, p.code) for p in err.problems] == [("", code)]


def test_a_duplicate_key_holding_a_card_number_is_not_repeated_in_the_error():
    err = refusal(b'{"4111111111111111": 1, "4111111111111111": 2}')
    assert err.problems[0].code == "duplicate_key"
    assert "4111" not in json.dumps(err.error_body())


@pytest.mark.parametrize(("raw", "code"), [
    (b"0.30000000000000000001", "lossy_number"),
    (b"9007199254740993", "lossy_number"),
    (b"1e400", "lossy_number"),
    (b"1.10", None),
    (b"-0.0", None),
    (b"9007199254740992", None),
    (b"1e3", None),
])
def test_custom_field_numbers_must_survive_a_double(raw: bytes, code: str | None):
    body = encode(sale(custom_fields={"x": "PLACEHOLDER"})).replace(b'"PLACEHOLDER"', raw)
    if code is None:
        accepted = parse_transaction(body)
        assert accepted.data["custom_fields"]["x"] == json.loads(raw)
    else:
        assert problems(body) == [("custom_fields.x", code)]


# -- card numbers ---------------------------------------------------------------------------


def luhn_check_digit(payload: str) -> str:
    total = 0
    for i, char in enumerate(reversed(payload)):
        value = int(char)
        if i % 2 == 0:  # doubled once the check digit is appended
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return str((10 - total % 10) % 10)


def luhn_valid(digits: str) -> bool:
    return luhn_check_digit(digits[:-1]) == digits[-1]


# Issuer prefixes of payment networks (ISO/IEC 7812): Visa, Mastercard (both ranges), Amex,
# Diners, JCB, Discover, UnionPay, Maestro.
NETWORK_PREFIXES = ["4", "51", "55", "2221", "2500", "2720", "34", "37", "36", "3528", "6011",
                    "65", "62", "50", "58"]


@st.composite
def card_numbers(draw: st.DrawFn, lengths: tuple[int, int] = (13, 19)) -> str:
    length = draw(st.integers(*lengths))
    prefix = draw(st.sampled_from(NETWORK_PREFIXES))
    payload = prefix + draw(st.text("0123456789", min_size=length - 1 - len(prefix),
                                    max_size=length - 1 - len(prefix)))
    return payload + luhn_check_digit(payload)


@st.composite
def written_out(draw: st.DrawFn, digits: str) -> str:
    """Digits as a person might type them: random spaces and dashes between some."""
    out = digits[0]
    for char in digits[1:]:
        out += draw(st.sampled_from(["", "", "", " ", "-", " - ", "  ", "\u2013"])) + char
    return out


NO_DIGITS = st.text(st.characters(blacklist_categories=["Cs", "Cc", "Nd"]), max_size=12)


@st.composite
def card_in_text(draw: st.DrawFn) -> tuple[str, str]:
    digits = draw(card_numbers())
    return digits, draw(NO_DIGITS) + draw(written_out(digits)) + draw(NO_DIGITS)


PLACES: list[tuple[str, Any]] = [
    ("lines[0].description", lambda b, s: b["lines"][0].__setitem__("description", s)),
    ("customer.email", lambda b, s: b["customer"].__setitem__("email", s)),
    ("customer.name", lambda b, s: b["customer"].__setitem__("name", s)),
    ("custom_fields.gift_message", lambda b, s: b["custom_fields"].__setitem__(
        "gift_message", s)),
    ("custom_fields.<key 1>", lambda b, s: b["custom_fields"].__setitem__(s, "x")),
    ("tenders[0].reference", lambda b, s: b["tenders"][0].__setitem__("reference", s)),
    ("vendor.a[1].b", lambda b, s: b.__setitem__("vendor", {"a": [0, {"b": s}]})),
]


@SETTINGS
@given(card=card_in_text(), place=st.sampled_from(PLACES))
def test_a_card_number_in_any_string_is_refused_and_never_echoed(
        card: tuple[str, str], place: tuple[str, Any]):
    digits, text = card
    path, put = place
    body = sale()
    put(body, text)
    err = refusal(body)
    assert err.code == "card_number_not_allowed"
    assert [(p.field, p.code) for p in err.problems] == [(path, "card_number")]
    shown = json.dumps(err.error_body(), ensure_ascii=False) + str(err) + repr(err)
    assert digits not in shown and text.strip() not in shown


@SETTINGS
@given(digits=card_numbers(), field=st.sampled_from(["transaction_id", "terminal_id"]),
       prefix=st.sampled_from(["", "T01-", "x."]))
def test_a_card_number_as_an_id_is_refused(digits: str, field: str, prefix: str):
    assert problems(sale(**{field: prefix + digits})) == [(field, "card_number")]


def test_in_ids_a_dash_separates_numbers_so_date_and_sequence_ids_pass():
    an_id = "T01-20261122-000122"  # 20261122000122 passes the Luhn check
    assert luhn_valid("20261122000122")
    accepted = parse_transaction(encode(sale(transaction_id=an_id)))
    assert accepted.object_id == an_id
    parse_transaction(encode(sale(type="refund", original_transaction_id=an_id)))
    parse_adjustment(encode({**ADJUSTMENT, "adjustment_id": an_id}))
    # Outside ids the dashes join, but 20261122000122 starts outside every card issuer's
    # range, so a receipt number in free text passes too.
    parse_transaction(encode(sale(lines=line(description=f"Receipt {an_id}"))))


@given(digits=st.text("0123456789", min_size=12, max_size=18).filter(
    lambda d: d[0] in "0789" or (d[0] == "2" and not 2221 <= int(d[:4]) <= 2720)))
def test_luhn_valid_numbers_outside_card_issuer_ranges_pass(digits: str):
    number = digits + luhn_check_digit(digits)
    assert luhn_valid(number)
    parse_transaction(encode(sale(custom_fields={"ref": number})))


def test_every_field_holding_a_card_number_is_listed_once():
    body = sale(customer={"name": "5500 0000 0000 0004"},
                custom_fields={"4111 1111 1111 1111": "4111-1111-1111-1111",
                               "n": 4111111111111111})
    assert [(p.field, p.code) for p in refusal(body).problems] == [
        ("customer.name", "card_number"),
        ("custom_fields.<key 0>", "card_number"),
        ("custom_fields.n", "card_number"),
    ]


def test_a_card_number_inside_an_adjustment_is_refused_too():
    body = {**ADJUSTMENT, "note": "refund to card 3782 822463 10005"}
    assert problems(body, parse_adjustment) == [("note", "card_number")]


@pytest.mark.parametrize("text", [
    "4111 1111 1111 1111 12/27",  # card and expiry date in one run of digits
    "qty 2 - 4111-1111-1111-1111",
    "4111111111111111x",
    "ref:4111111111111111",
    "6011 0009 9013 9424 1",
])
def test_a_card_number_next_to_other_numbers_is_still_found(text: str):
    assert find_card_numbers({"note": text}) == ["note"]


@SETTINGS
@given(digits=st.one_of(
    card_numbers(lengths=(13, 19)).map(lambda d: d[:-1] + str((int(d[-1]) + 1) % 10)),
    card_numbers(lengths=(12, 12)),
    card_numbers(lengths=(20, 20)),
), around=NO_DIGITS)
def test_luhn_invalid_and_12_or_20_digit_numbers_pass(digits: str, around: str):
    assert luhn_valid(digits) == (len(digits) in (12, 20))
    body = sale(lines=line(description=around + digits + around))
    assert parse_transaction(encode(body)).data == body


@pytest.mark.parametrize("text", ["**** **** **** 1111", "Order 2026-11-22 10:15 #123456",
                                  "+86 138 0013 8000", "1234 5678 9012", "4111"])
def test_masked_cards_dates_and_short_numbers_pass(text: str):
    assert find_card_numbers({"note": text}) == []


def test_a_product_barcode_that_passes_luhn_is_allowed_only_as_a_sku():
    barcode = "5449000000996"  # a real EAN-13 that also passes the Luhn check
    assert luhn_valid(barcode)
    parse_transaction(encode(sale(lines=line(sku=barcode), custom_fields=None)))
    parse_adjustment(encode({**ADJUSTMENT, "sku": barcode}))
    assert problems(sale(lines=line(description=barcode))) == [
        ("lines[0].description", "card_number")]
    assert problems(sale(lines=line(sku="4111111111111111"))) == [
        ("lines[0].sku", "card_number")]  # 16 digits: no GTIN is that long
    assert problems(sale(lines=line(sku="5449 0000 0099 6"))) == [
        ("lines[0].sku", "card_number")]  # written out like a card, not a barcode


# -- totals and rounding --------------------------------------------------------------------


def amount(minor_units: int, units: int) -> str:
    return f"{Decimal(units).scaleb(-minor_units):f}"


@st.composite
def priced_lines(draw: st.DrawFn, minor: int) -> tuple[list[dict[str, str]], Decimal]:
    lines, exact = [], Decimal(0)
    for index in range(draw(st.integers(1, 6))):
        quantity = Decimal(draw(st.integers(1, 50_000))).scaleb(-draw(st.integers(0, 6)))
        price = Decimal(draw(st.integers(0, 10**7))).scaleb(-minor)
        discount = Decimal(draw(st.integers(0, 10**4))).scaleb(-minor)
        lines.append({"sku": f"SKU-{index}", "quantity": f"{quantity:f}",
                      "unit_price": f"{price:f}", "discount": f"{discount:f}"})
        exact += quantity * price - discount
    return lines, exact


@SETTINGS
@given(data=st.data(), currency=st.sampled_from(["EUR", "JPY", "KWD", "CLF", "ISK", "BHD"]))
def test_the_half_even_total_is_accepted_and_one_minor_unit_off_is_refused(
        data: st.DataObject, currency: str):
    minor = MINOR_UNITS[currency]
    lines, exact = data.draw(priced_lines(minor))
    unit = Decimal(1).scaleb(-minor)
    total = exact.quantize(unit, rounding=ROUND_HALF_EVEN)
    assume(total >= unit)

    def transaction(total: Decimal) -> dict[str, Any]:
        return sale(currency=currency, lines=lines, total=f"{total:f}",
                    tenders=[{"method": "card", "amount": f"{total:f}"}])

    parse_transaction(encode(transaction(total)))
    for wrong in (total + unit, total - unit):
        assert problems(transaction(wrong)) == [("total", "total_mismatch")]


@pytest.mark.parametrize(("lines", "total", "accepted"), [
    # two lines of 0.005: rounded on the sum (0.01), not per line (0.00 + 0.00)
    ([("0.5", "0.01"), ("0.5", "0.01")], "0.01", True),
    ([("0.5", "0.01"), ("0.5", "0.01")], "0.00", False),
    ([("0.125", "1.00")], "0.12", True),  # half to even: down
    ([("0.125", "1.00")], "0.13", False),
    ([("0.135", "1.00")], "0.14", True),  # half to even: up
    ([("0.735", "1.99"), ("2", "1.99")], "5.44", True),  # 5.44265
    ([("1", "1.99")], "1.99", True),
])
def test_the_total_is_rounded_half_even_once_on_the_sum(
        lines: list[tuple[str, str]], total: str, accepted: bool):
    body = sale(lines=[{"sku": "A", "quantity": q, "unit_price": p} for q, p in lines],
                total=total, tenders=[{"method": "cash", "amount": total}])
    if accepted:
        parse_transaction(encode(body))
    else:
        assert problems(body) == [("total", "total_mismatch")]


@pytest.mark.parametrize(("currency", "good", "bad"), [
    ("JPY", "150", "150.0"), ("KRW", "9900", "9900.5"),
    ("KWD", "1.250", "1.2500"), ("BHD", "0.001", "0.0001"),
    ("CLF", "0.0001", "0.00001"), ("EUR", "1", "1.001"),
])
def test_amounts_have_no_more_decimals_than_their_currency(currency: str, good: str, bad: str):
    def transaction(price: str) -> dict[str, Any]:
        return sale(currency=currency, lines=line(unit_price=price, quantity="1", discount="0"),
                    total=price, tenders=[{"method": "cash", "amount": price, "change": "0"}])

    parse_transaction(encode(transaction(good)))
    assert sorted(problems(transaction(bad))) == [
        ("lines[0].unit_price", "too_many_decimals"),
        ("tenders[0].amount", "too_many_decimals"),
        ("total", "too_many_decimals"),
    ]


def test_the_currency_table_holds_every_active_code_with_its_minor_unit():
    assert {MINOR_UNITS[c] for c in ("JPY", "KRW", "ISK", "CLP", "VND", "XOF")} == {0}
    assert {MINOR_UNITS[c] for c in ("BHD", "KWD", "OMR", "JOD", "TND", "IQD", "LYD")} == {3}
    assert MINOR_UNITS["CLF"] == MINOR_UNITS["UYW"] == 4
    assert MINOR_UNITS["EUR"] == MINOR_UNITS["USD"] == MINOR_UNITS["XCG"] == 2
    assert not {"ANG", "BGN", "HRK", "XAU", "XXX", "XTS"} & set(MINOR_UNITS)
    assert all(re.fullmatch("[A-Z]{3}", c) for c in MINOR_UNITS) and len(MINOR_UNITS) > 150


# -- keys and payload -----------------------------------------------------------------------


def test_the_idempotency_key_is_a_fixed_uuid5_of_the_event_identity():
    key = idempotency_key("store-042", "transaction", "T01", "T01-20261122-000123")
    assert key == "1a9b6478-b30b-505e-a670-a1c6ec474a96"
    assert key == str(uuid.uuid5(NAMESPACE, "store-042/transaction/T01/T01-20261122-000123"))
    assert uuid.UUID(key).version == 5


IDS = st.from_regex(r"[A-Za-z0-9._:-]{1,64}", fullmatch=True)


@SETTINGS
@given(parts=st.tuples(IDS, st.sampled_from(["transaction", "inventory_adjustment"]), IDS, IDS),
       which=st.integers(0, 3), other=IDS)
def test_the_idempotency_key_differs_when_any_component_differs(
        parts: tuple[str, str, str, str], which: int, other: str):
    changed = list(parts)
    changed[which] = ({"transaction": "inventory_adjustment"}.get(parts[1], "transaction")
                      if which == 1 else other)
    assume(tuple(changed) != parts)
    assert idempotency_key(*parts) == idempotency_key(*parts)
    assert idempotency_key(*parts) != idempotency_key(*changed)


@pytest.mark.parametrize("args", [("store/1", "transaction", "T01", "1"),
                                  ("s", "sale", "T01", "1"), ("s", "transaction", "", "1")])
def test_ambiguous_or_unknown_key_parts_are_refused(args: tuple[str, str, str, str]):
    with pytest.raises(ValueError, match=r"key part|kind"):
        idempotency_key(*args)


def test_the_dedupe_key_names_kind_terminal_and_id():
    assert dedupe_key("transaction", "T01", "T01-1") == "transaction/T01/T01-1"
    assert dedupe_key("inventory_adjustment", "T01", "A") == "inventory_adjustment/T01/A"
    with pytest.raises(ValueError, match="kind"):
        dedupe_key("sale", "T01", "1")


@pytest.mark.parametrize("store_id", ["store-042", 'we"ird\\store', "Läden-7"])
def test_the_outbox_payload_wraps_the_canonical_bytes_unchanged(store_id: str):
    accepted = parse_transaction(encode(EXAMPLE))
    payload = outbox_payload(store_id, accepted)
    assert json.loads(payload) == {"store_id": store_id, "kind": "transaction", "data": EXAMPLE}
    assert payload.endswith(b',"data":' + accepted.canonical + b"}")


def _payload(data: dict[str, Any], store_id: str = "store-042") -> bytes:
    return outbox_payload(store_id, parse_transaction(encode(data)))


def _without(data: dict[str, Any], *path: Any) -> dict[str, Any]:
    body = copy.deepcopy(data)
    target = body
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return body


NULLABLE = copy.deepcopy(EXAMPLE)
NULLABLE["customer"]["name"] = None
NULLABLE["lines"][0]["tax_rate"] = None
NULLABLE["tenders"][0]["reference"] = None


@pytest.mark.parametrize("path", [
    ("original_transaction_id",), ("customer", "name"), ("lines", 0, "tax_rate"),
    ("tenders", 0, "reference"),
])
def test_an_optional_field_sent_as_null_and_left_out_is_the_same_content(path: tuple[Any]):
    with_null, left_out = _payload(NULLABLE), _payload(_without(NULLABLE, *path))
    assert with_null != left_out  # the payload keeps the body as sent
    assert same_content(with_null, left_out) and same_content(left_out, with_null)


@pytest.mark.parametrize("change", [
    {"customer": {"id": "C-778", "email": "b@example.com"}},
    {"custom_fields": {"gift_message": ""}},
    {"custom_fields": {}},
    {"customer": {}},
])
def test_any_other_difference_is_other_content(change: dict[str, Any]):
    assert not same_content(_payload(EXAMPLE), _payload({**EXAMPLE, **change}))


@pytest.mark.parametrize(("one", "other"), [(1, 1.0), (1, True), (0, False), ("1", 1)])
def test_numbers_and_booleans_that_python_calls_equal_are_other_content(one: Any, other: Any):
    first = _payload({**EXAMPLE, "custom_fields": {"n": one}})
    second = _payload({**EXAMPLE, "custom_fields": {"n": other}})
    assert not same_content(first, second)


def test_the_store_and_unreadable_payloads_are_part_of_the_content():
    assert not same_content(_payload(EXAMPLE), _payload(EXAMPLE, "store-043"))
    assert not same_content(b"not json", _payload(EXAMPLE))
    assert same_content(b"not json", b"not json")


def test_the_models_describe_themselves_as_json_schema():
    schema = Transaction.model_json_schema()
    assert schema["additionalProperties"] is False
    assert "unit_price" in schema["$defs"]["Line"]["properties"]
    assert InventoryAdjustment.model_json_schema()["properties"]["delta"]["type"] == "string"


# -- fuzz -----------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=4),
    max_leaves=30,
)


def parse_any(body: bytes) -> None:
    for parse in (parse_transaction, parse_adjustment):
        try:
            accepted = parse(body)
        except InvalidEvent as err:
            assert err.problems and err.code in (
                "invalid_json", "validation_failed", "card_number_not_allowed")
        else:
            assert json.loads(accepted.canonical) == accepted.data


@SETTINGS
@given(value=JSON)
def test_arbitrary_json_raises_nothing_but_invalid_event(value: Any):
    parse_any(json.dumps(value).encode())


@SETTINGS
@given(body=st.binary(max_size=300))
@example(body=b'{"a":1e999999}')
@example(body=b'{"currency":{"x":1},"total":"1"}')
def test_arbitrary_bytes_raise_nothing_but_invalid_event(body: bytes):
    parse_any(body)


def paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [here]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*here, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, (*here, index))
    return found


@SETTINGS
@given(data=st.data(), replacement=JSON)
def test_the_example_with_any_part_replaced_by_any_json_raises_nothing_but_invalid_event(
        data: st.DataObject, replacement: Any):
    for base, parse in ((EXAMPLE, parse_transaction), (ADJUSTMENT, parse_adjustment)):
        body = copy.deepcopy(base)
        where = data.draw(st.sampled_from(paths(body)[1:]))
        target = body
        for step in where[:-1]:
            target = target[step]
        target[where[-1]] = replacement
        try:
            accepted = parse(encode(body))
        except InvalidEvent as err:
            assert err.problems
        else:
            assert accepted.data == body
