"""Drain benchmark: a cloud outage while the tills keep selling, then the backlog drains.

- The agent runs as in ``bench.agent_bench`` (``python -m agent run``, durability "full",
  four terminals) with one webhook sink at its defaults (concurrency 4, backoff 1 s base,
  10 s cap), pointing at ``bench.outage_cloud``: the idempotent stand-in cloud in its own
  process, whose port a control call closes (connections refused, kept-alive ones cut) and
  opens again.
- Sales are posted open loop at ``rate`` per second over the four terminals for the whole
  run: ``before_s`` with the cloud up, ``outage_s`` with it down, then up again until the
  backlog is gone and ``after_s`` more. Each sale is timed from its scheduled moment to its
  202, so the table also says whether the outage slowed the tills down.
- Every ``SAMPLE_S`` the agent's ``GET /v1/status`` gives what it owes the cloud (pending +
  in doubt); the cloud's commit times give delivered per second. When the run ends the
  cloud must hold each accepted sale exactly once.

``docs/img/drain-after-outage.png`` plots both series over time, the outage shaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench import plots
from bench.agent_bench import (
    P99_TARGET_MS,
    SINK,
    STATUS_TOKEN,
    WARM_UP,
    Request,
    Sales,
    accepted,
    agent_process,
    burst,
    get_json,
    quantile,
    until_drained,
    write_config,
)
from bench.common import Row, at_most, child_server
from outbox.sinks.base import DEFAULT_BACKOFF_CAP_S

SAMPLE_S = 0.2
BIN_S = 0.5  # delivered/s and accepted/s are counted per half second
DRAIN_LIMIT_S = 120.0
PNG = "drain-after-outage.png"


@dataclass(frozen=True)
class Sizes:
    """The load and the timeline."""

    rate: float  # sales/s offered throughout
    before_s: float  # cloud up
    outage_s: float  # cloud down
    after_s: float  # after the backlog is gone


FULL = Sizes(rate=100.0, before_s=5.0, outage_s=30.0, after_s=5.0)
QUICK = Sizes(rate=50.0, before_s=2.0, outage_s=5.0, after_s=2.0)


@dataclass
class Timeline:
    """What was seen, in seconds since the first sale was due (wall clock based)."""

    t0: float  # time.time() of the first scheduled sale
    down_at: float = 0.0
    up_at: float = 0.0
    zero_at: float | None = None  # first sample after up with nothing owed
    samples: list[tuple[float, int, str]] = field(default_factory=list)  # (t, owed, state)
    accepted_at: list[float] = field(default_factory=list)  # t of each 202
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (due t, ms)
    errors: int = 0
    committed_at: list[float] = field(default_factory=list)  # t of each cloud effect


def run(args: Any) -> list[Row]:
    """Run the outage in ``args.root``; plot it into ``args.images``."""
    sizes = QUICK if args.quick else FULL
    root = Path(args.root)
    with outage_cloud() as (cloud_url, control):
        config = write_config(root, cloud_url)
        with agent_process(root, config) as (agent, agent_pid):
            timeline = asyncio.run(measure(sizes, control, agent, agent_pid))
    png = plots.drain_after_outage(timeline, Path(args.images) / PNG, rate=sizes.rate,
                                   bin_s=BIN_S, quick=args.quick,
                                   required=args.write)
    return build_rows(sizes, timeline, png)


@contextmanager
def outage_cloud() -> Iterator[tuple[str, str]]:
    """Start ``bench.outage_cloud``; yield the webhook URL and the control base URL."""
    with child_server("bench.outage_cloud") as (_, read):
        url = read()["url"]
        yield url, f"http://127.0.0.1:{read()['port']}"


async def owed_and_state(session: aiohttp.ClientSession, agent: str) -> tuple[int, str]:
    """What the agent owes the cloud (pending + in doubt) and the sink's state."""
    status = await get_json(session, "GET", f"{agent}/v1/status",
                            {"Authorization": f"Bearer {STATUS_TOKEN}"})
    doc = next(s for s in status["sinks"] if s["name"] == SINK)
    return int(doc["pending"]) + int(doc["in_doubt"]), str(doc["state"])


async def measure(sizes: Sizes, control: str, agent: str, agent_pid: int) -> Timeline:
    """Warm up, then sell through before / outage / after while sampling status."""
    sales = Sales()
    async with aiohttp.ClientSession() as ctl:
        await burst(agent, agent_pid, sales.take(WARM_UP))
        await until_drained(ctl, agent)
        warm = (await get_json(ctl, "GET", f"{control}/stats"))["effects"]

        timeline = Timeline(t0=time.time() + 0.1)
        stop_selling = asyncio.Event()
        selling = asyncio.create_task(sell(agent, sales, sizes.rate, timeline, stop_selling))

        async def sample_until(done: asyncio.Event) -> None:
            start = time.monotonic()
            k = 0
            while not done.is_set():
                owed, state = await owed_and_state(ctl, agent)
                t = time.time() - timeline.t0
                timeline.samples.append((t, owed, state))
                if (timeline.zero_at is None and timeline.up_at and t > timeline.up_at
                        and owed == 0):
                    timeline.zero_at = t
                    cleared.set()
                k += 1
                await asyncio.sleep(max(0.0, start + k * SAMPLE_S - time.monotonic()))

        done_sampling, cleared = asyncio.Event(), asyncio.Event()
        sampling = asyncio.create_task(sample_until(done_sampling))
        try:
            await asyncio.sleep(timeline.t0 + sizes.before_s - time.time())
            await get_json(ctl, "POST", f"{control}/down")
            timeline.down_at = time.time() - timeline.t0
            await asyncio.sleep(sizes.outage_s)
            await get_json(ctl, "POST", f"{control}/up")
            timeline.up_at = time.time() - timeline.t0
            with contextlib.suppress(TimeoutError):  # not cleared: the row says FAIL
                await asyncio.wait_for(cleared.wait(), DRAIN_LIMIT_S)
            await asyncio.sleep(sizes.after_s)
        finally:
            stop_selling.set()
            await selling
            done_sampling.set()
            await sampling
        await until_drained(ctl, agent)
        stats = await get_json(ctl, "GET", f"{control}/stats")
    accepted = len(timeline.accepted_at)
    if stats["effects"] - warm != accepted or stats["keys"] - warm != accepted:
        raise RuntimeError(f"the cloud committed {stats['effects'] - warm} effects with"
                           f" {stats['keys'] - warm} distinct keys for {accepted} accepted sales")
    timeline.committed_at = sorted(at - timeline.t0 for at in stats["committed_at"][warm:])
    return timeline


