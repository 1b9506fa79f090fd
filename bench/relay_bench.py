"""Relay benchmark: drain a backlog to a local sink, beside a bare aiohttp client.

- The sink is ``bench.sink_server`` in its own process on 127.0.0.1, answering 200 to every
  POST at once; it counts posts and distinct ``Idempotency-Key`` values, so a run that sent
  anything twice or lost anything is reported as broken, not as fast.
- The backlog: sales appended over 64 streams (terminals; a stream has one delivery in
  flight at a time, so 8-way concurrency needs at least 8) at durability "full", not timed.
- Relay drain: ``WebhookSink`` + ``Relay`` with ``concurrency = 8`` and a bearer token, timed
  from ``start()`` until every delivery is settled as delivered. Each delivery costs a claim,
  a POST and a settle; claims and settles travel in the relay's rounds (one transaction and
  one fsync each, durability "full"), like production.
- Bare client: 8 coroutines POSTing the very same bodies and headers (built beforehand,
  untimed) through one aiohttp session limited to 8 connections; nothing stored. It runs
  first, after an untimed warm-up of the sink.
- CPU seconds are this process's (event loop plus the SQLite thread) per 1,000 deliveries.
- Rate limit: a relay with ``rate_limit_per_s = 50`` drains a small backlog; the rate is taken
  from the sink's arrival times, first to last, and also end to end from ``start()``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Row, at_least, child_server
from outbox import Delivery, NewEvent, Outbox
from outbox.relay import Relay
from outbox.sinks import SinkPolicy, WebhookSettings, WebhookSink
from outbox.sinks.webhook import USER_AGENT, envelope

SINK = "cloud"
STREAMS = 64
CONCURRENCY = 8
TOKEN = "bench-token-0123456789"
RATE = 50.0
RATIO_TARGET = 0.70
RATE_TOLERANCE = 0.05
FILL_BATCH = 1000
WARM_UP = 2000


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does."""

    backlog: int
    rated: int  # events drained at RATE per second
    reps: int


FULL = Sizes(backlog=100_000, rated=500, reps=1)
QUICK = Sizes(backlog=5_000, rated=100, reps=1)


@dataclass(frozen=True)
class Drain:
    """One timed drain: deliveries, seconds, CPU seconds, what the sink saw."""

    n: int
    seconds: float
    cpu: float
    sink: dict[str, Any]

    @property
    def rate(self) -> float:
        """Deliveries per second."""
        return self.n / self.seconds

    @property
    def cpu_per_1000(self) -> float:
        """CPU seconds per 1,000 deliveries."""
        return self.cpu / self.n * 1000


def run(args: Any) -> list[Row]:
    """Run the relay benchmark in ``args.root``."""
    sizes = QUICK if args.quick else FULL
    with sink_server() as base:
        return asyncio.run(measure(Path(args.root), base, sizes))


@contextmanager
def sink_server() -> Iterator[str]:
    """Start ``bench.sink_server`` in a child process; yield its base URL."""
    with child_server("bench.sink_server") as (_, read):
        yield f"http://127.0.0.1:{read()['port']}"


# -- the sink's counters -----------------------------------------------------------------------


async def sink_call(session: aiohttp.ClientSession, base: str, what: str) -> dict[str, Any]:
    """``GET /stats`` or ``POST /reset`` on the sink."""
    method = "GET" if what == "stats" else "POST"
    async with session.request(method, f"{base}/{what}") as resp:
        resp.raise_for_status()
        answer: dict[str, Any] = await resp.json()
        return answer


def check_exactly_once(label: str, n: int, sink: dict[str, Any]) -> None:
    """A benchmark that lost or duplicated something measured the wrong thing."""
    if sink["posts"] != n or sink["keys"] != n:
        raise RuntimeError(f"{label}: the sink saw {sink['posts']} posts with {sink['keys']}"
                           f" distinct keys, expected {n} of each")


# -- the backlog ---------------------------------------------------------------------------------

_SEQ = itertools.count(1)


def sale(seq: int) -> NewEvent:
    """A retail sale as the agent stores it for a webhook sink."""
    terminal = f"T{seq % STREAMS:02d}"
    data = {"terminal_id": terminal, "transaction_id": f"{terminal}-{seq:09d}",
            "type": "sale", "currency": "EUR", "total": "12.64",
            "lines": [{"sku": "4006381333931", "qty": 2, "unit_price": "3.49"},
                      {"sku": "5449000000996", "qty": 1, "unit_price": "1.79"},
                      {"sku": "4008400402222", "qty": 3, "unit_price": "1.29"}],
            "payments": [{"method": "card", "amount": "12.64"}]}
    payload = json.dumps({"store_id": "store-042", "kind": "transaction", "data": data},
                         separators=(",", ":")).encode()
    return NewEvent(stream=terminal, kind="transaction", payload=payload, sinks=(SINK,),
                    idempotency_key=f"bench-{seq:012d}", dedupe_key=f"{terminal}/{seq}")


