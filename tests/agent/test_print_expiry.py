"""A print job expires on time even when its printer never comes back (CONTRACT §4: "A job
that could not print before it expires is dropped with a reason, never printed late")."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable

from drivers.escpos.printer import EscposPrinterDriver
from outbox.relay import EXPIRED
from tests.agent.conftest import FAST_DEVICE, StartAgent
from tests.polling import until


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


JOBS = 5


async def test_jobs_for_a_printer_that_stays_unplugged_are_dropped_when_they_expire(
        start_agent: StartAgent) -> None:
    """GIVEN a printer that is unreachable from the start and stays so
    WHEN five jobs with expires_in_s = 2 are queued on it
    THEN within a few seconds of their expiry all five are dead with the reason
    "expired", no longer counted as pending, without the printer ever coming back.

    The relay checks an expiry before each attempt; an unplugged printer is probed with
    backoff, and a job found expired is dropped without waiting for the next probe. An
    audit reported an expired job left pending until the printer returned; this pins the
    behaviour for the unreachable-printer case (a hung printer that accepts and never
    answers behaved the same when tried by hand)."""
    printer = (f'[[devices]]\nname = "receipt"\ntype = "escpos"\n'
               f'url = "tcp://127.0.0.1:{closed_port()}"\n{FAST_DEVICE}'
               "status_timeout_s = 0.5\nconnect_timeout_s = 1\n")
    agent = await start_agent(drivers={"escpos": EscposPrinterDriver}, extra=printer)
    jobs = []
    for n in range(JOBS):
        code, job = await agent.post("/v1/print", {"printer": "receipt", "lines": [f"late {n}"],
                                                   "expires_in_s": 2})
        assert code == 202, job
        jobs.append(job["event_id"])
    queued = time.monotonic()

    async def states() -> list[str]:
        found = []
        for event_id in jobs:
            code, record = await agent.get(f"/v1/outbox/{event_id}")
            assert code == 200, record
            found.append(record["deliveries"][0]["state"])
        return found

    await asyncio.sleep(1.0)
    assert "dead" not in await states(), "nothing expires before its time"
    await until(lambda: _all_dead(states), 2.0 + 3.0,
                what="every expired job to be dead-lettered")
    assert time.monotonic() - queued >= 2.0
    for event_id in jobs:
        code, record = await agent.get(f"/v1/outbox/{event_id}")
        assert EXPIRED in record["deliveries"][0]["last_error"]
    sinks = {s["name"]: s for s in (await agent.status())["sinks"]}
    assert sinks["printer:receipt"]["pending"] == 0
    assert sinks["printer:receipt"]["dead"] == JOBS


async def _all_dead(states: Callable[[], Awaitable[list[str]]]) -> bool:
    return set(await states()) == {"dead"}