async def sell(agent: str, sales: Sales, rate: float, timeline: Timeline,
               stop: asyncio.Event) -> None:
    """Post sale ``i`` at ``t0 + i / rate`` (wall clock) until ``stop``; record each 202."""
    url = f"{agent}/v1/transactions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:

        async def one(request: Request, due: float) -> None:
            ok = await accepted(session, url, request)
            now = time.time() - timeline.t0
            if ok:
                timeline.accepted_at.append(now)
                timeline.latencies.append((due, 1000 * (now - due)))
            else:
                timeline.errors += 1

        tasks = []
        i = 0
        while not stop.is_set():
            due = i / rate
            delay = timeline.t0 + due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            (request,) = sales.take(1)
            tasks.append(asyncio.create_task(one(request, due)))
            i += 1
        await asyncio.gather(*tasks)


def p99(latencies: list[float]) -> float:
    """The nearest-rank p99 of ``latencies`` (0 when empty)."""
    return quantile(sorted(latencies), 0.99) if latencies else 0.0


def build_rows(sizes: Sizes, tl: Timeline, png: Path | None) -> list[Row]:
    """Backlog, time to resume, time to clear, catch-up rate, and ingest during the outage."""
    quick = " (--quick size)" if sizes is QUICK else ""
    backlog = max((owed for t, owed, _ in tl.samples if t <= tl.up_at), default=0)
    first = next((t for t in tl.committed_at if t >= tl.up_at), None)
    resume = (first - tl.up_at) if first is not None else float("inf")
    clear = (tl.zero_at - tl.up_at) if tl.zero_at is not None else float("inf")
    catch_up = [t for t in tl.committed_at
                if first is not None and tl.zero_at is not None and first <= t <= tl.zero_at]
    catch_rate = (len(catch_up) / (tl.zero_at - first)
                  if tl.zero_at is not None and first is not None and tl.zero_at > first
                  else 0.0)
    peak = plots.peak_rate(tl.committed_at, BIN_S)
    during = [ms for due, ms in tl.latencies if tl.down_at <= due < tl.up_at]
    outside = [ms for due, ms in tl.latencies if not tl.down_at <= due < tl.up_at]
    where = f"; plot: {png.name}" if png else ""
    setup = (f"{sizes.rate:g} sales/s offered open loop throughout; cloud down"
             f" {sizes.outage_s:g} s (port closed, connections cut) after {sizes.before_s:g} s;"
             f" sink at its defaults{quick}")
    peak_owed = max((owed for _, owed, _ in tl.samples), default=0)
    return [
        Row(f"backlog when the cloud returned, after {sizes.outage_s:g} s down", backlog,
            "events", note=f"pending + in doubt from /v1/status every {SAMPLE_S:g} s; peak"
                           f" {peak_owed:,} before the first delivery; {setup}"),
        Row("first delivery after the cloud returned", resume, "s",
            target=f"≤ {DEFAULT_BACKOFF_CAP_S:g} s (backoff_cap_s)",
            passed=at_most(resume, DEFAULT_BACKOFF_CAP_S),
            note="the relay, offline, probes with full-jitter backoff capped at"
                 " backoff_cap_s; this is the wait until its next probe found the cloud up"),
        Row("backlog cleared, from the cloud's return", clear, "s",
            target=f"≤ {DRAIN_LIMIT_S:g} s", passed=at_most(clear, DRAIN_LIMIT_S),
            note=f"first status sample with nothing owed; sales kept coming in{where}"),
        Row("delivery rate while catching up", catch_rate, "events/s",
            note=f"cloud commits from the first delivery after the return until the backlog"
                 f" was cleared ({len(catch_up):,} events); peak {peak:,.0f}/s in"
                 f" {BIN_S:g} s bins"),
        Row("time to 202 while the cloud was down, p99", p99(during), "ms",
            "same run, cloud up", p99(outside),
            p99(during) / p99(outside) if outside and p99(outside) else None,
            target=f"≤ {P99_TARGET_MS:g} ms", passed=at_most(p99(during), P99_TARGET_MS),
            note=f"{len(during):,} sales due during the outage against {len(outside):,}"
                 f" before and after; {tl.errors} answers were not 202"),
    ]
