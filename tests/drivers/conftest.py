"""Fixtures for the printer driver tests: an emulated ESC/POS printer on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from drivers.emulators.escpos_printer import EscposPrinterEmulator


@pytest.fixture
async def escpos_printer() -> AsyncIterator[EscposPrinterEmulator]:
    emulator = EscposPrinterEmulator(idle_timeout_s=5.0)
    await emulator.start()
    try:
        yield emulator
    finally:
        await emulator.stop()
