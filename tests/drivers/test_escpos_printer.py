from __future__ import annotations

import asyncio
import time

import pytest

from drivers.base import DeviceError, DeviceRefused, DeviceSpec, DeviceState, DeviceUnavailable
from drivers.emulators.escpos_printer import DrawerPulse, EscposPrinterEmulator
from drivers.escpos import commands
from drivers.escpos.printer import EscposPrinterDriver, PrintInDoubt
from drivers.escpos.receipt import render_receipt

SALE = {
    "transaction_id": "T01-20261122-000124",
    "terminal_id": "T01",
    "type": "sale",
    "occurred_at": "2026-11-22T10:16:00+01:00",
    "currency": "EUR",
    "lines": [{"sku": "CRO", "description": "Croissant", "quantity": "3",
               "unit_price": "1.20", "tax_rate": "7"}],
    "total": "3.60",
    "tenders": [{"method": "card", "amount": "3.60"}],
}  # fmt: skip


def driver_for(emulator: EscposPrinterEmulator, **options: object) -> EscposPrinterDriver:
    options.setdefault("status_timeout_s", 0.5)
    return EscposPrinterDriver(
        DeviceSpec("receipt", "escpos", f"tcp://127.0.0.1:{emulator.port}", options)
    )


async def test_driver_connects_and_reports_a_healthy_printer_as_connected(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    driver = driver_for(escpos_printer)
    await driver.open()
    status = await driver.status()
    assert status.state is DeviceState.CONNECTED
    assert status.detail is None
    await driver.close()
    await driver.close()


@pytest.mark.parametrize(
    ("condition", "state", "detail"),
    [
        ({"paper_near_end": True}, DeviceState.CONNECTED, "paper near end"),
        ({"paper_out": True}, DeviceState.ERROR, "paper out"),
        ({"cover_open": True}, DeviceState.ERROR, "cover open"),
        ({"autocutter_error": True}, DeviceState.ERROR, "cutter error"),
        ({"auto_recoverable_error": True}, DeviceState.ERROR, "print head too hot"),
        ({"unrecoverable_error": True}, DeviceState.ERROR, "unrecoverable error"),
        ({"feed_button": True}, DeviceState.ERROR, "paper being fed"),
    ],
)
async def test_status_reports_each_printer_condition(
    escpos_printer: EscposPrinterEmulator,
    condition: dict[str, bool],
    state: DeviceState,
    detail: str,
) -> None:
    driver = driver_for(escpos_printer)
    escpos_printer.set_state(**condition)
    status = await driver.status()
    assert (status.state, status.detail) == (state, detail)
    await driver.close()


async def test_a_printed_receipt_reaches_the_printer_byte_for_byte(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    driver = driver_for(escpos_printer)
    await driver.open()
    receipt = render_receipt(SALE, width_mm=80, store_name="Bäckerei Müller")
    await driver.print_job(receipt, job_id="job-1", timeout_s=5)
    assert [job.data for job in escpos_printer.jobs] == [receipt]
    await driver.close()


async def test_paper_out_refuses_the_job_and_prints_nothing(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    driver = driver_for(escpos_printer)
    escpos_printer.paper_out = True
    with pytest.raises(DeviceRefused, match="paper out"):
        await driver.print_job(b"Total 9.99\n", job_id="job-2", timeout_s=2)
    escpos_printer.paper_out = False
    await driver.close()
    await asyncio.sleep(0.05)
    assert escpos_printer.printed == b""
    assert escpos_printer.jobs == []


async def test_cover_open_refuses_the_job(escpos_printer: EscposPrinterEmulator) -> None:
    driver = driver_for(escpos_printer)
    escpos_printer.cover_open = True
    with pytest.raises(DeviceRefused, match="cover open"):
        await driver.print_job(b"x\n", job_id="job-3")
    await driver.close()


async def test_an_offline_printer_gets_no_job_bytes_to_print_later(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    """Offline with paper and cover fine (here: paper being fed with the FEED button): bytes
    sent now would wait in its buffer and print whenever it is back, maybe after the job
    expired. So the job is refused and not one byte of it is sent."""
    driver = driver_for(escpos_printer)
    escpos_printer.set_state(feed_button=True)
    assert escpos_printer.state.offline and not escpos_printer.state.paper_out
    with pytest.raises(DeviceRefused):
        await driver.print_job(b"LATE RECEIPT\n", job_id="job-off")
    escpos_printer.set_state(feed_button=False)
    await driver.close()
    await asyncio.sleep(0.05)
    assert b"LATE RECEIPT" not in escpos_printer.received and escpos_printer.jobs == []


async def test_paper_running_out_mid_job_finishes_once_paper_is_back(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    driver = driver_for(escpos_printer)
    await driver.open()
    # The printer runs out right as the job arrives: data waits in its buffer.
    escpos_printer.run_out_on_next_print = True
    task = asyncio.create_task(driver.print_job(b"A\n", job_id="job-4", timeout_s=5))
    await asyncio.sleep(0.3)
    assert escpos_printer.paper_out
    assert not task.done()
    escpos_printer.paper_out = False
    await asyncio.wait_for(task, 5)
    assert [job.data for job in escpos_printer.jobs] == [b"A\n"]
    await driver.close()


async def test_a_job_not_confirmed_in_time_is_in_doubt_not_retryable(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    driver = driver_for(escpos_printer)
    await driver.open()
    # Block completion by pausing printing right after the status check passes.
    original = escpos_printer._print_pending
    escpos_printer._print_pending = lambda: None  # type: ignore[method-assign]
    with pytest.raises(PrintInDoubt) as info:
        await driver.print_job(b"B\n", job_id="job-5", timeout_s=0.5)
    assert not isinstance(info.value, DeviceUnavailable | DeviceRefused)
    escpos_printer._print_pending = original  # type: ignore[method-assign]
    await driver.close()


async def test_a_printer_that_never_answers_is_not_responding_within_the_timeout(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    escpos_printer.silent = True
    driver = driver_for(escpos_printer, status_timeout_s=0.3)
    started = time.monotonic()
    status = await driver.status()
    elapsed = time.monotonic() - started
    assert (status.state, status.detail) == (DeviceState.DISCONNECTED, "not responding")
    assert elapsed < 1.0
    with pytest.raises(DeviceUnavailable, match="not responding"):
        await driver.open()
    with pytest.raises(DeviceUnavailable):
        await driver.print_job(b"x\n", job_id="job-6")
    assert escpos_printer.jobs == []
    await driver.close()


async def test_unplug_then_replug_reconnects_within_two_seconds(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    driver = driver_for(escpos_printer)
    await driver.open()
    await escpos_printer.unplug()
    status = await driver.status()
    assert status.state is DeviceState.DISCONNECTED
    assert status.detail and status.detail.startswith("unreachable")
    await escpos_printer.replug()
    returned = time.monotonic()
    while (await driver.status()).state is not DeviceState.CONNECTED:
        assert time.monotonic() - returned < 2.0
        await asyncio.sleep(0.1)
    await driver.print_job(b"after replug\n", job_id="job-7", timeout_s=2)
    assert escpos_printer.jobs[-1].data == b"after replug\n"
    await driver.close()


async def test_drawer_pulse_sends_the_configured_pin_and_timing(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    driver = driver_for(escpos_printer, drawer_pin=5, drawer_on_ms=60, drawer_off_ms=300)
    await driver.kick_drawer()
    await driver.kick_drawer(pin=2, on_ms=100, off_ms=400)
    await driver.status()  # a round trip: the pulses have been processed
    assert escpos_printer.pulses == [DrawerPulse(5, 60, 300), DrawerPulse(2, 100, 400)]
    assert commands.drawer_pulse(5, 60, 300) == b"\x1b\x70\x01\x1e\x96"
    assert commands.drawer_pulse() == b"\x1b\x70\x00\x19\x78"
    assert escpos_printer.jobs == []
    await driver.close()


async def test_drawer_pulse_outside_the_duty_cycle_limit_is_refused_before_sending(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    driver = driver_for(escpos_printer)
    with pytest.raises(DeviceError, match="duty cycle"):
        await driver.kick_drawer(on_ms=100, off_ms=100)
    with pytest.raises(DeviceError, match="pin must be 2 or 5"):
        await driver.kick_drawer(pin=3)
    with pytest.raises(DeviceError, match="duty cycle"):
        EscposPrinterDriver(
            DeviceSpec("r", "escpos", "tcp://127.0.0.1:9100", {"drawer_on_ms": 200})
        )
    assert escpos_printer.pulses == []
    await driver.close()


async def test_drawer_is_not_opened_later_when_the_printer_is_offline(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    driver = driver_for(escpos_printer)
    escpos_printer.cover_open = True
    with pytest.raises(DeviceRefused, match="drawer not opened"):
        await driver.kick_drawer()
    escpos_printer.cover_open = False
    await driver.status()
    assert escpos_printer.pulses == []
    await driver.close()


async def test_drawer_open_follows_pin_3_with_configurable_polarity(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    high = driver_for(escpos_printer)
    escpos_printer.set_state(drawer_pin3_high=True)
    status = await high.status()
    assert high.drawer_open is True
    assert status.state is DeviceState.CONNECTED and status.detail == "drawer open"
    await high.close()
    low = driver_for(escpos_printer, drawer_open_when="low")
    status = await low.status()
    assert low.drawer_open is False and status.detail is None
    await low.close()


async def test_the_connection_is_released_when_idle_so_other_clients_get_the_printer(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    first = driver_for(escpos_printer, idle_close_s=0.2)
    second = driver_for(escpos_printer, idle_close_s=0.2)
    assert (await first.status()).state is DeviceState.CONNECTED
    await asyncio.sleep(0.4)
    assert (await second.status()).state is DeviceState.CONNECTED
    assert escpos_printer.connections == 2
    await first.close()
    await second.close()


async def test_unsolicited_asb_frames_update_facts_without_confusing_status(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    driver = driver_for(escpos_printer)
    await driver.open()
    async with driver._lock:
        await driver._transport_locked().write(commands.gs_a(commands.ASB_ALL))
    await asyncio.sleep(0.05)
    escpos_printer.paper_near_end = True  # sends an ASB frame unasked
    await asyncio.sleep(0.05)
    status = await driver.status()
    assert status.detail == "paper near end"
    assert escpos_printer.asb_enabled
    await driver.close()


async def test_probe_finds_an_escpos_printer_and_not_a_silent_port(
    escpos_printer: EscposPrinterEmulator,
) -> None:
    url = f"tcp://127.0.0.1:{escpos_printer.port}"
    assert await EscposPrinterDriver.probe(url, timeout_s=0.5)
    escpos_printer.silent = True
    assert not await EscposPrinterDriver.probe(url, timeout_s=0.3)


async def test_completion_falls_back_to_status_when_gs_paren_h_is_unsupported() -> None:
    emulator = EscposPrinterEmulator(supports_process_id=False)
    await emulator.start()
    try:
        driver = driver_for(emulator, status_timeout_s=0.3)
        await driver.open()
        await driver.print_job(b"clone\n", job_id="job-8", timeout_s=2)
        await driver.close()
        await asyncio.sleep(0.05)
        assert emulator.printed == b"clone\n"
    finally:
        await emulator.stop()
