"""Barcode scanners: framing, AIM identifiers, GS1, the serial driver on a pty, the HID decoder."""

from __future__ import annotations

import asyncio
import itertools
import time
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import DeviceSpec, DeviceState, DeviceUnavailable
from drivers.emulators.scanner import ScannerEmulator
from drivers.gs1 import GS
from drivers.scanner import (
    SUFFIXES,
    ScanFramer,
    ScannerConfigError,
    SerialScannerDriver,
    decode_frame,
)
from drivers.scanner_hid import (
    EV_KEY,
    EV_MSC,
    EV_SYN,
    KEY_ENTER,
    KEY_LEFTSHIFT,
    HidWedgeDecoder,
    events_for_text,
)

# ---------------------------------------------------------------- framing (pure)

_SCAN_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40
).map(str.strip).filter(bool)


@given(
    suffix=st.sampled_from(["CR", "LF", "CRLF", "TAB"]),
    scans=st.lists(_SCAN_TEXT, min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 400), max_size=20),
)
@settings(max_examples=400)
def test_random_chunking_of_a_stream_of_scans_yields_exactly_the_scans(suffix, scans, cuts):
    term = SUFFIXES[suffix]
    stream = b"".join(s.encode() + term for s in scans)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    framer = ScanFramer(term)
    frames = []
    for start, end in itertools.pairwise(bounds):
        frames += framer.feed(stream[start:end])
    assert [f.decode() for f in frames] == scans
    assert not framer.pending


def test_two_scans_in_one_read_and_one_scan_over_two_reads_are_framed_right():
    framer = ScanFramer(b"\r\n")
    assert framer.feed(b"]E04006381333931\r\n]E4963850") == [b"]E04006381333931"]
    assert framer.feed(b"74\r") == []
    assert framer.feed(b"\n") == [b"]E496385074"]


def test_a_crlf_scanner_on_a_cr_driver_still_gives_clean_scans():
    framer = ScanFramer(b"\r")
    assert framer.feed(b"123\r\n456\r\n") == [b"123", b"456"]


def test_an_overlong_line_without_suffix_is_discarded_as_noise():
    framer = ScanFramer(b"\r", max_frame=16)
    assert framer.feed(b"x" * 40) == []
    assert framer.discarded == 1
    assert framer.feed(b"ok\r") == [b"ok"]


def test_none_framing_returns_the_pending_bytes_on_flush():
    framer = ScanFramer(b"")
    assert framer.feed(b"ABC") == []
    assert framer.flush() == b"ABC"
    assert framer.flush() is None


# ---------------------------------------------------------------- decoding (pure)

@pytest.mark.parametrize(
    ("frame", "symbology", "gtin"),
    [
        (b"]E04006381333931", "EAN-13", "04006381333931"),
        (b"]E0036000291452", "UPC-A", "00036000291452"),
        (b"]E004252614", "UPC-E", "00042100005264"),
        (b"]E496385074", "EAN-8", "00000096385074"),
        (b"4006381333931", None, "04006381333931"),  # no AIM id: still a GTIN by its shape
    ],
)
def test_ean_upc_scans_are_named_and_normalised_to_gtin14(frame, symbology, gtin):
    scan = decode_frame(frame)
    assert (scan.symbology, scan.gtin, scan.error) == (symbology, gtin, None)


def test_aim_identifier_is_stripped_from_the_code():
    scan = decode_frame(b"]C0HELLO-123")
    assert (scan.code, scan.aim, scan.symbology) == ("HELLO-123", "]C0", "Code 128")


def test_unknown_aim_modifier_is_named_by_its_family():
    assert decode_frame(b"]A7ABC").symbology == "Code 39"
    assert decode_frame(b"]Y0ABC").symbology == "unknown"


def test_ean_with_a_wrong_check_digit_is_delivered_with_an_error():
    scan = decode_frame(b"]E04006381333932")
    assert scan.gtin is None
    assert scan.error is not None and "check digit" in scan.error


def test_gs1_128_scan_is_split_into_application_identifiers():
    scan = decode_frame(("]C10109506000134352" + "17151231" + "10ABC" + GS + "21X1").encode())
    assert scan.symbology == "GS1-128"
    assert scan.gs1 == {"01": "09506000134352", "17": "151231", "10": "ABC", "21": "X1"}
    assert scan.gtin == "09506000134352"


