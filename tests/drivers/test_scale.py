"""Scales: frame parsing for every flag combination, and each driver against its pty emulator."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.base import DeviceRefused, DeviceSpec, DeviceState, DeviceUnavailable
from drivers.emulators.scale import (
    CasScaleEmulator,
    MettlerToledo8217ScaleEmulator,
    NciScaleEmulator,
    ScaleState,
    cas_ecr_answer,
    nci_answer,
    toledo_8217_weight_answer,
)
from drivers.scale import (
    CasScaleDriver,
    MettlerToledo8217ScaleDriver,
    NciScaleDriver,
    SerialScaleDriver,
)
from drivers.scale_protocols import (
    ScaleCommandError,
    ScaleFrameError,
    cas_bcc,
    parse_cas_ecr,
    parse_nci,
    parse_toledo_8217,
)

# ---------------------------------------------------------------- frames from hardware.md

def test_toledo_8217_examples_from_the_manual_parse():
    w = parse_toledo_8217(bytes.fromhex("02 30 31 2E 32 33 34 0D"))
    assert (w.value, w.unit, w.stable, w.net) == (Decimal("1.234"), "kg", True, False)
    motion = parse_toledo_8217(bytes.fromhex("02 3F 41 0D"))  # 'A' = 0x40 | motion
    assert (motion.value, motion.motion, motion.stable) == (None, True, False)
    net = parse_toledo_8217(b"\x0201.23N\r")
    assert (net.value, net.unit, net.net) == (Decimal("1.23"), "lb", True)


def test_toledo_8217_frame_with_the_parity_bit_passed_through_still_parses():
    frame = bytes(b | 0x80 if bin(b).count("1") % 2 else b for b in b"\x0201.234\r")
    assert parse_toledo_8217(frame).value == Decimal("1.234")


def test_nci_example_from_the_manual_parses():
    w = parse_nci(bytes.fromhex("0A 30 30 30 31 2E 32 33 6B 67 0D 0A 30 30 0D 03"))
    assert (w.value, w.unit, w.stable, w.over, w.under) == (Decimal("1.23"), "kg", True,
                                                             False, False)


def test_nci_over_and_under_weight_fields_and_unknown_command():
    assert parse_nci(b"\n^^^^^^\r\n02\r\x03").over
    assert parse_nci(b"\n______\r\n01\r\x03").under
    assert parse_nci(b"\n------\r\n00\r\x03").faults == ("zero error",)
    with pytest.raises(ScaleCommandError):
        parse_nci(b"\n?\r\x03")


def test_nci_hardware_fault_bits_are_reported():
    w = parse_nci(b"\n" + bytes([0x34, 0x38]) + b"\r\x03")  # RAM error, faulty calibration
    assert w.faults == ("RAM error", "faulty calibration")


def test_cas_example_from_the_manual_parses_and_its_bcc_matches():
    frame = bytes.fromhex("01 02 53 20 30 31 2E 32 33 34 6B 67 65 03 04")
    assert cas_bcc(frame[2:-3]) == 0x65
    w = parse_cas_ecr(frame)
    assert (w.value, w.unit, w.stable) == (Decimal("1.234"), "kg", True)


def test_cas_frame_with_a_corrupt_bcc_is_refused():
    frame = bytearray.fromhex("01 02 53 20 30 31 2E 32 33 34 6B 67 65 03 04")
    frame[5] = ord("9")
    with pytest.raises(ScaleFrameError, match="BCC"):
        parse_cas_ecr(bytes(frame))


@pytest.mark.parametrize("parse", [parse_toledo_8217, parse_nci, parse_cas_ecr])
@given(junk=st.binary(max_size=40))
def test_junk_frames_raise_only_scale_frame_error(parse, junk):
    try:
        parse(junk)
    except ScaleFrameError:
        pass


# ---------------------------------------------------------------- every flag combination

_flags = st.fixed_dictionaries({
    "weight": st.decimals(min_value=0, max_value=Decimal("99.999"), places=3),
    "motion": st.booleans(), "over": st.booleans(), "under": st.booleans(),
    "net": st.booleans(),
})


@given(_flags)
@settings(max_examples=300)
def test_toledo_8217_frames_carry_every_flag_combination(flags):
    state = ScaleState(unit="kg", **flags)
    w = parse_toledo_8217(toledo_8217_weight_answer(state))
    assert (w.motion, w.over, w.under) == (state.motion, state.over, state.under)
    if state.motion or state.over or state.under:
        assert w.value is None
        assert w.zero == (state.weight == 0 and not state.under)
    else:
        assert (w.value, w.net, w.zero, w.stable) == (state.weight, state.net,
                                                     state.weight == 0, True)


@given(_flags, st.sampled_from(["kg", "lb"]))
@settings(max_examples=300)
def test_nci_frames_carry_every_flag_combination(flags, unit):
    state = ScaleState(unit=unit, **flags)
    w = parse_nci(nci_answer(state))
    assert (w.motion, w.over, w.under, w.net) == (state.motion, state.over, state.under,
                                                 state.net)
    assert w.zero == (state.weight == 0)
    if state.motion or state.over or state.under:
        assert w.value is None
    else:
        assert (w.value, w.unit) == (state.weight.quantize(Decimal("0.01") if unit == "lb"
                                                           else Decimal("0.001")), unit)


@given(_flags)
@settings(max_examples=300)
def test_cas_frames_carry_every_flag_combination(flags):
    state = ScaleState(unit="kg", **flags)
    w = parse_cas_ecr(cas_ecr_answer(state))
    assert (w.motion, w.stable, w.over) == (state.motion, not state.motion, state.over)
    if state.over:
        assert w.value is None  # the sign byte says overflow; the digits mean nothing
    else:
        assert w.under == state.under
        assert w.value == (-state.weight if state.under else state.weight)


# ---------------------------------------------------------------- contract: driver vs emulator

CASES = [
    (MettlerToledo8217ScaleDriver, MettlerToledo8217ScaleEmulator),
    (NciScaleDriver, NciScaleEmulator),
    (CasScaleDriver, CasScaleEmulator),
]


@pytest.fixture(params=CASES, ids=["toledo8217", "nci", "cas"])
def pair(request, tmp_path):
    driver_cls, emu_cls = request.param
    emu = emu_cls(tmp_path / "ttyScale0")
    emu.plug()
    # 7E1 protocols keep their defaults: the port is configured once, at open (§3.3.3).
    driver = driver_cls(DeviceSpec(name="scale-1", type=driver_cls.protocol, url=emu.url))
    yield driver, emu
    emu.close()


async def test_stable_weight_is_read(pair):
    driver, emu = pair
    await driver.open()
    try:
        assert (await driver.status()).state is DeviceState.CONNECTED
        emu.set_weight("1.234")
        w = await driver.read_weight(1.0)
        assert (w.value, w.unit, w.stable) == (Decimal("1.234"), "kg", True)
    finally:
        await driver.close()


@pytest.mark.parametrize(("knob", "reason"), [("motion", "in motion"),
                                              ("over", "over capacity"),
                                              ("under", "under zero")])
async def test_unusable_weights_are_refused_with_the_reason(pair, knob, reason):
    driver, emu = pair
    await driver.open()
    try:
        emu.set_weight("2.5")
        getattr(emu, knob)(True)
        with pytest.raises(DeviceRefused, match=reason):
            await driver.read_weight(1.0)
        getattr(emu, knob)(False)
        assert (await driver.read_weight(1.0)).value == Decimal("2.5")
    finally:
        await driver.close()


async def test_a_silent_scale_is_unavailable_and_not_responding(pair):
    driver, emu = pair
    await driver.open()
    try:
        emu.silent = True
        with pytest.raises(DeviceUnavailable, match="not responding"):
            await driver.read_weight(0.3)
        status = await driver.status()
        assert status.state is DeviceState.DISCONNECTED
        assert "not responding" in (status.detail or "")
        emu.silent = False
        assert (await driver.status()).state is DeviceState.CONNECTED
    finally:
        await driver.close()


async def test_unplug_then_replug_reconnects_within_two_seconds(pair):
    driver, emu = pair
    await driver.open()
    try:
        emu.set_weight("0.750")
        assert (await driver.read_weight(1.0)).value == Decimal("0.750")
        emu.unplug()
        with pytest.raises(DeviceUnavailable):
            await driver.read_weight(0.5)
        assert (await driver.status()).state is DeviceState.DISCONNECTED
        emu.plug()
        emu.set_weight("0.500")
        replugged = time.monotonic()
        while (await driver.status()).state is not DeviceState.CONNECTED:
            assert time.monotonic() - replugged < 2.0, "no reconnect within 2 s"
            await asyncio.sleep(0.05)
        assert (await driver.read_weight(1.0)).value == Decimal("0.500")
    finally:
        await driver.close()


async def test_open_on_a_missing_port_raises_device_unavailable(tmp_path):
    driver = NciScaleDriver(DeviceSpec("s", "nci", f"serial://{tmp_path}/absent"))
    with pytest.raises(DeviceUnavailable):
        await driver.open()
    await driver.close()


@pytest.mark.parametrize(("driver_cls", "emu_cls"), CASES, ids=["toledo8217", "nci", "cas"])
async def test_probe_recognises_a_present_scale(tmp_path, driver_cls, emu_cls):
    with emu_cls(tmp_path / "ttyProbe") as emu:
        # A pty refuses a second 7-bit/parity setup (hardware.md §3.3.3): probe it as 8N1.
        url = emu.url + "?bytesize=8&parity=N"
        assert await driver_cls.probe(url, timeout_s=0.5)
        emu.silent = True
        assert not await driver_cls.probe(url, timeout_s=0.3)
    assert not await driver_cls.probe(f"serial://{tmp_path}/ttyProbe", timeout_s=0.3)


async def test_toledo_driver_asks_for_7e1_by_default_and_the_url_can_override(tmp_path):
    toledo = MettlerToledo8217ScaleDriver(DeviceSpec("s", "toledo8217", f"serial://{tmp_path}/x"))
    assert (toledo._endpoint.bytesize, toledo._endpoint.parity) == (7, "E")
    cas = CasScaleDriver(DeviceSpec("s", "cas", f"serial://{tmp_path}/x?bytesize=7&parity=E"))
    assert (cas._endpoint.bytesize, cas._endpoint.parity) == (7, "E")
    assert (CasScaleDriver(DeviceSpec("s", "cas", f"serial://{tmp_path}/x"))._endpoint.bytesize
            == 8)


async def test_cas_nak_is_refused_as_busy(tmp_path):
    with CasScaleEmulator(tmp_path / "ttyCas") as emu:
        driver = CasScaleDriver(DeviceSpec("s", "cas", emu.url))
        await driver.open()
        try:
            emu.busy = True
            with pytest.raises(DeviceRefused, match="busy"):
                await driver.read_weight(0.5)
        finally:
            await driver.close()


def test_every_scale_driver_is_a_scale_kind():
    for driver_cls, _ in CASES:
        assert issubclass(driver_cls, SerialScaleDriver)
        assert driver_cls.kind == "scale"
