"""POST /v1/print in a real agent, printing on an emulated ESC/POS printer through the outbox.

Each job is printed exactly once, in order, after the printer comes back; a job whose expiry
passes while the printer cannot print is dead-lettered with the reason and never printed; the
same job_id never prints twice; an unconfirmed print is dead-lettered, not reprinted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.api import openapi_document
from agent.printing import PrinterSink, job_payload, read_job, render_lines
from agent.standin.cloud import StandinCloud
from drivers.base import DeviceRefused
from drivers.emulators.escpos_printer import EscposPrinterEmulator
from drivers.escpos.printer import EscposPrinterDriver, PrintInDoubt
from drivers.escpos.receipt import render_receipt
from outbox.classify import Action, classify
from outbox.models import Delivery
from outbox.relay import EXPIRED
from tests.agent.conftest import RunningAgent, StartAgent, printer_entry, sale
from tests.polling import until

DRIVERS = {"escpos": EscposPrinterDriver}
OPENAPI = json.loads(openapi_document())
DOCS = Path(__file__).resolve().parents[2] / "docs"



def printer_is(agent: RunningAgent, state: str) -> Callable[[], Any]:
    async def check() -> bool:
        [found] = [d for d in (await agent.status())["devices"] if d["name"] == "receipt"]
        return bool(found["state"] == state)
    return check


def valid(instance: Any, schema: str) -> None:
    jsonschema.validate(instance, {"$ref": f"#/components/schemas/{schema}",
                                   "components": OPENAPI["components"]})


async def print_job(agent: RunningAgent, who: str = "T01", **body: Any) -> tuple[int, Any]:
    code, answer = await agent.post("/v1/print", {"printer": "receipt", **body}, who=who)
    return code, answer


async def event(agent: RunningAgent, event_id: str) -> dict[str, Any]:
    code, body = await agent.get(f"/v1/outbox/{event_id}")
    assert code == 200, body
    return dict(body)


async def start(start_agent: StartAgent, printer: EscposPrinterEmulator, *,
                cloud: StandinCloud | None = None, extra: str = "") -> RunningAgent:
    agent = await start_agent(drivers=DRIVERS, sink_url=cloud.url if cloud else None,
                              extra=printer_entry(printer, extra=extra))
    await until(printer_is(agent, "connected"), 8.0)
    return agent


# -- what gets printed ------------------------------------------------------------------------


async def test_the_receipt_of_a_posted_transaction_prints_exactly_as_rendered(
        start_agent: StartAgent, printer: EscposPrinterEmulator, cloud: StandinCloud) -> None:
    agent = await start(start_agent, printer, cloud=cloud)
    txn = sale("T01", 7)
    code, _ = await agent.post("/v1/transactions", txn)
    assert code == 202
    code, body = await print_job(agent, transaction_id=txn["transaction_id"])
    assert code == 202, body
    valid(body, "PrintQueued")
    assert body["status"] == "queued"
    await printer.wait_for_jobs(1)
    assert printer.jobs[0].data == render_receipt(txn, width_mm=80, store_name="store-042")
    record = await event(agent, body["event_id"])
    assert record["kind"] == "print_job" and record["stream"] == "receipt"
    await until(lambda: _state_is(agent, body["event_id"], "delivered"), 8.0)
    sinks = {s["name"]: s for s in (await agent.status())["sinks"]}
    assert sinks["printer:receipt"]["state"] == "online"
    assert sinks["printer:receipt"]["pending"] == 0


async def test_a_receipt_for_a_sale_not_posted_here_uses_the_layout_of_the_printer(
        start_agent: StartAgent, printer: EscposPrinterEmulator) -> None:
    agent = await start(start_agent, printer, extra="receipt_width_mm = 58")
    txn = sale("T01", 3)  # never posted to /v1/transactions; the terminal's own id
    code, body = await print_job(agent, transaction=txn)
    assert code == 202, body
    await printer.wait_for_jobs(1)
    assert printer.jobs[0].data == render_receipt(txn, width_mm=58, store_name="store-042")


async def test_lines_print_as_plain_text_with_every_copy(
        start_agent: StartAgent, printer: EscposPrinterEmulator) -> None:
    agent = await start(start_agent, printer)
    lines = ["Z report", "Sales: € 1.234,50", ""]
    code, body = await print_job(agent, lines=lines, copies=2)
    assert code == 202, body
    await printer.wait_for_jobs(1)
    assert printer.jobs[0].data == render_lines(lines) * 2


# -- printed once -----------------------------------------------------------------------------


async def test_the_same_job_id_twice_is_one_job_and_one_print(
        start_agent: StartAgent, printer: EscposPrinterEmulator) -> None:
    agent = await start(start_agent, printer)
    code, first = await print_job(agent, lines=["once"], job_id="J-1")
    assert code == 202 and first["job_id"] == "J-1"
    await printer.wait_for_jobs(1)
    code, again = await print_job(agent, lines=["once"], job_id="J-1")
    assert (code, again) == (200, first)
    code, other = await print_job(agent, lines=["something else"], job_id="J-1")
    assert code == 409 and other["error"]["code"] == "conflict"
    code, _ = await print_job(agent, who="T02", lines=["once"], job_id="J-1")
    assert code == 202  # job ids are per terminal
    await printer.wait_for_jobs(2)
    await asyncio.sleep(0.5)
    assert len(printer.jobs) == 2


async def test_paper_out_mid_queue_loses_no_job_and_prints_each_once_in_order(
        start_agent: StartAgent, printer: EscposPrinterEmulator) -> None:
    agent = await start(start_agent, printer)
    code, _ = await print_job(agent, lines=["job 0"])
    assert code == 202
    await printer.wait_for_jobs(1)
    printer.paper_out = True
    await until(printer_is(agent, "error"), 8.0)
    for n in range(1, 5):
        code, _ = await print_job(agent, lines=[f"job {n}"], who="T01" if n % 2 else "T02")
        assert code == 202
    await asyncio.sleep(1.0)
    assert len(printer.jobs) == 1  # nothing printed, nothing half-sent while out of paper
    sinks = {s["name"]: s for s in (await agent.status())["sinks"]}
    assert sinks["printer:receipt"]["state"] == "offline"
    assert sinks["printer:receipt"]["pending"] == 4
    assert "paper out" in sinks["printer:receipt"]["last_error"]
    printer.paper_out = False
    await printer.wait_for_jobs(5, timeout_s=8)
    await asyncio.sleep(0.5)
    assert [job.data for job in printer.jobs] == [render_lines([f"job {n}"]) for n in range(5)]
    sinks = {s["name"]: s for s in (await agent.status())["sinks"]}
    assert sinks["printer:receipt"]["pending"] == 0 and sinks["printer:receipt"]["dead"] == 0


async def test_a_job_whose_expiry_passes_while_out_of_paper_never_prints(
        start_agent: StartAgent, printer: EscposPrinterEmulator) -> None:
    agent = await start(start_agent, printer)
    printer.paper_out = True
    await until(printer_is(agent, "error"), 8.0)
    code, short = await print_job(agent, lines=["stale"], expires_in_s=1)
    assert code == 202
    code, _ = await print_job(agent, lines=["fresh"])
    assert code == 202
    await asyncio.sleep(1.5)
    printer.paper_out = False
    await printer.wait_for_jobs(1, timeout_s=8)
    await asyncio.sleep(0.5)
    assert [job.data for job in printer.jobs] == [render_lines(["fresh"])]
    [delivery] = (await event(agent, short["event_id"]))["deliveries"]
    assert delivery["state"] == "dead" and EXPIRED in delivery["last_error"]
    code, dead = await agent.get("/v1/outbox?state=dead&sink=printer:receipt")
    assert code == 200 and [d["event_id"] for d in dead["deliveries"]] == [short["event_id"]]


# -- refusals ---------------------------------------------------------------------------------


async def test_unknown_printer_other_terminals_transaction_and_bad_bodies_are_refused(
        start_agent: StartAgent, printer: EscposPrinterEmulator, cloud: StandinCloud) -> None:
    agent = await start(start_agent, printer, cloud=cloud)
    txn = sale("T02", 1)
    assert (await agent.post("/v1/transactions", txn, who="T02"))[0] == 202
    code, body = await agent.post("/v1/print", {"printer": "kitchen", "lines": ["x"]})
    assert code == 404 and body["error"]["code"] == "printer_not_found"
    code, body = await print_job(agent, transaction_id=txn["transaction_id"])  # T01 asks
    assert code == 404 and body["error"]["code"] == "transaction_not_found"
    code, body = await print_job(agent, transaction_id="T01-nothing")
    assert code == 404 and body["error"]["code"] == "transaction_not_found"
    code, body = await print_job(agent, who="T02", transaction_id=txn["transaction_id"])
    assert code == 202, body
    code, body = await print_job(agent, lines=["x"], copies=0, expires_in_s=0)
    assert code == 422 and body["error"]["code"] == "validation_failed"
    assert {d["field"] for d in body["error"]["details"]} == {"copies", "expires_in_s"}
    code, body = await print_job(agent, lines=["x"], transaction_id="A")
    assert code == 422
    code, body = await print_job(agent, transaction={**sale("T01"), "total": "9.99"})
    assert code == 422 and any(d["field"].startswith("transaction.")
                               for d in body["error"]["details"])
    code, body = await print_job(agent, lines=["4111 1111 1111 1111"])
    assert code == 422 and body["error"]["code"] == "card_number_not_allowed"
    code, body = await print_job(agent, lines=["\x1b@"])
    assert code == 422
    code, body = await agent.post("/v1/print", {"printer": "receipt", "lines": ["x"]},
                                  who="status")
    assert code == 403
    await printer.wait_for_jobs(1)
    await asyncio.sleep(0.3)
    assert len(printer.jobs) == 1


async def test_an_inline_transaction_of_another_terminal_is_refused_as_a_posted_one_is(
        start_agent: StartAgent, printer: EscposPrinterEmulator) -> None:
    """GIVEN T01's token WHEN it asks to print a receipt for a sale whose terminal_id is T02
    THEN 403 terminal_mismatch, as POST /v1/transactions answers (CONTRACT §4: a terminal
    token posts only for its own terminal_id); nothing is queued or printed. It was 202."""
    agent = await start(start_agent, printer)
    code, body = await print_job(agent, transaction=sale("T02", 5), job_id="J-T02")
    assert code == 403, body
    valid(body, "Error")
    assert body["error"]["code"] == "terminal_mismatch"
    assert body["error"]["details"] == [{"field": "transaction.terminal_id",
                                         "code": "terminal_mismatch", "message": "must be T01"}]
    code, posted = await agent.post("/v1/transactions", sale("T02", 5), who="T01")
    assert code == 403 and posted["error"]["message"] == body["error"]["message"]
    code, queued = await agent.get("/v1/outbox?sink=printer:receipt")
    assert code == 200 and queued["deliveries"] == []
    code, body = await print_job(agent, who="T02", transaction=sale("T02", 5))
    assert code == 202, body  # its own terminal's sale
    await printer.wait_for_jobs(1)
    await asyncio.sleep(0.3)
    assert len(printer.jobs) == 1


def documented_codes() -> set[str]:
    """Every `code` named in docs/events.md "Errors" and in the print section of devices.md."""
    events = (DOCS / "events.md").read_text()
    devices = (DOCS / "devices.md").read_text()
    text = (events[events.index("## Errors"):events.index("## Examples")]
            + devices[devices.index("### Printing receipts"):devices.index("## Barcode")])
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", text))


BAD_JSON = [b'{"printer": ', b"\xff", b'["receipt"]', b'{"printer": "a", "printer": "b"}',
            b'{"printer": NaN}', b'{"printer": "\\ud800"}']


@pytest.mark.parametrize("raw", BAD_JSON)
async def test_a_print_body_that_is_not_one_json_object_is_refused_as_an_event_is(
        start_agent: StartAgent, raw: bytes) -> None:
    """GIVEN bytes that are not one JSON object WHEN posted to /v1/print and to
    /v1/transactions THEN the same 422 invalid_json with the same detail code (print said
    "invalid_json" where the events say "syntax_error")."""
    agent = await start_agent()
    code, printed = await agent.post("/v1/print", raw)
    assert code == 422, printed
    code, posted = await agent.post("/v1/transactions", raw)
    assert code == 422
    assert printed["error"]["code"] == posted["error"]["code"] == "invalid_json"
    assert printed["error"]["details"] == posted["error"]["details"]
    assert printed["error"]["details"][0]["code"] in documented_codes()


def _print(**fields: Any) -> dict[str, Any]:
    return {"printer": "receipt", **fields}


@pytest.mark.parametrize(("body", "code", "problems"), [
    (_print(lines=["\x1b@"]), "validation_failed", [("lines[0]", "invalid_format")]),
    (_print(lines=["x" * 1001]), "validation_failed", [("lines[0]", "too_long")]),
    (_print(lines=[5]), "validation_failed", [("lines[0]", "wrong_type")]),
    (_print(lines="x"), "validation_failed", [("lines", "wrong_type")]),
    (_print(lines=[]), "validation_failed", [("lines", "empty")]),
    (_print(lines=["x"] * 501), "validation_failed", [("lines", "too_many")]),
    ({"printer": "the receipt", "lines": ["x"]}, "validation_failed",
     [("printer", "invalid_format")]),
    ({"printer": 7, "lines": ["x"]}, "validation_failed", [("printer", "wrong_type")]),
    ({"lines": ["x"]}, "validation_failed", [("printer", "required")]),
    (_print(lines=["x"], job_id="a/b"), "validation_failed", [("job_id", "invalid_format")]),
    (_print(transaction_id=7), "validation_failed", [("transaction_id", "wrong_type")]),
    (_print(lines=["x"], copies=1.5), "validation_failed", [("copies", "wrong_type")]),
    (_print(lines=["x"], copies=11), "validation_failed", [("copies", "out_of_range")]),
    (_print(lines=["x"], expires_in_s="600"), "validation_failed",
     [("expires_in_s", "wrong_type")]),
    (_print(lines=["x"], expires_in_s=0), "validation_failed",
     [("expires_in_s", "out_of_range")]),
    (_print(lines=["x"], colour="red"), "validation_failed", [("colour", "unknown_field")]),
    (_print(), "validation_failed", [("", "one_source")]),
    (_print(lines=["x"], transaction_id="T01-1"), "validation_failed", [("", "one_source")]),
    (_print(transaction="T01-1"), "validation_failed", [("transaction", "wrong_type")]),
    (_print(transaction={**sale(), "total": "9.99"}), "validation_failed",
     [("transaction.total", "total_mismatch")]),
    (_print(transaction={**sale(), "currency": "EURO"}, copies=0), "validation_failed",
     [("copies", "out_of_range"), ("transaction.currency", "unknown_currency")]),
    (_print(lines=["4111 1111 1111 1111"]), "card_number_not_allowed",
     [("lines[0]", "card_number")]),
    (_print(transaction=sale(custom_fields={"c": "4111111111111111"})),
     "card_number_not_allowed", [("transaction.custom_fields.c", "card_number")]),
])
async def test_print_refusals_use_the_documented_codes_of_the_event_endpoints(
        start_agent: StartAgent, body: dict[str, Any], code: str,
        problems: list[tuple[str, str]]) -> None:
    """GIVEN a print body breaking one rule WHEN posted THEN 422 with the code and detail
    codes the event endpoints use (docs/events.md), "one_source" documented with print in
    docs/devices.md; print had its own "invalid" and "control_character"."""
    agent = await start_agent()
    status, answer = await agent.post("/v1/print", body)
    assert status == 422, answer
    valid(answer, "Error")
    assert answer["error"]["code"] == code
    found = [(d["field"], d["code"]) for d in answer["error"]["details"]]
    assert found == problems
    assert {c for _, c in found} | {code} <= documented_codes()
    assert "4111" not in json.dumps(answer)


async def test_a_print_field_sent_as_null_is_not_given(start_agent: StartAgent) -> None:
    agent = await start_agent()  # no printer: a body that passes the checks finds none
    code, body = await agent.post("/v1/print", _print(
        lines=["x"], transaction_id=None, transaction=None, job_id=None, copies=None,
        expires_in_s=None))
    assert code == 404 and body["error"]["code"] == "printer_not_found", body


async def test_a_disabled_printer_refuses_jobs(
        start_agent: StartAgent, printer: EscposPrinterEmulator) -> None:
    agent = await start_agent(drivers=DRIVERS,
                              extra=printer_entry(printer, extra="enabled = false"))
    code, body = await print_job(agent, lines=["x"])
    assert code == 409 and body["error"]["code"] == "printer_disabled"


# -- the sink's verdicts ----------------------------------------------------------------------


class _FakeDriver:
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.printed: list[bytes] = []

    async def print_job(self, data: bytes, *, job_id: str, timeout_s: float,
                        before_send: Any) -> None:
        if self.error is not None:
            raise self.error
        await before_send()
        self.printed.append(data)


async def _marked(delivery: Delivery) -> None:
    """Stands in for Outbox.mark_sent: these tests are about the sink's verdicts."""


