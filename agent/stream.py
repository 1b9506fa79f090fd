"""Server-sent events for the terminals: ``GET /v1/events/stream`` (CONTRACT §4).

One :class:`EventHub` per agent collects three kinds of event and fans them out to every
connected terminal:

* ``scan``: every barcode read by a scanner driver (``{"device", **Scan.to_event()}``);
* ``weight``: a scale's reading became stable and differs from the last one announced. Scales
  are polled (``measure()`` under the device lock, every ``weight_poll_s``) only while at least
  one client is connected;
* ``device``: a device changed state or detail (the device manager's subscription).

The wire format is plain SSE: ``retry: 2000`` once, then per event ``id:``, ``event:``,
``data: <json>`` and a blank line, with a ``: keepalive`` comment after 15 s of silence.

Every client has its own bounded queue. The hub never waits for a client: when a client's queue
is full its oldest event goes, and before its next event the client receives
``event: dropped`` with ``{"count", "reason"}`` (a notice carries no ``id``, so it does not move
the client's Last-Event-ID). A client whose socket accepts nothing for ``WRITE_TIMEOUT_S`` is
cut off; a client that went away is noticed within a second and its queue removed.

Event ids are integers that start at the hub's start time in milliseconds, so they keep growing
across agent restarts. The last ``buffer_size`` events (no older than ``replay_max_age_s``) are
kept: a terminal that reconnects with ``Last-Event-ID`` receives the events after that id; if
some of them are no longer kept it is told how many with a ``dropped`` notice first, never
silently. A scan older than the replay age is not replayed: a till must not add an item that
was scanned minutes ago.

Wiring (api.py): ``register(app)`` in ``build_app`` and ``("GET", "/v1/events/stream"):
"terminal"`` in ``ROLES``; ``OPENAPI_PATH`` is the path item for ``openapi.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from drivers.base import DeviceError
from drivers.manager import DeviceChange, DeviceManager
from drivers.scale import refusal

log = logging.getLogger(__name__)

PATH = "/v1/events/stream"
RETRY_MS = 2000  # the reconnect delay a client's EventSource uses
KEEPALIVE_S = 15.0
BUFFER_SIZE = 256  # events kept for Last-Event-ID
QUEUE_SIZE = 64  # events waiting for one client before its oldest are dropped
REPLAY_MAX_AGE_S = 300.0  # older events are not replayed (a stale scan must not reach a till)
WEIGHT_POLL_S = 0.5
WEIGHT_READ_TIMEOUT_S = 1.0
WEIGHT_CALL_TIMEOUT_S = 5.0  # device lock + answer; a stuck scale must not stop the poller
WRITE_TIMEOUT_S = 30.0  # a client that accepts no bytes for this long is disconnected
LIVENESS_CHECK_S = 1.0  # how soon a client that went away is noticed while the hub is quiet

HUB: web.AppKey[EventHub] = web.AppKey("event_hub")


@dataclass(frozen=True)
class Event:
    """One published event; ``at`` is monotonic (replay age), ``data`` JSON-ready."""

    id: int
    kind: str  # "scan" | "weight" | "device"
    data: dict[str, Any]
    at: float

    def encode(self) -> bytes:
        """Return the SSE block: id, event, data and the blank line."""
        return (f"id: {self.id}\nevent: {self.kind}\ndata: {_json(self.data)}\n\n").encode()


def _json(data: Any) -> str:
    # json.dumps never emits a raw newline, so the data always fits one ``data:`` line.
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def dropped_notice(count: int, reason: str) -> bytes:
    """Return an ``event: dropped`` block (no id: the client's Last-Event-ID stays)."""
    return f"event: dropped\ndata: {_json({'count': count, 'reason': reason})}\n\n".encode()


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat().replace("+00:00", "Z")


class Client:
    """One connected terminal: a bounded queue of events not yet written."""

    def __init__(self, terminal: str, limit: int) -> None:
        self.terminal = terminal
        self.limit = max(1, limit)
        self.queue: deque[Event] = deque()
        self.dropped = 0  # dropped since the last notice
        self.dropped_total = 0
        self.wake = asyncio.Event()
        self.closed = False

    def put(self, event: Event) -> None:
        """Queue ``event``; when full, drop the oldest (never block, never grow)."""
        if len(self.queue) >= self.limit:
            self.queue.popleft()
            self.dropped += 1
            self.dropped_total += 1
        self.queue.append(event)
        self.wake.set()

    def close(self) -> None:
        """End this client's stream (the handler returns after its current write)."""
        self.closed = True
        self.wake.set()


@dataclass(frozen=True)
class Replay:
    """What a (re)connecting client gets before live events."""

    events: list[Event]
    missed: int  # events after its Last-Event-ID that are no longer kept


class EventHub:
    """Collects scans, stable weights and device changes; fans them out to SSE clients."""

    def __init__(self, devices: DeviceManager, *, buffer_size: int = BUFFER_SIZE,
                 queue_size: int = QUEUE_SIZE, keepalive_s: float = KEEPALIVE_S,
                 weight_poll_s: float = WEIGHT_POLL_S,
                 replay_max_age_s: float = REPLAY_MAX_AGE_S,
                 write_timeout_s: float = WRITE_TIMEOUT_S) -> None:
        self.devices = devices
        self.queue_size = queue_size
        self.keepalive_s = keepalive_s
        self.weight_poll_s = weight_poll_s
        self.replay_max_age_s = replay_max_age_s
        self.write_timeout_s = write_timeout_s
        self.first_id = int(time.time() * 1000)  # ids keep growing across restarts
        self._next_id = self.first_id
        self._buffer: deque[Event] = deque(maxlen=max(1, buffer_size))
        self._clients: set[Client] = set()
        self._unsubscribe: list[Callable[[], None]] = []
        self._weights: dict[str, tuple[Any, ...]] = {}  # last stable weight announced
        self._poller: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to device changes and to every scanner's scans."""
        self._unsubscribe.append(self.devices.subscribe(self._on_change))
        for name in self.devices.names():
            add_listener = getattr(self.devices.driver(name), "add_listener", None)
            if callable(add_listener):
                # A callback, not subscribe(): it survives the driver's close() and reopen.
                self._unsubscribe.append(add_listener(self._scan_listener(name)))

    def close_clients(self) -> None:
        """End every stream (on shutdown, so the server need not wait for them)."""
        self._closing = True
        for client in list(self._clients):
            client.close()

    async def stop(self) -> None:
        """Unsubscribe, stop polling scales and end every stream."""
        self.close_clients()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)

    # -- events in -------------------------------------------------------------------------

    def publish(self, kind: str, data: dict[str, Any]) -> Event:
        """Publish ``data`` as the next event: kept for replay, queued for every client."""
        event = Event(self._next_id, kind, data, time.monotonic())
        self._next_id += 1
        self._buffer.append(event)
        for client in list(self._clients):
            client.put(event)
        return event

    def _scan_listener(self, name: str) -> Callable[[Any], None]:
        def on_scan(scan: Any) -> None:
            self.publish("scan", {"device": name, **scan.to_event()})
        return on_scan

    def _on_change(self, change: DeviceChange) -> None:
        if change.new.state.value != "connected":
            self._weights.pop(change.name, None)  # back later: announce its weight again
        self.publish("device", {
            "device": change.name, "kind": change.kind, "state": change.new.state.value,
            "detail": change.new.detail, "previous_state": change.old.state.value,
            "previous_detail": change.old.detail, "since": _iso(change.since)})

    # -- clients ---------------------------------------------------------------------------

    @property
    def client_count(self) -> int:
        """How many streams are open."""
        return len(self._clients)

    @property
    def clients(self) -> list[Client]:
        """The open streams."""
        return list(self._clients)

    @property
    def polling_scales(self) -> bool:
        """Tell whether scales are being polled (only while a client is connected)."""
        return self._poller is not None and not self._poller.done()

    @property
    def last_id(self) -> int | None:
        """The id of the newest event, None before the first."""
        return self._buffer[-1].id if self._buffer else None

    def connect(self, terminal: str, last_event_id: int | None) -> tuple[Client, Replay]:
        """Add a client; return it and what it missed since ``last_event_id`` (if given).

        Registration and the replay snapshot happen together (no await between), so every
        event is either in the replay or in the client's queue, exactly once.
        """
        client = Client(terminal, self.queue_size)
        replay = self._replay(last_event_id) if last_event_id is not None else Replay([], 0)
        self._clients.add(client)
        if self._closing:
            client.close()
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_scales(), name="sse weight poller")
        return client, replay

    def disconnect(self, client: Client) -> None:
        """Forget a client and its queue; the poller ends by itself with the last client."""
        self._clients.discard(client)
        client.queue.clear()

    def _replay(self, last: int) -> Replay:
        if not self._buffer or last >= self._buffer[-1].id:
            return Replay([], 0)
        # Before this hub started, nothing it knows of can be counted as missed.
        lower = max(last, self.first_id - 1)
        newest_allowed = time.monotonic() - self.replay_max_age_s
        after = [e for e in self._buffer if e.id > lower]
        events = [e for e in after if e.at >= newest_allowed]
        first_kept = events[0].id if events else self._buffer[-1].id + 1
        return Replay(events, max(0, first_kept - lower - 1))

    # -- scales ----------------------------------------------------------------------------

    def _scales(self) -> list[str]:
        names = []
        for snapshot in self.devices.snapshots():
            driver = self.devices.driver(snapshot.name)
            if snapshot.kind == "scale" and callable(getattr(driver, "measure", None)):
                names.append(snapshot.name)
        return names

    async def _poll_scales(self) -> None:
        scales = self._scales()
        if not scales:
            return
        while self._clients and not self._closing:
            for name in scales:
                await self._poll_scale(name)
            await asyncio.sleep(self.weight_poll_s)

    async def _poll_scale(self, name: str) -> None:
        status, _ = self.devices.status(name)
        if not status.up:
            return
        try:
            async with asyncio.timeout(WEIGHT_CALL_TIMEOUT_S):
                async with self.devices.use(name) as driver:
                    weight = await driver.measure(WEIGHT_READ_TIMEOUT_S)  # type: ignore[attr-defined]
        except (DeviceError, TimeoutError) as err:
            # The manager records what this means for the device; a device event follows.
            log.debug("events: scale %s not read: %s", name, err)
            return
        if refusal(weight) is not None:
            return  # in motion, over, under, faulty or status only: nothing to announce
        key = (weight.value, weight.unit, weight.net)
        if self._weights.get(name) == key:
            return
        self._weights[name] = key
        self.publish("weight", {"device": name, "weight": str(weight.value),
                                "unit": weight.unit, "net": weight.net, "zero": weight.zero,
                                "at": _iso(time.time())})