def test_gs1_datamatrix_with_a_bad_gtin_is_delivered_with_an_error():
    scan = decode_frame(b"]d20109506000134353")
    assert scan.gs1 is None
    assert scan.error is not None and scan.error.startswith("GS1")


def test_in_store_price_label_carries_its_price():
    scan = decode_frame(b"]E00212345928752")
    assert scan.measure is not None
    assert (scan.measure.kind, scan.measure.value) == ("price", Decimal("28.75"))
    assert scan.to_event()["measure"]["value"] == "28.75"


def test_scan_event_is_json_ready():
    import json

    event = decode_frame(b"]Q1https://example.com/\xc3\xa9").to_event()
    assert json.loads(json.dumps(event))["code"] == "https://example.com/é"


@given(st.binary(max_size=80))
def test_any_bytes_decode_to_a_scan_without_raising(frame):
    decode_frame(frame)


# ---------------------------------------------------------------- driver on a pty

def scanner_spec(emu: ScannerEmulator, **options) -> DeviceSpec:
    return DeviceSpec(name="scanner-1", type="serial-scanner", url=emu.url, options=options)


@pytest.fixture
def emu(tmp_path):
    emulator = ScannerEmulator(tmp_path / "ttyScanner0")
    emulator.plug()
    yield emulator
    emulator.close()


async def test_scans_reach_a_subscriber_in_order(emu):
    driver = SerialScannerDriver(scanner_spec(emu))
    sub = driver.subscribe()
    await driver.open()
    try:
        assert (await driver.status()).state is DeviceState.CONNECTED
        emu.scan("4006381333931")
        emu.scan_many([("96385074", "]E4"), ("HELLO", "]C0")])
        emu.scan("0109506000134352" + "10LOT7", symbology="]C1", split=[3, 9])
        got = [await sub.get(2.0) for _ in range(4)]
        assert [s.code for s in got] == ["4006381333931", "96385074", "HELLO",
                                         "010950600013435210LOT7"]
        assert got[3].gs1 == {"01": "09506000134352", "10": "LOT7"}
    finally:
        await driver.close()


async def test_a_listener_callback_receives_scans(emu):
    driver = SerialScannerDriver(scanner_spec(emu, suffix="CRLF"))
    emu.suffix = b"\r\n"
    seen = []
    got_one = asyncio.Event()
    driver.add_listener(lambda scan: (seen.append(scan), got_one.set()))
    await driver.open()
    try:
        emu.scan("4006381333931", split=5)
        await asyncio.wait_for(got_one.wait(), 2.0)
        assert seen[0].symbology == "EAN-13"
    finally:
        await driver.close()


async def test_none_framing_ends_a_scan_on_a_quiet_line(emu):
    emu.suffix = b""
    driver = SerialScannerDriver(scanner_spec(emu, suffix="NONE", idle_timeout_s=0.05))
    async with driver.subscribe() as sub:
        await driver.open()
        try:
            emu.scan("4006381333931")
            scan = await sub.get(2.0)
            assert scan.gtin == "04006381333931"
        finally:
            await driver.close()


async def test_unplug_reports_disconnected_and_replug_reconnects_within_two_seconds(emu):
    driver = SerialScannerDriver(scanner_spec(emu))
    sub = driver.subscribe()
    await driver.open()
    try:
        emu.unplug()
        deadline = time.monotonic() + 2.0
        while (await driver.status()).state is not DeviceState.DISCONNECTED:
            assert time.monotonic() < deadline, "unplug not noticed"
            await asyncio.sleep(0.02)
        assert "unplugged" in ((await driver.status()).detail or "")
        await asyncio.sleep(1.5)  # let the backoff grow to its cap
        emu.plug()
        replugged = time.monotonic()
        while (await driver.status()).state is not DeviceState.CONNECTED:
            assert time.monotonic() - replugged < 2.0, "no reconnect within 2 s"
            await asyncio.sleep(0.02)
        emu.scan("96385074", symbology="]E4")
        assert (await sub.get(2.0)).code == "96385074"
    finally:
        await driver.close()


