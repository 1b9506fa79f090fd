"""Devices in a real agent: an emulated ESC/POS printer on 127.0.0.1 and a Toledo scale on a pty.

Status, /v1/devices and tillsync_device_up follow the printer through paper-out, unplug and
replug; the drawer opens with the configured pulse, or fails with the printer's state and is
never opened later; the scale's weight is returned only when stable.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from agent.api import openapi_document
from drivers.emulators.escpos_printer import DrawerPulse, EscposPrinterEmulator
from drivers.emulators.scale import MettlerToledo8217ScaleEmulator
from drivers.escpos.printer import EscposPrinterDriver
from drivers.scale import MettlerToledo8217ScaleDriver
from tests.agent.conftest import FAST_DEVICE, RunningAgent, StartAgent, printer_entry
from tests.polling import until

DRIVERS = {"escpos": EscposPrinterDriver, "toledo8217": MettlerToledo8217ScaleDriver}
OPENAPI = json.loads(openapi_document())




@pytest.fixture
def scale(tmp_path: Path):
    emulator = MettlerToledo8217ScaleEmulator(tmp_path / "ttyScale0")
    emulator.plug()
    yield emulator
    emulator.close()


def valid(instance: Any, schema: str) -> None:
    jsonschema.validate(instance, {"$ref": f"#/components/schemas/{schema}",
                                   "components": _nullable(OPENAPI["components"])})


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
        return {"anyOf": [out, {"type": "null"}]} if node.get("nullable") else out
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


async def device(agent: RunningAgent, name: str = "receipt") -> dict[str, Any]:
    status = await agent.status()
    [found] = [d for d in status["devices"] if d["name"] == name]
    return dict(found)


def state_is(agent: RunningAgent, state: str, name: str = "receipt") -> Callable[[], Any]:
    async def check() -> bool:
        return (await device(agent, name))["state"] == state
    return check


async def device_up(agent: RunningAgent) -> dict[str, float]:
    code, text = await agent.get("/metrics")
    assert code == 200
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^tillsync_device_up\{device="([^"]+)",kind="[^"]+"\} (\S+)$', text, re.M)}


async def drawer(agent: RunningAgent, name: str = "receipt",
                 who: str = "T01", **kwargs: Any) -> tuple[int, Any]:
    return await agent.post(f"/v1/devices/{name}/drawer", {}, who=who, **kwargs)


# -- status -----------------------------------------------------------------------------------


async def test_a_configured_printer_shows_connected_in_status_devices_and_metrics(
        start_agent: StartAgent, printer: EscposPrinterEmulator):
    agent = await start_agent(drivers=DRIVERS, extra=printer_entry(printer))
    await until(state_is(agent, "connected"))
    status = await agent.status()
    assert status["status"] == "ok"
    [entry] = status["devices"]
    assert (entry["name"], entry["kind"], entry["detail"]) == ("receipt", "printer", None)
    valid(entry, "Device")
    assert entry["since"].endswith("Z")
    code, listed = await agent.get("/v1/devices", who="T01")
    assert code == 200 and listed == {"devices": status["devices"]}
    assert await device_up(agent) == {"receipt": 1.0}


async def test_paper_out_shows_its_detail_and_degrades_status_until_paper_is_back(
        start_agent: StartAgent, printer: EscposPrinterEmulator):
    agent = await start_agent(drivers=DRIVERS, extra=printer_entry(printer))
    await until(state_is(agent, "connected"))
    printer.paper_out = True
    await until(state_is(agent, "error"))
    status = await agent.status()
    assert status["devices"][0]["detail"] == "paper out"
    assert status["status"] == "degraded"
    assert "device receipt error: paper out" in status["reasons"]
    assert await device_up(agent) == {"receipt": 0.0}
    printer.paper_out = False
    printer.paper_near_end = True
    await until(state_is(agent, "connected"))
    status = await agent.status()
    assert status["devices"][0]["detail"] == "paper near end" and status["status"] == "ok"


async def test_an_unplugged_printer_is_disconnected_within_seconds_and_back_within_2_s(
        start_agent: StartAgent, printer: EscposPrinterEmulator):
    agent = await start_agent(drivers=DRIVERS, extra=printer_entry(printer))
    await until(state_is(agent, "connected"))
    connected_since = (await device(agent))["since"]
    await printer.unplug()
    took = await until(state_is(agent, "disconnected"), timeout_s=5)
    assert took < 3
    entry = await device(agent)
    assert entry["detail"].startswith("unreachable") and entry["since"] != connected_since
    status = await agent.status()
    assert status["status"] == "degraded" and await device_up(agent) == {"receipt": 0.0}
    await asyncio.sleep(1.0)  # let the reconnect backoff reach its cap
    await printer.replug()
    took = await until(state_is(agent, "connected"), timeout_s=5)
    assert took < 2
    assert await device_up(agent) == {"receipt": 1.0}


async def test_a_silent_printer_is_not_responding_never_ok(
        start_agent: StartAgent, printer: EscposPrinterEmulator):
    agent = await start_agent(drivers=DRIVERS, extra=printer_entry(printer))
    await until(state_is(agent, "connected"))
    printer.silent = True
    await until(state_is(agent, "disconnected"))
    assert (await device(agent))["detail"] == "not responding"


async def test_a_disabled_device_is_shown_disabled_and_left_alone(
        start_agent: StartAgent, printer: EscposPrinterEmulator):
    agent = await start_agent(drivers=DRIVERS,
                              extra=printer_entry(printer, extra="enabled = false"))
    await asyncio.sleep(0.5)
    status = await agent.status()
    assert status["devices"][0]["state"] == "disabled" and status["status"] == "ok"
    assert printer.connections == 0
    code, body = await drawer(agent)
    assert code == 503 and body["error"]["code"] == "device_unavailable"
    assert body["error"]["details"][0]["state"] == "disabled"


async def test_a_device_without_an_installed_driver_is_an_error_and_the_agent_still_runs(
        start_agent: StartAgent, printer: EscposPrinterEmulator):
    agent = await start_agent(drivers={}, extra=printer_entry(printer))
    entry = await device(agent)
    assert entry["state"] == "error"
    assert entry["detail"] == "device 'receipt': unknown type 'escpos' (known: none registered)"


# -- the drawer -------------------------------------------------------------------------------


async def test_the_drawer_opens_at_once_with_the_configured_pin_and_timing(
        start_agent: StartAgent, printer: EscposPrinterEmulator):
    extra = "drawer_pin = 5\ndrawer_on_ms = 60\ndrawer_off_ms = 300"
    agent = await start_agent(drivers=DRIVERS, extra=printer_entry(printer, extra=extra))
    await until(state_is(agent, "connected"))
    code, body = await drawer(agent)
    assert (code, body) == (200, {"status": "opened"})
    assert printer.pulses == [DrawerPulse(pin=5, on_ms=60, off_ms=300)]


async def test_the_drawer_opens_even_before_the_first_status_check_finished(
        start_agent: StartAgent, printer: EscposPrinterEmulator):
    agent = await start_agent(drivers=DRIVERS, extra=printer_entry(printer))
    code, body = await drawer(agent)
    assert (code, body) == (200, {"status": "opened"})
    assert printer.pulses == [DrawerPulse(pin=2, on_ms=50, off_ms=240)]


async def test_a_drawer_request_the_till_gave_up_on_while_a_receipt_printed_never_opens(
        start_agent: StartAgent, printer: EscposPrinterEmulator):
    """GIVEN the printer busy with a receipt (paper ran out mid-job, so the agent holds it
    waiting for completion) WHEN a till asks for the drawer and gives up after 1 s, and the
    receipt then finishes THEN no drawer pulse is sent: nobody is waiting for that drawer
    any more. A request made while someone waits still opens it."""
    agent = await start_agent(drivers=DRIVERS, extra=printer_entry(printer))
    await until(state_is(agent, "connected"))
    printer.run_out_on_next_print = True
    code, body = await agent.post("/v1/print", {"printer": "receipt", "lines": ["busy"]})
    assert code == 202, body
    await until(lambda: b"busy" in printer.received, 5, what="the receipt's bytes")
    with pytest.raises(TimeoutError):
        await drawer(agent, timeout=aiohttp.ClientTimeout(total=1.0))
    printer.paper_out = False  # the receipt completes; the printer is free again
    await printer.wait_for_jobs(1)
    await asyncio.sleep(0.5)
    assert printer.pulses == []
    assert await drawer(agent) == (200, {"status": "opened"})
    assert len(printer.pulses) == 1


async def test_a_drawer_request_to_an_unplugged_printer_is_503_and_never_opens_later(
        start_agent: StartAgent, printer: EscposPrinterEmulator):
    agent = await start_agent(drivers=DRIVERS, extra=printer_entry(printer))
    await until(state_is(agent, "connected"))
    await printer.unplug()
    code, body = await drawer(agent)
    assert code == 503 and body["error"]["code"] == "device_unavailable"
    assert body["error"]["details"] == [{"device": "receipt", "state": "disconnected",
                                         "detail": body["error"]["details"][0]["detail"]}]
    assert "drawer not opened" in body["error"]["message"]
    await printer.replug()
    await until(state_is(agent, "connected"))
    await asyncio.sleep(1.0)  # several polls and reconnects: nothing may be replayed
    assert printer.pulses == []
    # ... nor after a restart of the agent.
    agent.stop.set()
    await agent.task
    again = await start_agent(drivers=DRIVERS, extra=printer_entry(printer))
    await until(state_is(again, "connected"))
    await asyncio.sleep(0.5)
    assert printer.pulses == []


async def test_a_drawer_request_while_the_cover_is_open_is_refused_with_the_printers_state(
        start_agent: StartAgent, printer: EscposPrinterEmulator):
    agent = await start_agent(drivers=DRIVERS, extra=printer_entry(printer))
    await until(state_is(agent, "connected"))
    printer.cover_open = True
    code, body = await drawer(agent)
    assert code == 409 and body["error"]["code"] == "device_refused"
    assert "cover open" in body["error"]["message"]
    assert body["error"]["details"] == [{"device": "receipt", "state": "error",
                                         "detail": "cover open"}]
    printer.cover_open = False
    await until(state_is(agent, "connected"))
    await asyncio.sleep(0.5)
    assert printer.pulses == []  # ESC p was never sent, so the printer cannot fire it late


async def test_drawer_requests_name_a_known_printer_and_need_a_terminal_token(
        start_agent: StartAgent, printer: EscposPrinterEmulator, scale):
    scale_entry = f'[[devices]]\nname = "scale"\ntype = "scale"\nurl = "{scale.url}"\n{FAST_DEVICE}'
    agent = await start_agent(drivers=DRIVERS, extra=printer_entry(printer) + scale_entry)
    code, body = await drawer(agent, "nope")
    assert code == 404 and body["error"]["code"] == "not_found"
    code, body = await drawer(agent, "scale")
    assert code == 409 and body["error"]["code"] == "device_not_a_printer"
    code, body = await drawer(agent, who="status")
    assert code == 403 and body["error"]["code"] == "forbidden"
    async with agent.http.post(agent.url + "/v1/devices/receipt/drawer") as resp:
        assert resp.status == 401
    assert printer.pulses == []


# -- the scale --------------------------------------------------------------------------------


async def test_a_stable_weight_is_returned_and_a_moving_one_is_409_weight_unstable(
        start_agent: StartAgent, scale, printer: EscposPrinterEmulator):
    scale_entry = f'[[devices]]\nname = "scale"\ntype = "scale"\nurl = "{scale.url}"\n{FAST_DEVICE}'
    agent = await start_agent(drivers=DRIVERS, extra=scale_entry + printer_entry(printer))
    await until(state_is(agent, "connected", "scale"))
    scale.set_weight("1.234")
    code, body = await agent.get("/v1/devices/scale/weight", who="T01")
    assert code == 200, body
    assert body == {"device": "scale", "weight": "1.234", "unit": "kg", "net": False,
                    "zero": False}
    valid(body, "Weight")
    scale.motion(True)
    code, body = await agent.get("/v1/devices/scale/weight", who="T01")
    assert code == 409 and body["error"]["code"] == "weight_unstable"
    valid(body, "Error")
    scale.over(True)
    scale.motion(False)
    code, body = await agent.get("/v1/devices/scale/weight", who="T01")
    assert code == 409 and body["error"]["code"] == "device_refused"
    assert "over capacity" in body["error"]["message"]
    code, body = await agent.get("/v1/devices/receipt/weight", who="T01")
    assert code == 409 and body["error"]["code"] == "device_not_a_scale"
    code, body = await agent.get("/v1/devices/scale/weight?wait_s=99", who="T01")
    assert code == 422


async def test_a_weight_read_can_wait_for_the_platter_to_settle(start_agent: StartAgent, scale):
    scale_entry = f'[[devices]]\nname = "scale"\ntype = "scale"\nurl = "{scale.url}"\n{FAST_DEVICE}'
    agent = await start_agent(drivers=DRIVERS, extra=scale_entry)
    scale.set_weight("0.500")
    scale.motion(True)
    asyncio.get_running_loop().call_later(0.5, scale.motion, False)
    code, body = await agent.get("/v1/devices/scale/weight?wait_s=3", who="T01")
    assert code == 200 and body["weight"] == "0.500"


async def test_an_unplugged_scale_is_503_device_unavailable(start_agent: StartAgent, scale):
    scale_entry = f'[[devices]]\nname = "scale"\ntype = "scale"\nurl = "{scale.url}"\n{FAST_DEVICE}'
    agent = await start_agent(drivers=DRIVERS, extra=scale_entry)
    await until(state_is(agent, "connected", "scale"))
    scale.unplug()
    code, body = await agent.get("/v1/devices/scale/weight", who="T01")
    assert code == 503 and body["error"]["code"] == "device_unavailable"
    assert body["error"]["details"][0]["state"] == "disconnected"
    scale.plug()
    await until(state_is(agent, "connected", "scale"), timeout_s=3)


# -- configuration ----------------------------------------------------------------------------


def load_devices(tmp_path: Path, entries: str):
    from agent.config import parse_config

    text = (f'[store]\nid = "s"\n[api]\nstatus_token = "t"\n'
            f'[outbox]\npath = "o.db"\nkey_file = "o.key"\n{entries}')
    return parse_config(text, source="agent.toml", base_dir=tmp_path)


def test_every_device_type_becomes_a_spec_its_driver_accepts(tmp_path: Path):
    from agent.devices import device_spec
    from drivers.scanner import SerialScannerDriver

    config = load_devices(tmp_path, (
        '[[devices]]\nname = "p"\ntype = "escpos"\nurl = "tcp://10.0.0.5:9100"\n'
        'drawer_pin = 5\ndrawer_open_when = "low"\n'
        '[[devices]]\nname = "s"\ntype = "scanner"\nurl = "serial:///dev/ttyACM0"\n'
        'suffix = "CRLF"\n'
        '[[devices]]\nname = "w"\ntype = "scale"\nurl = "serial:///dev/ttyUSB0"\n'
        'protocol = "nci"\nunit = "kg"\n'))
    printer, scanner, scale = (device_spec(d) for d in config.devices)
    assert (printer.type, printer.options["drawer_pin"]) == ("escpos", 5)
    assert EscposPrinterDriver(printer).options["drawer_open_when"] == "low"
    assert (scanner.type, scanner.options["suffix"]) == ("scanner", "CRLF")
    SerialScannerDriver(scanner)  # refuses unknown options: the config adds none
    assert (scale.type, scale.options) == ("nci", {"unit": "kg"})
    assert [d.kind for d in config.devices] == ["printer", "scanner", "scale"]


@pytest.mark.parametrize(("entry", "expected"), [
    ('drawer_on_ms = 100\ndrawer_off_ms = 100',
     "devices[0].drawer_on_ms: drawer duty cycle 100/200 ms exceeds 20%: make the off time at "
     "least 400 ms"),
    ("drawer_pin = 3", "devices[0].drawer_pin: must be 2 or 5 (got 3)"),
    ("poll_s = 0", "devices[0].poll_s: must be greater than 0 (got 0)"),
])
def test_bad_device_settings_fail_at_load_naming_the_key(tmp_path: Path, entry: str,
                                                         expected: str):
    from agent.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_devices(tmp_path, '[[devices]]\nname = "p"\ntype = "escpos"\n'
                               f'url = "tcp://h:9100"\n{entry}\n')
    assert caught.value.problems == [f"agent.toml: {expected}"]


def test_a_bad_device_url_is_refused_at_load_naming_the_wrong_part(tmp_path: Path):
    from agent.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_devices(tmp_path, '[[devices]]\nname = "p"\ntype = "escpos"\n'
                               'url = "tcp://h:99999"\n')
    [problem] = caught.value.problems
    assert problem.startswith("agent.toml: devices[0].url: ") and "99999" in problem
