from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from drivers.escpos.status import (
    ByteKind,
    StatusFacts,
    StatusParser,
    encode_asb,
    encode_dle_eot,
    parse_asb,
    parse_dle_eot,
)


def test_all_clear_answers_report_no_condition() -> None:
    for n in (1, 2, 3, 4):
        facts = parse_dle_eot(n, 0x12)
        assert not facts.cannot_print
        assert not facts.offline
        assert not facts.paper_near_end


def test_dle_eot_bits_follow_the_vendor_tables() -> None:
    assert parse_dle_eot(1, 0x16).drawer_pin3_high
    assert parse_dle_eot(1, 0x1A).offline
    assert parse_dle_eot(2, 0x16).cover_open
    assert parse_dle_eot(2, 0x1A).feed_button
    assert parse_dle_eot(2, 0x32).paper_end_stop
    assert parse_dle_eot(2, 0x52).error
    assert parse_dle_eot(3, 0x1A).autocutter_error
    assert parse_dle_eot(3, 0x32).unrecoverable_error
    assert parse_dle_eot(3, 0x52).auto_recoverable_error
    # Epson sets both near-end bits; Citizen may set only one of its two sensors.
    assert parse_dle_eot(4, 0x1E).paper_near_end
    assert parse_dle_eot(4, 0x16).paper_near_end
    assert parse_dle_eot(4, 0x72).paper_out
    # Bit 6 alone is the presenter sensor on Citizen PPU-231II, not paper end.
    assert not parse_dle_eot(4, 0x52).paper_out


def test_asb_frames_use_their_own_bit_layout() -> None:
    facts = parse_asb(bytes([0x3C, 0x08, 0x0F, 0x00]))
    assert facts.drawer_pin3_high and facts.offline and facts.cover_open
    assert facts.autocutter_error and not facts.mechanical_error
    assert facts.paper_near_end and facts.paper_out
    assert parse_asb(bytes([0x10, 0x00, 0x03, 0x00])).paper_near_end
    assert not parse_asb(bytes([0x10, 0x00, 0x03, 0x00])).paper_out


def test_the_parser_tells_status_asb_process_id_and_junk_apart() -> None:
    parser = StatusParser()
    units = parser.feed(
        b"\x12" + b"\x10\x00\x03\x00" + b"\x37\x22ABCD\x00" + b"\x11" + b"\x5fTM-T88\x00" + b"\xff"
    )
    assert [u.kind for u in units] == [
        ByteKind.REALTIME,
        ByteKind.ASB,
        ByteKind.PROCESS_ID,
        ByteKind.XON,
        ByteKind.BLOCK,
        ByteKind.JUNK,
    ]
    assert units[2].process_id == b"ABCD"


def test_frames_split_across_reads_are_kept() -> None:
    parser = StatusParser()
    assert parser.feed(b"\x10\x00") == []
    assert [u.kind for u in parser.feed(b"\x0c\x00\x37\x22A")] == [ByteKind.ASB]
    assert [u.kind for u in parser.feed(b"BCD\x00")] == [ByteKind.PROCESS_ID]


def test_a_broken_off_asb_frame_is_junk_and_the_next_byte_is_read_afresh() -> None:
    units = StatusParser().feed(b"\x10\x00\x12")
    assert [u.kind for u in units] == [ByteKind.JUNK, ByteKind.REALTIME]
    assert units[0].data == b"\x10\x00"


def test_xoff_inside_an_asb_frame_is_not_part_of_it() -> None:
    units = StatusParser().feed(b"\x10\x00\x13\x0c\x00")
    assert [u.kind for u in units] == [ByteKind.XOFF, ByteKind.ASB]
    assert units[1].data == b"\x10\x00\x0c\x00"


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_any_byte_sequence_classifies_without_raising(chunks: list[bytes]) -> None:
    parser = StatusParser()
    total = 0
    for chunk in chunks:
        for unit in parser.feed(chunk):
            assert unit.data
            total += len(unit.data)
            if unit.kind is ByteKind.ASB:
                parse_asb(unit.data)
            if unit.kind is ByteKind.REALTIME:
                parse_dle_eot(1, unit.data[0])
    # Every byte is accounted for once, apart from a frame still being collected.
    assert total <= sum(map(len, chunks))


facts_strategy = st.builds(
    StatusFacts,
    **{name: st.booleans() for name in StatusFacts.__dataclass_fields__},
)


@given(facts_strategy)
def test_encoded_answers_parse_back_to_the_same_facts(facts: StatusFacts) -> None:
    for n in (1, 2, 3, 4):
        byte = encode_dle_eot(n, facts)
        assert [u.kind for u in StatusParser().feed(bytes([byte]))] == [ByteKind.REALTIME]
        assert StatusFacts().merged(facts).merged(parse_dle_eot(n, byte)) == facts
    frame = encode_asb(facts)
    assert [u.kind for u in StatusParser().feed(frame)] == [ByteKind.ASB]
    assert StatusFacts().merged(facts).merged(parse_asb(frame)) == facts