# -- HTTP ------------------------------------------------------------------------------------


def _last_event_id(request: web.Request) -> int | None:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if raw is None:
        return None
    raw = raw.strip()
    # An id this hub never issued (another format) means "from now on", not an error.
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 18 else None


async def events_stream(request: web.Request) -> web.StreamResponse:
    """Stream scans, stable weights and device changes to a terminal until it goes away."""
    from agent import api  # here, not at the top: api.py imports this module to register it
    terminal = request.get(api.TERMINAL)
    if terminal is None:  # also refuses the status token if the route's role were missing
        raise api.ApiError(403, "forbidden", "this endpoint needs a terminal token")
    hub = request.app[HUB]
    client, replay = hub.connect(terminal.id, _last_event_id(request))
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no"})
    log.info("events: terminal %s connected (%d streams open)", terminal.id, hub.client_count)
    try:
        await response.prepare(request)
        await _write(hub, response, f"retry: {RETRY_MS}\n\n".encode())
        if replay.missed:
            await _write(hub, response, dropped_notice(replay.missed, "no longer kept"))
        for event in replay.events:
            await _write(hub, response, event.encode())
        await _pump(hub, client, request, response)
    except (ConnectionError, TimeoutError) as err:
        # A vanished client (reset) or one that accepted nothing for write_timeout_s.
        log.info("events: terminal %s stream ended: %s", terminal.id,
                 type(err).__name__ if not str(err) else err)
        if request.transport is not None:
            request.transport.abort()
    finally:
        hub.disconnect(client)
        log.info("events: terminal %s disconnected (%d streams open%s)", terminal.id,
                 hub.client_count,
                 f"; {client.dropped_total} events dropped" if client.dropped_total else "")
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