async def fill(store: Outbox, n: int) -> list[NewEvent]:
    """Append ``n`` sales in batches; return them."""
    events = [sale(next(_SEQ)) for _ in range(n)]
    for start in range(0, n, FILL_BATCH):
        await store.append_many(events[start:start + FILL_BATCH])
    return events


# -- the runs --------------------------------------------------------------------------------------


async def relay_drain(root: Path, name: str, base: str, n: int,
                      policy: SinkPolicy) -> Drain:
    """Fill a fresh store with ``n`` sales, then time a relay draining it."""
    store = await Outbox.open(root / f"{name}.db", root / f"{name}.key", create_key=True)
    try:
        await fill(store, n)
        sink = WebhookSink(SINK, WebhookSettings(url=f"{base}/events", token=TOKEN), policy)
        relay = Relay(store, sink)
        async with aiohttp.ClientSession() as control:
            await sink_call(control, base, "reset")
            cpu, start = time.process_time(), time.perf_counter()
            await relay.start()
            try:
                await until_drained(store)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            finally:
                await relay.stop(grace_s=5)
            seen = await sink_call(control, base, "stats")
    finally:
        await store.close()
    check_exactly_once(name, n, seen)
    return Drain(n, seconds, cpu, seen)


async def until_drained(store: Outbox) -> None:
    """Return once nothing is owed to the sink any more (polled every 20 ms)."""
    while True:
        stats = (await store.stats()).sinks[SINK]
        if stats.pending == 0 and stats.in_doubt == 0:
            if stats.dead or stats.quarantined:
                raise RuntimeError(f"deliveries failed during the benchmark: {stats}")
            return
        await asyncio.sleep(0.02)


async def bare_drain(base: str, events: list[NewEvent]) -> Drain:
    """POST the same bodies and headers as the relay would, 8 at a time, nothing stored."""
    requests = []
    for event_id, ev in enumerate(events, start=1):
        delivery = Delivery(event_id, SINK, ev.stream, ev.kind, ev.idempotency_key,
                            ev.payload, 0, False, time.time(), None)
        headers = {"Content-Type": "application/json", "Idempotency-Key": ev.idempotency_key,
                   "Authorization": f"Bearer {TOKEN}"}
        requests.append((envelope(delivery), headers))
    todo = iter(requests)
    url = f"{base}/events"
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector,
                                     headers={"User-Agent": USER_AGENT}) as session:
        await sink_call(session, base, "reset")

        async def worker() -> None:
            for body, headers in todo:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"the sink answered {resp.status}")

        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        seen = await sink_call(session, base, "stats")
    check_exactly_once("bare aiohttp", len(events), seen)
    return Drain(len(events), seconds, cpu, seen)


async def measure(root: Path, base: str, sizes: Sizes) -> list[Row]:
    """Bare client, relay drain, then the rate-limited relay."""
    policy = SinkPolicy(concurrency=CONCURRENCY)
    await bare_drain(base, [sale(next(_SEQ)) for _ in range(WARM_UP)])  # the sink's first
    # requests are slower (imports, allocator); neither side should pay for that.
    bare = await bare_drain(base, [sale(next(_SEQ)) for _ in range(sizes.backlog)])
    relay = await relay_drain(root, "drain", base, sizes.backlog, policy)
    rated = await relay_drain(root, "rated", base, sizes.rated,
                              SinkPolicy(concurrency=CONCURRENCY, rate_limit_per_s=RATE))
    return build_rows(sizes, bare, relay, rated)


def build_rows(sizes: Sizes, bare: Drain, relay: Drain, rated: Drain) -> list[Row]:
    """The table: drain rate against the bare client, CPU, and the rate limit."""
    size = f"{sizes.backlog:,}-event backlog"
    ratio = relay.rate / bare.rate
    sink = rated.sink
    steady = (rated.n - 1) / (sink["last"] - sink["first"])
    error = abs(steady - RATE) / RATE
    quick = " (--quick size)" if sizes is QUICK else ""
    return [
        Row(f"relay drain, {size}, concurrency {CONCURRENCY}", relay.rate, "events/s",
            f"bare aiohttp client, same bodies, concurrency {CONCURRENCY}", bare.rate, ratio,
            f"≥ {RATIO_TARGET:g}×", at_least(ratio, RATIO_TARGET),
            f"claim + POST + settle (fsync) per event; {relay.seconds:.1f} s{quick}"),
        Row("relay CPU per 1,000 deliveries", relay.cpu_per_1000, "CPU s",
            "bare aiohttp client", bare.cpu_per_1000, relay.cpu_per_1000 / bare.cpu_per_1000,
            note="process CPU: event loop plus the SQLite thread; the sink runs elsewhere"),
        Row(f"rate-limited relay, rate_limit_per_s = {RATE:g}, {rated.n} events", steady,
            "events/s", target=f"{RATE:g} ± {RATE_TOLERANCE:.0%}",
            passed=error <= RATE_TOLERANCE,
            note=f"sink arrivals, first to last; end to end from start(): "
                 f"{rated.rate:.1f}/s over {rated.seconds:.1f} s"),
    ]
