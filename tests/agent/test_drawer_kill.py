"""The cash drawer across a SIGKILL of ``tillsync run``: never stored, never replayed.

A real agent process drives an emulated ESC/POS printer on 127.0.0.1. A drawer request that
failed (printer unplugged) must not open the drawer later, and one that succeeded must not
open it again, even when the agent is killed without warning and started again on the same
outbox with the printer back.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent.config import load_config
from drivers.emulators.escpos_printer import DrawerPulse, EscposPrinterEmulator
from tests.agent.conftest import STATUS_TOKEN, TOKENS, printer_entry, write_config
from tests.agent.test_daemon import tillsync_run
from tests.polling import until

ESC_P = b"\x1bp"  # the drawer pulse command, whatever its parameters


async def receipt_state(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(f"{base}/v1/status",
                        headers={"Authorization": f"Bearer {STATUS_TOKEN}"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    [device] = [d for d in body["devices"] if d["name"] == "receipt"]
    return dict(device)


async def until_state(http: aiohttp.ClientSession, base: str, state: str,
                      timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await receipt_state(http, base))["state"] != state:
        assert time.monotonic() < deadline, f"receipt printer never became {state}"
        await asyncio.sleep(0.05)


async def open_drawer(http: aiohttp.ClientSession, base: str) -> tuple[int, Any]:
    async with http.post(f"{base}/v1/devices/receipt/drawer", json={},
                         headers={"Authorization": f"Bearer {TOKENS['T01']}"}) as resp:
        return resp.status, await resp.json()


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL


def stored_events(config_path: Path) -> int:
    with sqlite3.connect(load_config(config_path).outbox.path) as db:
        return int(db.execute("SELECT count(*) FROM events").fetchone()[0])


async def test_a_refused_drawer_is_not_opened_after_a_sigkill_and_restart(
        tmp_path: Path, printer: EscposPrinterEmulator):
    """GIVEN the printer unplugged WHEN a till opens the drawer THEN 503; WHEN the agent is
    SIGKILLed, the printer replugged and the agent restarted THEN the printer is connected
    again and no drawer pulse was ever sent: nothing was stored, nothing is replayed."""
    config = write_config(tmp_path, extra=printer_entry(printer))
    async with aiohttp.ClientSession() as http:
        async with tillsync_run(config) as (proc, base):
            await until_state(http, base, "connected")
            await printer.unplug()
            code, body = await open_drawer(http, base)
            assert code == 503 and body["error"]["code"] == "device_unavailable"
            assert "drawer not opened" in body["error"]["message"]
            await kill(proc)
        assert printer.pulses == [] and ESC_P not in printer.received
        assert stored_events(config) == 0

        await printer.replug()
        async with tillsync_run(config) as (proc, base):
            await until_state(http, base, "connected")
            talked = len(printer.received)
            await asyncio.sleep(1.5)  # several status polls after the reconnect
            assert len(printer.received) > talked  # the agent kept talking to the printer
            assert printer.pulses == [] and ESC_P not in printer.received
            await kill(proc)
    assert stored_events(config) == 0


async def test_an_opened_drawer_is_not_opened_again_after_a_sigkill_and_restart(
        tmp_path: Path, printer: EscposPrinterEmulator):
    """GIVEN a drawer opened (200) WHEN the agent is SIGKILLed right after and restarted THEN
    the pulse was recorded exactly once, and no second ESC p reaches the printer."""
    config = write_config(tmp_path, extra=printer_entry(printer))
    once = [DrawerPulse(pin=2, on_ms=50, off_ms=240)]
    async with aiohttp.ClientSession() as http:
        async with tillsync_run(config) as (proc, base):
            await until_state(http, base, "connected")
            assert await open_drawer(http, base) == (200, {"status": "opened"})
            # 200 means the pulse was handed to the printer's socket; the emulator, in this
            # process, may read it just after the answer arrives.
            await until(lambda: bool(printer.pulses))
            assert printer.pulses == once
            await kill(proc)
        assert printer.received.count(ESC_P) == 1

        async with tillsync_run(config) as (proc, base):
            await until_state(http, base, "connected")
            await asyncio.sleep(1.5)
            assert printer.pulses == once
            assert printer.received.count(ESC_P) == 1
            await kill(proc)
    assert stored_events(config) == 0
