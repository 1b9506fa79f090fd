"""GET /v1/events/stream: a real agent over HTTP, a ScannerEmulator and a Toledo scale on ptys.

Scans, device changes and stable weights arrive as SSE events; a terminal that reconnects with
Last-Event-ID gets what it missed; a client that stops reading loses its oldest events (and is
told how many) without holding up anyone else; only terminal tokens are admitted.

The route is added by ``agent.stream.register``; until ``build_app`` calls it, the ``wired``
fixture does (and gives the route its "terminal" role), so these tests pass before and after.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from aiohttp import web

import agent.api
import agent.runtime
from agent import stream
from agent.api import openapi_document
from agent.stream import HUB, OPENAPI_PATH, PATH, EventHub
from drivers.emulators.scale import MettlerToledo8217ScaleEmulator
from drivers.emulators.scanner import ScannerEmulator
from drivers.manager import DeviceManager
from drivers.scale import MettlerToledo8217ScaleDriver
from drivers.scanner import SerialScannerDriver
from tests.agent.conftest import FAST_DEVICE, TOKENS, RunningAgent, StartAgent
from tests.polling import until

DRIVERS = {"scanner": SerialScannerDriver, "toledo8217": MettlerToledo8217ScaleDriver}
EAN = ["4006381333931", "5901234123457", "9780306406157"]  # valid check digits


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def apps(monkeypatch: pytest.MonkeyPatch) -> list[web.Application]:
    """Wire the route if build_app does not yet, and collect the apps the agents build."""
    built: list[web.Application] = []
    original = agent.api.build_app  # what runtime imported, wired or not yet

    def build_app(the_agent: Any) -> web.Application:
        app = original(the_agent)
        if not any(r.resource is not None and r.resource.canonical == PATH
                   for r in app.router.routes()):
            stream.register(app)
        built.append(app)
        return app

    monkeypatch.setattr(agent.runtime, "build_app", build_app)
    monkeypatch.setitem(agent.api.ROLES, ("GET", PATH), "terminal")
    return built


@pytest.fixture
def scanner(tmp_path: Path) -> Iterator[ScannerEmulator]:
    emulator = ScannerEmulator(tmp_path / "ttyScanner0")
    emulator.plug()
    yield emulator
    emulator.close()


@pytest.fixture
def scale(tmp_path: Path) -> Iterator[MettlerToledo8217ScaleEmulator]:
    emulator = MettlerToledo8217ScaleEmulator(tmp_path / "ttyScale0")
    emulator.plug()
    yield emulator
    emulator.close()


def entry(name: str, type_: str, url: str) -> str:
    return f'[[devices]]\nname = "{name}"\ntype = "{type_}"\nurl = "{url}"\n{FAST_DEVICE}\n'


async def device_state(agent_: RunningAgent, name: str) -> str:
    [found] = [d for d in (await agent_.status())["devices"] if d["name"] == name]
    return str(found["state"])


async def connected(agent_: RunningAgent, name: str, timeout_s: float = 5.0) -> None:
    start = time.monotonic()
    while await device_state(agent_, name) != "connected":
        assert time.monotonic() - start < timeout_s, f"{name} never connected"
        await asyncio.sleep(0.05)


async def scanner_agent(start_agent: StartAgent, scanner: ScannerEmulator,
                        apps: list[web.Application]) -> tuple[RunningAgent, EventHub]:
    running = await start_agent(drivers=DRIVERS, extra=entry("scanner", "scanner", scanner.url))
    await connected(running, "scanner")
    return running, apps[-1][HUB]


# -- an SSE client ----------------------------------------------------------------------------


class Sse:
    """Reads an event stream block by block (fields of one block, comments kept apart)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments: list[str] = []
        self.retry: int | None = None

    async def block(self, timeout_s: float = 5.0) -> dict[str, str]:
        fields: dict[str, str] = {}
        async with asyncio.timeout(timeout_s):
            while True:
                line = await self.resp.content.readline()
                if not line:
                    raise EOFError("the stream ended")
                text = line.decode().rstrip("\r\n")
                if not text:
                    if fields:
                        return fields
                    continue
                if text.startswith(":"):
                    self.comments.append(text[1:].strip())
                    return {"comment": text[1:].strip()}
                name, _, value = text.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value

    async def next(self, kind: str | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
        """The next event (of ``kind``), skipping comments and the retry block."""
        deadline = time.monotonic() + timeout_s
        while True:
            fields = await self.block(max(0.01, deadline - time.monotonic()))
            if "retry" in fields:
                self.retry = int(fields["retry"])
            if "event" not in fields or (kind is not None and fields["event"] != kind):
                continue
            return {"id": int(fields["id"]) if "id" in fields else None,
                    "event": fields["event"], "data": json.loads(fields["data"])}


@asynccontextmanager
async def sse(agent_: RunningAgent, who: str = "T01",
              headers: dict[str, str] | None = None) -> AsyncIterator[Sse]:
    async with agent_.http.get(agent_.url + PATH, headers={**agent_.auth(who), **(headers or {})},
                               timeout=aiohttp.ClientTimeout(total=None)) as resp:
        assert resp.status == 200, await resp.text()
        yield Sse(resp)


def valid(kind: str, data: dict[str, Any]) -> None:
    jsonschema.validate(data, _nullable(stream.EVENT_SCHEMAS[kind]))


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
        return {"anyOf": [out, {"type": "null"}]} if node.get("nullable") else out
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


# -- scans and device changes -----------------------------------------------------------------


async def test_a_scan_arrives_as_a_scan_event_with_code_and_symbology(
        start_agent: StartAgent, scanner: ScannerEmulator, apps: list[web.Application]) -> None:
    running, hub = await scanner_agent(start_agent, scanner, apps)
    async with sse(running) as events:
        assert events.resp.headers["Content-Type"].startswith("text/event-stream")
        assert events.resp.headers["Cache-Control"].startswith("no-cache")
        await until(lambda: hub.client_count == 1)
        scanner.scan(EAN[0], "]E0", split=5)  # split across reads: still one scan
        event = await events.next()
        assert events.retry == 2000
        assert event["event"] == "scan" and isinstance(event["id"], int)
        data = event["data"]
        assert (data["device"], data["code"], data["symbology"], data["aim"], data["error"]) == (
            "scanner", EAN[0], "EAN-13", "]E0", None)
        assert data["gtin"] == "0" + EAN[0]
        valid("scan", data)
        scanner.scan("ABC-123", "]C0")
        second = await events.next("scan")
        assert (second["data"]["code"], second["data"]["symbology"]) == ("ABC-123", "Code 128")
        assert second["id"] == event["id"] + 1


async def test_an_unplug_and_replug_arrive_as_device_events(
        start_agent: StartAgent, scanner: ScannerEmulator, apps: list[web.Application]) -> None:
    running, hub = await scanner_agent(start_agent, scanner, apps)
    async with sse(running) as events:
        await until(lambda: hub.client_count == 1)
        scanner.unplug()
        down = await events.next("device")
        assert (down["data"]["device"], down["data"]["kind"], down["data"]["state"],
                down["data"]["previous_state"]) == ("scanner", "scanner", "disconnected",
                                                    "connected")
        assert down["data"]["since"].endswith("Z")
        valid("device", down["data"])
        scanner.plug()
        up = await events.next("device")
        assert (up["data"]["state"], up["data"]["previous_state"]) == ("connected",
                                                                        "disconnected")
        assert up["id"] > down["id"]
        scanner.scan(EAN[1])  # the scan subscription survived the unplug
        assert (await events.next("scan"))["data"]["code"] == EAN[1]


async def test_a_reconnect_with_last_event_id_gets_the_missed_events_in_order(
        start_agent: StartAgent, scanner: ScannerEmulator, apps: list[web.Application]) -> None:
    running, hub = await scanner_agent(start_agent, scanner, apps)
    async with sse(running) as events:
        await until(lambda: hub.client_count == 1)
        scanner.scan(EAN[0])
        seen = await events.next("scan")
    await until(lambda: hub.client_count == 0)  # the hub noticed, and removed its queue
    scanner.scan(EAN[1])
    scanner.scan(EAN[2], "]E0")
    await until(lambda: hub.last_id == seen["id"] + 2)
    async with sse(running, headers={"Last-Event-ID": str(seen["id"])}) as events:
        missed = [await events.next(), await events.next()]  # no "dropped" notice first
        assert [(e["event"], e["data"]["code"]) for e in missed] == [("scan", EAN[1]),
                                                                      ("scan", EAN[2])]
        assert [e["id"] for e in missed] == [seen["id"] + 1, seen["id"] + 2]
        scanner.scan("LIVE-1", "]C0")  # then live events follow, without a gap or a repeat
        live = await events.next()
        assert (live["id"], live["data"]["code"]) == (seen["id"] + 3, "LIVE-1")
    # Without Last-Event-ID, nothing old is replayed: the first event is the next scan.
    async with sse(running) as events:
        await until(lambda: hub.client_count == 1)
        scanner.scan("LIVE-2", "]C0")
        assert (await events.next())["data"]["code"] == "LIVE-2"


async def test_a_closed_client_is_removed_and_shutdown_ends_open_streams_at_once(
        start_agent: StartAgent, scanner: ScannerEmulator, apps: list[web.Application]) -> None:
    running, hub = await scanner_agent(start_agent, scanner, apps)
    async with sse(running) as events:
        await until(lambda: hub.client_count == 1)
        async with sse(running, who="T02"):
            await until(lambda: hub.client_count == 2)
        await until(lambda: hub.client_count == 1, timeout_s=3)
        started = time.monotonic()
        running.stop.set()
        with pytest.raises(EOFError):
            await events.next(timeout_s=5)
        await asyncio.wait_for(running.task, 5)
        assert time.monotonic() - started < 5  # not the 20 s shutdown budget
    assert hub.client_count == 0


async def test_a_quiet_stream_sends_keepalive_comments(
        start_agent: StartAgent, scanner: ScannerEmulator, apps: list[web.Application]) -> None:
    running, hub = await scanner_agent(start_agent, scanner, apps)
    hub.keepalive_s = 0.3
    async with sse(running) as events:
        assert await events.block() == {"retry": "2000"}
        assert await events.block(timeout_s=2) == {"comment": "keepalive"}
        assert await events.block(timeout_s=2) == {"comment": "keepalive"}


# -- slow clients -----------------------------------------------------------------------------


async def _stalled_client(running: RunningAgent, who: str) -> socket.socket:
    """A stream client that never reads, with a tiny receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", running.config.api.port))
    request = (f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{running.config.api.port}\r\n"
               f"Authorization: Bearer {TOKENS[who]}\r\nAccept: text/event-stream\r\n\r\n")
    await loop.sock_sendall(sock, request.encode())
    return sock


async def _flood(hub: EventHub, count: int = 400, size: int = 32768) -> float:
    """Publish big events; return the longest time one publish() took."""
    longest = 0.0
    for i in range(count):
        started = time.monotonic()
        hub.publish("scan", {"device": "filler", "code": f"{i}:" + "x" * size})
        longest = max(longest, time.monotonic() - started)
        await asyncio.sleep(0.002)
    return longest


async def test_a_slow_client_loses_its_oldest_events_without_blocking_another(
        start_agent: StartAgent, scanner: ScannerEmulator, apps: list[web.Application]) -> None:
    running, hub = await scanner_agent(start_agent, scanner, apps)
    hub.queue_size = 8
    slow_sock = await _stalled_client(running, "T02")
    await until(lambda: hub.client_count == 1)
    [slow] = hub.clients
    async with sse(running, who="T01") as fast:
        await until(lambda: hub.client_count == 2)
        reader = asyncio.create_task(_read_until_code(fast, EAN[0]))
        longest = await _flood(hub)
        assert longest < 0.05  # publishing never waits for a client
        scanner.scan(EAN[0])
        got = await asyncio.wait_for(reader, 10)  # the fast client got the real scan
        assert got["data"]["device"] == "scanner"
        assert slow.dropped_total > 0 and len(slow.queue) <= 8  # bounded, oldest dropped
    # Once it reads again, the slow client is told how many it lost, then gets the rest.
    loop = asyncio.get_running_loop()
    received = b""
    async with asyncio.timeout(20):
        while f'"code":"{EAN[0]}"'.encode() not in received:
            chunk = await loop.sock_recv(slow_sock, 1 << 20)
            assert chunk, "the slow client's stream ended"
            received += chunk
    slow_sock.close()
    notices = [json.loads(m) for m in re.findall(rb"event: dropped\ndata: (\{[^\n]*\})", received)]
    assert notices and all(n["reason"] == "client too slow" for n in notices)
    assert sum(n["count"] for n in notices) == slow.dropped_total
    await until(lambda: hub.client_count == 0)


async def _read_until_code(events: Sse, code: str) -> dict[str, Any]:
    while True:
        event = await events.next("scan", timeout_s=20)
        if event["data"]["code"] == code:
            return event


async def test_a_client_that_accepts_nothing_is_cut_off(
        start_agent: StartAgent, scanner: ScannerEmulator, apps: list[web.Application]) -> None:
    running, hub = await scanner_agent(start_agent, scanner, apps)
    hub.queue_size, hub.write_timeout_s = 8, 0.5
    sock = await _stalled_client(running, "T02")
    try:
        await until(lambda: hub.client_count == 1)
        await _flood(hub)
        await until(lambda: hub.client_count == 0, timeout_s=5)
    finally:
        sock.close()


# -- auth -------------------------------------------------------------------------------------


async def test_only_terminal_tokens_may_open_the_stream(
        start_agent: StartAgent, scanner: ScannerEmulator, apps: list[web.Application]) -> None:
    running, hub = await scanner_agent(start_agent, scanner, apps)
    code, body = await running.get(PATH, who="status")
    assert code == 403 and body["error"]["code"] == "forbidden"
    code, body = await running.get(PATH, who=None)
    assert code == 401 and body["error"]["code"] == "unauthorized"
    code, body = await running.get(PATH, who=None,
                                   headers={"Authorization": "Bearer not-a-token-at-all"})
    assert code == 401 and body["error"]["code"] == "unauthorized"
    code, body = await running.get(PATH, who="T01", headers={"Host": "evil.example"})
    assert code == 421
    assert hub.client_count == 0
    async with sse(running, who="T02"):
        await until(lambda: hub.client_count == 1)


# -- scales -----------------------------------------------------------------------------------


async def test_a_stable_weight_is_sent_when_it_settles_on_a_new_value(
        start_agent: StartAgent, scale: MettlerToledo8217ScaleEmulator,
        apps: list[web.Application]) -> None:
    running = await start_agent(drivers=DRIVERS, extra=entry("scale", "scale", scale.url))
    await connected(running, "scale")
    hub = apps[-1][HUB]
    hub.weight_poll_s = 0.05
    assert not hub.polling_scales  # nobody listens: the scale is not polled
    async with sse(running) as events:
        first = await events.next("weight")
        assert first["data"] | {"at": None} == {"device": "scale", "weight": "0.000",
                                                 "unit": "kg", "net": False, "zero": True,
                                                 "at": None}
        valid("weight", first["data"])
        scale.set_weight("1.250")
        assert (await events.next("weight"))["data"]["weight"] == "1.250"
        scale.motion(True)
        await asyncio.sleep(0.3)
        scale.motion(False)  # settles on the same value: nothing new to say
        await asyncio.sleep(0.3)
        scale.set_weight("0.500")
        after = await events.next("weight")
        assert after["data"]["weight"] == "0.500" and after["data"]["zero"] is False
    await until(lambda: not hub.polling_scales, timeout_s=3)


# -- the hub on its own -----------------------------------------------------------------------


async def test_a_full_client_queue_drops_its_oldest_events_and_counts_them() -> None:
    hub = EventHub(DeviceManager(drivers={}), queue_size=3)
    client, replay = hub.connect("T01", None)
    ids = [hub.publish("scan", {"n": i}).id for i in range(5)]
    assert [e.id for e in client.queue] == ids[2:]
    assert (client.dropped, client.dropped_total, replay.events, replay.missed) == (2, 2, [], 0)
    hub.disconnect(client)
    hub.publish("scan", {"n": 5})
    assert hub.client_count == 0 and not client.queue


async def test_replay_says_how_many_events_are_no_longer_kept() -> None:
    hub = EventHub(DeviceManager(drivers={}), buffer_size=4)
    events = [hub.publish("device", {"n": i}) for i in range(10)]
    _, replay = hub.connect("T01", events[1].id)  # 2..5 evicted, 6..9 kept
    assert ([e.id for e in replay.events], replay.missed) == ([e.id for e in events[6:]], 4)
    _, replay = hub.connect("T01", events[7].id)
    assert ([e.id for e in replay.events], replay.missed) == ([events[8].id, events[9].id], 0)
    _, replay = hub.connect("T01", events[9].id)
    assert (replay.events, replay.missed) == ([], 0)
    _, replay = hub.connect("T01", events[9].id + 1000)  # an id from a clock-skewed past
    assert (replay.events, replay.missed) == ([], 0)
    # An id from before this hub started (the agent restarted): everything kept is new to it;
    # only what this hub itself evicted counts as missed.
    _, replay = hub.connect("T01", 5)
    assert ([e.id for e in replay.events], replay.missed) == ([e.id for e in events[6:]], 6)
    hub.replay_max_age_s = 0.0  # too old to replay (a stale scan must not reach a till)
    await asyncio.sleep(0.01)
    _, replay = hub.connect("T01", events[7].id)
    assert (replay.events, replay.missed) == ([], 2)
    await hub.stop()
    assert hub.client_count == 0 or all(c.closed for c in hub.clients)


def test_events_are_encoded_as_sse_blocks() -> None:
    event = stream.Event(17, "scan", {"code": "€1", "n": None}, 0.0)
    assert event.encode() == 'id: 17\nevent: scan\ndata: {"code":"€1","n":null}\n\n'.encode()
    assert stream.dropped_notice(3, "client too slow") == (
        b'event: dropped\ndata: {"count":3,"reason":"client too slow"}\n\n')


def test_the_openapi_path_item_describes_the_route() -> None:
    kept = json.loads(openapi_document())
    assert kept["paths"].get(PATH, OPENAPI_PATH) == OPENAPI_PATH  # merged as given, or not yet
    operation = OPENAPI_PATH["get"]
    assert operation["security"] == [{"terminal": []}]
    assert set(operation["responses"]) == {"200", "401", "403", "421"}
    assert set(operation["x-sse-events"]) == {"scan", "weight", "device", "dropped"}
    for schema in operation["x-sse-events"].values():
        jsonschema.Draft7Validator.check_schema(_nullable(schema))


def test_a_last_event_id_of_non_ascii_digits_means_from_now_on() -> None:
    """"¹" is a digit to str.isdigit but not to int: like any id never issued it means
    "from now on", not a crash. (aiohttp's make_mocked_request builds the request: only the
    header parsing is under test, no server is needed.)"""
    from aiohttp.test_utils import make_mocked_request

    for raw, expected in (("41", 41), ("¹", None), ("٣", None)):
        request = make_mocked_request("GET", PATH, headers={"Last-Event-ID": raw})
        assert stream._last_event_id(request) == expected
