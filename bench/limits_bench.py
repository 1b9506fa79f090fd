"""Why three targets fail: the measurements behind BENCHMARKS.md's explanations.

Not a benchmark with targets of its own: each row isolates one cause named in the text.

- Relay rounds: the drain of ``bench.relay_bench`` again, with the store's
  ``settle_and_claim`` wrapped (on this store object only) to time every round from the
  relay's side: how long a round takes while the senders and the sink share the two cores,
  against the very same rounds (20 verdicts, 20 claims, one commit each) run back to back
  with no HTTP at all. A stream's next event waits for the round that records its head, so
  round time bounds the drain (one delivery in flight per stream).
- Ingest with the relay idle: ``bench.agent_bench``'s throughput run against two agents,
  one whose sink answers (the relay delivers meanwhile, as in the agent benchmark) and one
  whose sink port is closed (the relay is offline and sends one probe per backoff). If the
  relay's share of the cores held ingest back, the second would be much faster.
- Import layers: resident set of a fresh interpreter after importing, in order, the stack
  CONTRACT and DESIGN prescribe (asyncio, aiohttp client and server, cryptography, pydantic,
  prometheus-client, APScheduler, pyserial, aiosqlite), pydantic's schema machinery (built
  on a first model), and then tillsync's own modules.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import agent_bench, relay_bench
from bench.common import Row
from outbox import Delivery, Outbox, Settlement, Verdict
from outbox.relay import Relay
from outbox.sinks import SinkPolicy, WebhookSettings, WebhookSink

ROUND = 20  # verdicts and claims per round in the quiet run: what a loaded round holds


def run(args: Any) -> list[Row]:
    """Run the three diagnostics in ``args.root``."""
    root = Path(args.root)
    drain, ingest = (5_000, 2_000) if args.quick else (30_000, 10_000)
    rows = relay_rounds(root, drain)
    rows += ingest_with_idle_relay(root, ingest)
    rows += import_layers()
    return rows


# -- relay rounds ------------------------------------------------------------------------------


def relay_rounds(root: Path, n: int) -> list[Row]:
    """Round time during a drain against the same rounds with no HTTP."""
    with relay_bench.sink_server() as base:
        loaded = asyncio.run(_timed_drain(root, base, n))
    quiet = asyncio.run(_quiet_rounds(root, n))
    per_round = statistics.mean(size for _, size in loaded)
    busy_ms = statistics.mean(t for t, _ in loaded) * 1000
    return [
        Row("relay round during the drain (settle + claim + commit)", busy_ms, "ms",
            f"the same rounds alone, {ROUND} verdicts each, no HTTP", quiet * 1000,
            busy_ms / (quiet * 1000),
            note=f"{len(loaded):,} rounds of {per_round:.1f} verdicts on average, timed from"
                 f" the relay's await; {n:,} deliveries, concurrency"
                 f" {relay_bench.CONCURRENCY}, {relay_bench.STREAMS} streams"),
    ]


async def _timed_drain(root: Path, base: str, n: int) -> list[tuple[float, int]]:
    store = await Outbox.open(root / "rounds.db", root / "rounds.key", create_key=True)
    rounds: list[tuple[float, int]] = []
    original = store.settle_and_claim

    async def timed(sink: str, settled: Any, released: Any, limit: int,
                    **kwargs: Any) -> tuple[list[Delivery], float | None]:
        started = time.perf_counter()
        result = await original(sink, settled, released, limit, **kwargs)
        if settled:
            rounds.append((time.perf_counter() - started, len(settled)))
        return result

    try:
        await relay_bench.fill(store, n)
        store.settle_and_claim = timed  # type: ignore[method-assign,assignment]
        sink = WebhookSink(relay_bench.SINK, WebhookSettings(
            url=f"{base}/events", token=relay_bench.TOKEN),
            SinkPolicy(concurrency=relay_bench.CONCURRENCY))
        relay = Relay(store, sink)
        await relay.start()
        try:
            await relay_bench.until_drained(store)
        finally:
            await relay.stop(grace_s=5)
    finally:
        await store.close()
    return rounds


async def _quiet_rounds(root: Path, n: int) -> float:
    """Mean seconds per round of ROUND verdicts and ROUND claims, nothing else running."""
    store = await Outbox.open(root / "quiet.db", root / "quiet.key", create_key=True)
    try:
        await relay_bench.fill(store, n)
        held, _ = await store.settle_and_claim(relay_bench.SINK, [], [], 3 * ROUND)
        rounds, started = 0, time.perf_counter()
        while len(held) >= ROUND:
            done, held = held[:ROUND], held[ROUND:]
            verdicts = [Settlement(d.event_id, d.sink, Verdict.DELIVERED) for d in done]
            claimed, _ = await store.settle_and_claim(relay_bench.SINK, verdicts, [], ROUND)
            held += claimed
            rounds += 1
        return (time.perf_counter() - started) / rounds
    finally:
        await store.close()


# -- ingest with the relay idle ------------------------------------------------------------------


def ingest_with_idle_relay(root: Path, n: int) -> list[Row]:
    """Agent ingest with its sink answering and with its sink's port closed."""
    rows = []
    with relay_bench.sink_server() as sink, agent_bench.ingest_server() as (bare, bare_pid):
        for label, url in (("sink answering, relay delivering",
                            f"{sink}/events"),
                           ("sink port closed, relay offline",
                            f"http://127.0.0.1:{agent_bench.free_port()}/events")):
            where = root / label.split(",")[0].replace(" ", "-")
            where.mkdir()
            config = agent_bench.write_config(where, url)
            with agent_bench.agent_process(where, config) as (agent, agent_pid):
                bare_run, agent_run = asyncio.run(
                    _ingest_pair(bare, bare_pid, agent, agent_pid, n))
            rows.append(Row(
                f"HTTP ingest, {label}", agent_run.rate, "requests/s",
                "bare aiohttp endpoint, measured just before", bare_run.rate,
                agent_run.rate / bare_run.rate,
                note=f"{n:,} sales, {agent_bench.CLIENTS} clients; agent CPU"
                     f" {agent_run.cpu_per_1000 * 1000:.0f} µs per sale (all threads), bare"
                     f" {bare_run.cpu_per_1000 * 1000:.0f} µs"))
    return rows