class _FakeManager:
    def __init__(self, driver: _FakeDriver) -> None:
        self.driver = driver

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[_FakeDriver]:
        yield self.driver


def _delivery(*, expires_at: float | None = None) -> Delivery:
    payload = job_payload("s", printer="receipt", terminal_id="T01", job_id="J", copies=1,
                          source={"type": "lines"}, data=b"hello")
    assert read_job(payload).output == b"hello"
    return Delivery(1, "printer:receipt", "receipt", "print_job", "k", payload, 0, False,
                    time.time(), expires_at)


@pytest.mark.parametrize(("error", "action"), [
    (None, Action.DELIVERED),
    (DeviceRefused("paper out"), Action.RETRY),
    (PrintInDoubt("job not confirmed within 30 s"), Action.DEAD),
])
async def test_the_printer_sink_reports_what_the_relay_should_do(error: Exception | None,
                                                                 action: Action) -> None:
    sink = PrinterSink("receipt", _FakeManager(_FakeDriver(error)), _marked)  # type: ignore[arg-type]
    outcome = classify(await sink.deliver(_delivery()))
    assert outcome.action is action
    if error is None:
        return
    assert not outcome.in_doubt  # an unconfirmed print is never retried: it could print twice
    if action is Action.DEAD:
        assert "not reprinted" in outcome.reason


async def test_the_printer_sink_does_not_print_a_job_that_expired_while_it_waited() -> None:
    driver = _FakeDriver(None)
    sink = PrinterSink("receipt", _FakeManager(driver), _marked)  # type: ignore[arg-type]
    outcome = classify(await sink.deliver(_delivery(expires_at=time.time() - 1)))
    assert outcome.action is Action.DEAD and EXPIRED in outcome.reason
    assert driver.printed == []


async def _state_is(agent: RunningAgent, event_id: str, state: str) -> bool:
    [delivery] = (await event(agent, event_id))["deliveries"]
    return bool(delivery["state"] == state)