async def _pump(hub: EventHub, client: Client, request: web.Request,
                response: web.StreamResponse) -> None:
    last_write = time.monotonic()
    while not client.closed:
        if request.transport is None or request.transport.is_closing():
            return  # the terminal went away
        if client.dropped:
            count, client.dropped = client.dropped, 0
            await _write(hub, response, dropped_notice(count, "client too slow"))
            last_write = time.monotonic()
        if client.queue:
            # One write per batch: a fast client catches up in few syscalls.
            batch = b"".join(e.encode() for e in _drain(client.queue))
            await _write(hub, response, batch)
            last_write = time.monotonic()
            continue
        quiet = time.monotonic() - last_write
        if quiet >= hub.keepalive_s:
            await _write(hub, response, b": keepalive\n\n")
            last_write = time.monotonic()
            continue
        client.wake.clear()
        if client.queue or client.closed:
            continue
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(min(hub.keepalive_s - quiet, LIVENESS_CHECK_S)):
                await client.wake.wait()


def _drain(queue: deque[Event]) -> list[Event]:
    items = list(queue)
    queue.clear()
    return items


async def _write(hub: EventHub, response: web.StreamResponse, data: bytes) -> None:
    async with asyncio.timeout(hub.write_timeout_s):
        await response.write(data)


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    from agent import api  # here, not at the top: api.py imports this module to register it
    hub = EventHub(app[api.AGENT].devices)
    app[HUB] = hub
    hub.start()
    try:
        yield
    finally:
        await hub.stop()