async def _ingest_pair(bare: str, bare_pid: int, agent: str, agent_pid: int,
                       n: int) -> tuple[agent_bench.Burst, agent_bench.Burst]:
    sales = agent_bench.Sales()
    await agent_bench.burst(bare, bare_pid, sales.take(agent_bench.WARM_UP))
    await agent_bench.burst(agent, agent_pid, sales.take(agent_bench.WARM_UP))
    bare_run = await agent_bench.burst(bare, bare_pid, sales.take(n))
    agent_run = await agent_bench.burst(agent, agent_pid, sales.take(n))
    return bare_run, agent_run


# -- import layers ---------------------------------------------------------------------------------

_LAYERS = r"""
import json, sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 / 1e6 for l in f if l.startswith("VmRSS:"))
out = [("interpreter", rss())]
import asyncio, sqlite3, aiosqlite, serial
import aiohttp, aiohttp.web
import cryptography.hazmat.primitives.ciphers.aead
import pydantic, prometheus_client, apscheduler.schedulers.asyncio
out.append(("stack", rss()))
class First(pydantic.BaseModel):
    x: int
First.model_validate({"x": 1})
out.append(("pydantic", rss()))
import outbox, outbox.relay, outbox.sinks.webhook
out.append(("outbox", rss()))
import agent.config, agent.canonical, agent.cli, agent.runtime
out.append(("agent", rss()))
print(json.dumps(out))
"""


def import_layers() -> list[Row]:
    """Resident set after each layer of imports, in a fresh interpreter."""
    text = subprocess.run([sys.executable, "-c", _LAYERS], check=True, capture_output=True,
                          text=True).stdout
    layers = dict(json.loads(text))
    return [
        Row("RSS after importing the prescribed stack", layers["stack"], "MB",
            note=f"a bare interpreter is {layers['interpreter']:.1f} MB; asyncio, aiohttp"
                 " client and server, cryptography, pydantic, prometheus-client, APScheduler,"
                 " pyserial, aiosqlite, nothing of tillsync"),
        Row("… plus pydantic's schema machinery (a first model)", layers["pydantic"], "MB"),
        Row("… plus tillsync's outbox", layers["outbox"], "MB"),
        Row("… plus tillsync's agent (config and event models, API, runtime)",
            layers["agent"], "MB",
            note="imports only; the 60 MB target is for the running agent (the agent"
                 " benchmark's idle figure), which adds the SQLite connection and its"
                 " thread, the server, the relay's session and the scheduler"),
    ]