async def test_a_scan_cut_by_an_unplug_is_not_glued_to_the_next_one(emu):
    driver = SerialScannerDriver(scanner_spec(emu))
    sub = driver.subscribe()
    await driver.open()
    try:
        emu.send(b"]E04006")
        await asyncio.sleep(0.1)
        emu.replug()
        for _ in range(100):
            if (await driver.status()).state is DeviceState.CONNECTED and driver._transport:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        emu.scan("96385074", symbology="]E4")
        assert (await sub.get(3.0)).code == "96385074"
    finally:
        await driver.close()


async def test_open_on_a_missing_port_raises_device_unavailable(tmp_path):
    emu = ScannerEmulator(tmp_path / "absent")
    driver = SerialScannerDriver(scanner_spec(emu))
    with pytest.raises(DeviceUnavailable):
        await driver.open()
    assert (await driver.status()).state is DeviceState.DISCONNECTED
    await driver.close()


async def test_close_ends_subscriptions_and_is_idempotent(emu):
    driver = SerialScannerDriver(scanner_spec(emu))
    sub = driver.subscribe()
    await driver.open()
    await driver.close()
    await driver.close()
    assert [scan async for scan in sub] == []


async def test_probe_finds_the_port_only_when_plugged(emu):
    assert await SerialScannerDriver.probe(emu.url)
    emu.unplug()
    assert not await SerialScannerDriver.probe(emu.url)
    assert not await SerialScannerDriver.probe("tcp://127.0.0.1:9")


def test_unknown_options_and_suffixes_are_config_errors(tmp_path):
    url = f"serial://{tmp_path}/x"
    with pytest.raises(ScannerConfigError, match="unknown option"):
        SerialScannerDriver(DeviceSpec("s", "serial-scanner", url, {"sufix": "CR"}))
    with pytest.raises(ScannerConfigError, match="suffix"):
        SerialScannerDriver(DeviceSpec("s", "serial-scanner", url, {"suffix": "ETX"}))


# ---------------------------------------------------------------- HID keyboard wedge decoder

def test_hid_events_with_shift_decode_to_the_typed_text():
    decoder = HidWedgeDecoder()
    events = [*events_for_text("Ab-1_Z"), (EV_KEY, KEY_ENTER, 1), (EV_KEY, KEY_ENTER, 0)]
    assert decoder.feed_many(events) == ["Ab-1_Z"]


def test_hid_decoder_ignores_msc_syn_noise_and_autorepeat():
    decoder = HidWedgeDecoder()
    events = [(EV_MSC, 4, 458782), (EV_KEY, 2, 1), (EV_SYN, 0, 0), (EV_KEY, 2, 2),
              (EV_KEY, 2, 0), (EV_KEY, KEY_ENTER, 1)]
    assert decoder.feed_many(events) == ["1"]


def test_hid_decoder_handles_right_shift_and_caps_lock():
    decoder = HidWedgeDecoder()
    events = [(EV_KEY, 58, 1), (EV_KEY, 58, 0),  # caps lock on
              (EV_KEY, 30, 1), (EV_KEY, 30, 0),  # a -> A
              (EV_KEY, 54, 1), (EV_KEY, 30, 1), (EV_KEY, 30, 0), (EV_KEY, 54, 0),  # shift: a
              (EV_KEY, 2, 1), (EV_KEY, 2, 0),  # digits ignore caps lock
              (EV_KEY, KEY_ENTER, 1)]
    assert decoder.feed_many(events) == ["Aa1"]


def test_hid_decoder_drops_nothing_when_enter_comes_without_data():
    decoder = HidWedgeDecoder()
    assert decoder.feed_many([(EV_KEY, KEY_ENTER, 1), (EV_KEY, KEY_ENTER, 1)]) == []


def test_a_released_shift_no_longer_applies():
    decoder = HidWedgeDecoder()
    events = [(EV_KEY, KEY_LEFTSHIFT, 1), (EV_KEY, 30, 1), (EV_KEY, KEY_LEFTSHIFT, 0),
              (EV_KEY, 30, 1), (EV_KEY, KEY_ENTER, 1)]
    assert decoder.feed_many(events) == ["Aa"]


@given(st.lists(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                        min_size=1, max_size=30), min_size=1, max_size=5))
def test_any_printable_ascii_typed_by_a_wedge_decodes_back(texts):
    decoder = HidWedgeDecoder()
    events = []
    for text in texts:
        events += [*events_for_text(text), (EV_KEY, KEY_ENTER, 1), (EV_KEY, KEY_ENTER, 0)]
    assert decoder.feed_many(events) == texts