async def _on_shutdown(app: web.Application) -> None:
    if HUB in app:
        app[HUB].close_clients()


def register(app: web.Application) -> None:
    """Add ``GET /v1/events/stream`` and the hub's lifecycle to an app from ``build_app``."""
    app.router.add_get(PATH, events_stream)
    app.cleanup_ctx.append(_hub_ctx)
    app.on_shutdown.append(_on_shutdown)


# -- OpenAPI ---------------------------------------------------------------------------------


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_NULLABLE_STRING = {"type": "string", "nullable": True}
EVENT_SCHEMAS: dict[str, dict[str, Any]] = {
    "scan": {
        "type": "object",
        "required": ["device", "code", "symbology", "aim", "gs1", "gtin", "measure", "error",
                     "at"],
        "properties": {
            "device": {"type": "string"},
            "code": {"type": "string", "description": "the data, without AIM id and suffix"},
            "symbology": {**_NULLABLE_STRING, "description": "e.g. EAN-13; null without AIM id"},
            "aim": {**_NULLABLE_STRING, "description": "AIM symbology identifier, e.g. ]E0"},
            "gs1": {"type": "object", "nullable": True,
                    "additionalProperties": {"type": "string"},
                    "description": "application identifier → value"},
            "gtin": {**_NULLABLE_STRING, "description": "GTIN-14 form"},
            "measure": {"type": "object", "nullable": True,
                        "required": ["kind", "value", "item_code", "item_ref"],
                        "properties": {"kind": {"type": "string"}, "value": {"type": "string"},
                                       "item_code": {"type": "string"},
                                       "item_ref": {"type": "string"}},
                        "description": "in-store price/weight label"},
            "error": {**_NULLABLE_STRING,
                      "description": "why the scan breaks a rule (bad check digit, bad AI)"},
            "at": {"type": "string", "format": "date-time"},
        },
    },
    "weight": {
        "type": "object",
        "required": ["device", "weight", "unit", "net", "zero", "at"],
        "properties": {
            "device": {"type": "string"},
            "weight": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?$"},
            "unit": {"type": "string"},
            "net": {"type": "boolean"},
            "zero": {"type": "boolean"},
            "at": {"type": "string", "format": "date-time"},
        },
    },
    "device": {
        "type": "object",
        "required": ["device", "kind", "state", "detail", "previous_state", "previous_detail",
                     "since"],
        "properties": {
            "device": {"type": "string"},
            "kind": {"type": "string", "enum": ["printer", "scanner", "scale"]},
            "state": {"type": "string",
                      "enum": ["connected", "disconnected", "error", "disabled"]},
            "detail": _NULLABLE_STRING,
            "previous_state": {"type": "string",
                               "enum": ["connected", "disconnected", "error", "disabled"]},
            "previous_detail": _NULLABLE_STRING,
            "since": {"type": "string", "format": "date-time"},
        },
    },
    "dropped": {
        "type": "object",
        "required": ["count", "reason"],
        "properties": {"count": {"type": "integer", "minimum": 1},
                       "reason": {"type": "string",
                                  "enum": ["client too slow", "no longer kept"]}},
    },
}

OPENAPI_PATH: dict[str, Any] = {
    "get": {
        "summary": "server-sent events: scans, stable weights, device state changes",
        "description": (
            "A text/event-stream that stays open. It starts with `retry: 2000`; each event is "
            "`id: <integer>`, `event: scan|weight|device`, `data: <one line of JSON>` and a "
            "blank line (payloads in `x-sse-events`). A `: keepalive` comment follows 15 s "
            "of silence. `weight` is sent when a scale's reading becomes stable and differs "
            "from the last one sent. Reconnect with `Last-Event-ID` (or `?last_event_id=`) to "
            "receive the events after it, from the last 256 and at most 5 minutes old. "
            "`event: dropped` (no id) says how many events this client will not receive: "
            "`client too slow` when it fell 64 events behind (its oldest went), "
            "`no longer kept` on a reconnect after events that were no longer kept."),
        "security": [{"terminal": []}],
        "parameters": [
            {"name": "Last-Event-ID", "in": "header", "required": False,
             "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
             "description": "the id of the last event received; replay from after it"},
            {"name": "last_event_id", "in": "query", "required": False,
             "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
             "description": "the same, for clients that cannot set the header"},
        ],
        "responses": {
            "200": {"description": "the event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            "401": _error("missing or unknown token (code unauthorized)"),
            "403": _error("the token may not call this (code forbidden)"),
            "421": _error("the Host header is not this agent's (code host_not_allowed)"),
        },
        "x-sse-events": EVENT_SCHEMAS,
    },
}
