"""GS1 check digits, element strings and in-store labels (hardware.md §4.3)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.gs1 import (
    AI_TABLE,
    DEFAULT_VARIABLE_MEASURE_RULES,
    GS,
    GS1Error,
    VariableMeasureRule,
    ai_decimal,
    check_digit,
    decode_variable_measure,
    encode_element_string,
    encode_variable_measure,
    format_hri,
    has_valid_check_digit,
    is_valid_gtin,
    parse_element_string,
    parse_hri,
    price_check_digit,
    to_gtin14,
)


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        ("4006381333931", True),  # hardware.md §4.3, verified there
        ("4006381333932", False),
        ("96385074", True),  # GTIN-8
        ("036000291452", True),  # GTIN-12 (UPC-A)
        ("10614141000415", True),  # GTIN-14
        ("10614141000416", False),
        ("400638133393", False),  # a GTIN-13 with its check digit missing is not a GTIN
        ("40063813339A", False),
        ("", False),
    ],
)
def test_gtin_check_digit_accepts_valid_codes_and_rejects_the_rest(code, valid):
    assert is_valid_gtin(code) is valid


def test_check_digit_of_a_body_is_the_digit_that_makes_it_valid():
    assert check_digit("400638133393") == 1
    assert check_digit("9638507") == 4


@given(st.text(alphabet="0123456789", min_size=7, max_size=17))
def test_appending_the_computed_check_digit_always_gives_a_valid_code(body):
    assert has_valid_check_digit(body + str(check_digit(body)))


@given(st.text(alphabet="0123456789", min_size=7, max_size=17), st.integers(0, 9))
def test_any_single_digit_change_of_the_check_digit_is_detected(body, wrong):
    good = check_digit(body)
    if wrong != good:
        assert not has_valid_check_digit(body + str(wrong))


def test_gtin14_pads_shorter_gtins_and_refuses_bad_ones():
    assert to_gtin14("4006381333931") == "04006381333931"
    with pytest.raises(GS1Error):
        to_gtin14("4006381333932")


def test_element_string_with_gs_after_a_variable_field_splits_into_ais():
    assert parse_element_string("0109506000134352" + GS + "10ABC") == {
        "01": "09506000134352", "10": "ABC"}
    assert parse_element_string("01095060001343521715123110ABC123" + GS + "21XYZ") == {
        "01": "09506000134352", "17": "151231", "10": "ABC123", "21": "XYZ"}


def test_leading_fnc1_and_a_separator_after_a_fixed_field_are_tolerated():
    assert parse_element_string(GS + "0109506000134352" + GS + "17151231") == {
        "01": "09506000134352", "17": "151231"}


def test_human_readable_form_parses_to_the_same_elements():
    hri = "(01)09506000134352(17)151231(10)ABC"
    assert parse_hri(hri) == {"01": "09506000134352", "17": "151231", "10": "ABC"}
    assert format_hri(parse_hri(hri)) == hri


@pytest.mark.parametrize(
    "junk",
    [
        "0109506000134353",  # wrong GTIN check digit
        "01123",  # fixed field too short
        "99",  # AI with no data
        "10" + "A" * 21,  # variable field over its maximum
        "5512345",  # unknown AI
        "0109506000134352" + "0109506000134352",  # AI twice
        "17ABCDEF",  # letters in a numeric field
        "10AB CD",  # space is outside character set 82
        "",
    ],
)
def test_element_strings_that_break_a_rule_raise_gs1_error(junk):
    with pytest.raises(GS1Error):
        parse_element_string(junk)


def test_measure_ais_carry_their_decimal_point_in_the_fourth_digit():
    assert ai_decimal("3103", "001250") == Decimal("1.250")
    assert ai_decimal("3922", "1999") == Decimal("19.99")
    assert ai_decimal("3932", "9781999") == Decimal("19.99")  # ISO 4217 978 then the price
    with pytest.raises(GS1Error):
        ai_decimal("3103", "00125¹")  # a digit to str.isdigit, not to Decimal


_VALUE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!%&()*+,-./:;<=>?_"


@st.composite
def element(draw):
    spec = draw(st.sampled_from(sorted(AI_TABLE.values(), key=lambda s: s.ai)))
    size = spec.length if spec.fixed else draw(st.integers(1, spec.length))
    alphabet = "0123456789" if spec.numeric else _VALUE_CHARS
    value = draw(st.text(alphabet=alphabet, min_size=size, max_size=size))
    if spec.check_digit:
        value = value[:-1] + str(check_digit(value[:-1]))
    return spec.ai, value


@given(st.lists(element(), min_size=1, max_size=6, unique_by=lambda e: e[0]))
@settings(max_examples=300)
def test_generated_valid_element_strings_round_trip(elements):
    mapping = dict(elements)
    assert parse_element_string(encode_element_string(mapping)) == mapping
    if not any("(" in value for value in mapping.values()):  # "(10)" in a value is ambiguous
        assert parse_hri(format_hri(mapping)) == mapping


@given(st.text(max_size=60))
@settings(max_examples=500)
def test_junk_element_strings_raise_only_gs1_error(junk):
    for parse in (parse_element_string, parse_hri):
        try:
            parse(junk)
        except GS1Error:
            pass


@given(st.binary(max_size=40))
def test_junk_bytes_decoded_as_latin1_raise_only_gs1_error(junk):
    try:
        parse_element_string(junk.decode("latin-1"))
    except GS1Error:
        pass


def test_price_verifier_digits_match_the_gs1_examples():
    assert price_check_digit("2875") == 9  # GS1 GenSpecs 4-digit example
    assert price_check_digit("14685") == 6  # GS1 GenSpecs 5-digit example
    with pytest.raises(GS1Error):
        price_check_digit("123")


def test_upc_in_store_price_label_decodes_item_and_price():
    rule = DEFAULT_VARIABLE_MEASURE_RULES[0]
    code = encode_variable_measure(rule, "02", "12345", Decimal("28.75"))
    assert code == "0212345928752"
    measure = decode_variable_measure(code)
    assert measure is not None
    assert (measure.kind, measure.value, measure.item_ref) == ("price", Decimal("28.75"), "12345")
    assert measure.item_code == "0212345000007"
    assert decode_variable_measure(code[1:]) == measure  # as a 12-digit UPC-A


def test_in_store_label_with_a_wrong_price_verifier_is_refused():
    # Price digits changed and the EAN check digit fixed up: only the verifier catches it.
    body = "02123459" + "2876"
    with pytest.raises(GS1Error, match="verifier"):
        decode_variable_measure(body + str(check_digit(body)))


def test_weight_label_in_the_2x_range_decodes_kilograms():
    code = encode_variable_measure(DEFAULT_VARIABLE_MEASURE_RULES[2], "28", "00123",
                                   Decimal("1.235"))
    measure = decode_variable_measure(code)
    assert measure is not None
    assert (measure.kind, measure.value) == ("weight", Decimal("1.235"))


def test_regular_gtins_are_not_variable_measure():
    assert decode_variable_measure("4006381333931") is None


def test_a_rule_whose_layout_is_not_thirteen_digits_is_refused():
    with pytest.raises(GS1Error):
        VariableMeasureRule(("2",), "price", item_digits=5, value_digits=5, decimals=2)


@given(
    st.sampled_from(DEFAULT_VARIABLE_MEASURE_RULES),
    st.data(),
)
def test_generated_in_store_labels_round_trip(rule, data):
    prefix = data.draw(st.sampled_from(rule.prefixes))
    item = data.draw(st.text(alphabet="0123456789", min_size=rule.item_digits,
                             max_size=rule.item_digits))
    raw = data.draw(st.integers(0, 10 ** rule.value_digits - 1))
    value = Decimal(raw).scaleb(-rule.decimals)
    code = encode_variable_measure(rule, prefix, item, value)
    measure = decode_variable_measure(code, [rule])
    assert measure is not None
    assert (measure.item_ref, measure.value, measure.kind) == (item, value, rule.kind)
