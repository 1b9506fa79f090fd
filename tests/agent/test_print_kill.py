"""Print jobs across a SIGKILL of ``tillsync run``: a receipt never prints twice.

A real agent process drives an emulated ESC/POS printer on 127.0.0.1. The job's bytes reach
the printer, which runs out of paper before finishing it (so the agent is still waiting for
its confirmation), and the agent is killed without warning. The printer keeps those bytes
and prints them once paper is loaded; the restarted agent must not send them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from drivers.emulators.escpos_printer import EscposPrinterEmulator
from tests.agent.conftest import STATUS_TOKEN, TOKENS, printer_entry, write_config
from tests.agent.test_daemon import tillsync_run
from tests.agent.test_drawer_kill import kill, until_state
from tests.polling import until

MARK = b"KILLED-WHILE-PRINTING-0001"


async def printer_deliveries(http: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    async with http.get(f"{base}/v1/outbox", params={"sink": "printer:receipt"},
                        headers={"Authorization": f"Bearer {STATUS_TOKEN}"}) as resp:
        assert resp.status == 200
        return list((await resp.json())["deliveries"])


async def test_a_job_sent_before_a_sigkill_is_not_printed_again_after_the_restart(
        tmp_path: Path, printer: EscposPrinterEmulator):
    """GIVEN a print job whose bytes reached the printer, unconfirmed (paper ran out mid-job)
    WHEN the agent is SIGKILLed, paper loaded and the agent restarted THEN the printer
    received the job's bytes exactly once; the job is dead-lettered saying it was not
    reprinted, for an operator to reprint on purpose."""
    config = write_config(tmp_path, extra=printer_entry(printer))
    job = {"printer": "receipt", "lines": [MARK.decode()], "job_id": "J-1"}
    async with aiohttp.ClientSession() as http:
        async with tillsync_run(config) as (proc, base):
            await until_state(http, base, "connected")
            printer.run_out_on_next_print = True
            async with http.post(f"{base}/v1/print", json=job,
                                 headers={"Authorization": f"Bearer {TOKENS['T01']}"}) as resp:
                assert resp.status == 202, await resp.text()
            await until(lambda: MARK in printer.received, 10, what="the job's bytes")
            assert printer.state.paper_out and printer.jobs == []  # held, unconfirmed
            await kill(proc)

        printer.paper_out = False  # loaded: the printer finishes what it holds
        async with tillsync_run(config) as (proc, base):
            await until_state(http, base, "connected")

            async def settled() -> bool:
                [delivery] = await printer_deliveries(http, base)
                return bool(delivery["state"] == "dead")

            await until(settled, 15, what="the job settled")
            [delivery] = await printer_deliveries(http, base)
            assert "not reprinted" in delivery["last_error"]
            assert bytes(printer.received).count(MARK) == 1
            await kill(proc)
