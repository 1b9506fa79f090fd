"""Latency benchmark: time to 202 against offered load, stepping up to saturation.

- The agent and its sink are set up as in ``bench.agent_bench``: ``python -m agent run`` as a
  subprocess, durability "full", outbox on a real disk, four terminals, one webhook sink
  pointing at ``bench.sink_server`` (its own process, 200 at once), relay and scheduler
  running, so the relay delivers every sale while the next ones are taken.
- Each step is an open-loop schedule at one offered rate: sale ``i`` is sent at
  ``t0 + i / rate`` whatever the earlier ones are doing, and timed from that scheduled moment
  to the end of its answer. A stall therefore counts against every sale queued behind it
  (no coordinated omission), and once the offered rate exceeds what the agent can take the
  times grow with the queue: that knee is the saturation point.
- The client (this process) keeps at most ``CONNECTIONS`` connections; a sale waiting for a
  free connection is still timed from its scheduled moment. How late the client itself sent
  (its send lag) is reported with each step: on 2 shared cores the client, the agent and
  the sink compete, so near saturation part of the time is the client's.
- Between steps the relay drains what the step left, and the sink must have received each
  of the step's sales exactly once; the next step starts from an empty backlog.
- The sweep stops after the first saturated step: fewer answers per second than
  ``SATURATED_SHARE`` of the offered rate, or a p99 above ``SATURATED_P99_MS``.

``docs/img/ingest-latency.png`` plots p50/p95/p99 of every step against the offered rate.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import plots
from bench.agent_bench import (
    P99_TARGET_MS,
    WARM_UP,
    Request,
    Sales,
    accepted,
    agent_process,
    burst,
    check_exactly_once,
    get_json,
    quantile,
    send_on_schedule,
    until_drained,
    write_config,
)
from bench.common import Row
from bench.relay_bench import sink_server

CONNECTIONS = 256
SATURATED_SHARE = 0.9
SATURATED_P99_MS = 1000.0
PNG = "ingest-latency.png"


@dataclass(frozen=True)
class Sizes:
    """The offered rates (sales/s) and how long each step lasts."""

    rates: tuple[float, ...]
    step_s: float


FULL = Sizes(rates=(50, 100, 200, 400, 700, 1000, 1400, 1800, 2200, 2600, 3000, 3500, 4000),
             step_s=10.0)
QUICK = Sizes(rates=(100, 400, 1000), step_s=2.0)


@dataclass(frozen=True)
class Step:
    """One open-loop step: the offered rate and what came back."""

    offered: float
    n: int
    answered_per_s: float  # 202s over first scheduled send to last answer
    p50: float  # ms
    p95: float
    p99: float
    max: float
    lag_p99: float  # ms between a sale's scheduled moment and its sending
    errors: int  # answers other than 202, and requests that failed

    @property
    def saturated(self) -> bool:
        """Whether the agent no longer kept up with this offered rate."""
        return (self.answered_per_s < SATURATED_SHARE * self.offered
                or self.p99 > SATURATED_P99_MS or self.errors > 0)


def run(args: Any) -> list[Row]:
    """Run the sweep in ``args.root``; plot it into ``args.images``."""
    sizes = QUICK if args.quick else FULL
    root = Path(args.root)
    with sink_server() as sink:
        config = write_config(root, f"{sink}/events")
        with agent_process(root, config) as (agent, agent_pid):
            steps = asyncio.run(sweep(sizes, sink, agent, agent_pid))
    png = plots.ingest_latency(steps, Path(args.images) / PNG, target_ms=P99_TARGET_MS,
                               step_s=sizes.step_s, quick=args.quick,
                               required=args.write)
    return build_rows(sizes, steps, png)


async def sweep(sizes: Sizes, sink: str, agent: str, agent_pid: int) -> list[Step]:
    """A warm-up, then one step per offered rate until the first saturated one."""
    sales = Sales()
    steps: list[Step] = []
    async with aiohttp.ClientSession() as control:
        await burst(agent, agent_pid, sales.take(WARM_UP))  # first requests pay for imports
        await until_drained(control, agent)
        for rate in sizes.rates:
            await get_json(control, "POST", f"{sink}/reset")
            step = await open_loop(agent, sales.take(round(rate * sizes.step_s)), rate)
            await until_drained(control, agent)
            if not step.errors:
                check_exactly_once(f"{rate:g}/s", step.n,
                                   await get_json(control, "GET", f"{sink}/stats"))
            steps.append(step)
            print(f"bench: latency {rate:g}/s offered: {step.answered_per_s:.0f}/s answered,"
                  f" p50 {step.p50:.1f} ms, p99 {step.p99:.1f} ms, lag p99"
                  f" {step.lag_p99:.1f} ms{', saturated' if step.saturated else ''}",
                  flush=True)
            if step.saturated:
                break
    return steps


async def open_loop(base: str, requests: list[Request], rate: float) -> Step:
    """Send request ``i`` at ``t0 + i / rate``; time each from then to its answer."""
    url = f"{base}/v1/transactions"
    times: list[float] = []
    lags: list[float] = []
    errors = 0
    last_answer = 0.0
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(request: Request, due: float) -> None:
            nonlocal errors, last_answer
            lags.append(time.perf_counter() - due)
            ok = await accepted(session, url, request)
            done = time.perf_counter()
            if ok:
                times.append(done - due)
                last_answer = max(last_answer, done)
            else:
                errors += 1

        t0 = await send_on_schedule(requests, rate, one)
    if not times:
        raise RuntimeError(f"no sale was answered 202 at {rate:g}/s ({errors} errors)")
    times.sort()
    lags.sort()
    ms = [1000 * t for t in times]
    return Step(rate, len(times), len(times) / (last_answer - t0), quantile(ms, 0.50),
                quantile(ms, 0.95), quantile(ms, 0.99), ms[-1],
                1000 * quantile(lags, 0.99), errors)


def sustained(steps: list[Step]) -> float:
    """The highest offered rate whose p99 met the target, in a step that kept up."""
    good = [s.offered for s in steps if not s.saturated and s.p99 <= P99_TARGET_MS]
    return max(good, default=0.0)


def build_rows(sizes: Sizes, steps: list[Step], png: Path | None) -> list[Row]:
    """One row per step (its p99, the rest in the note), then the highest rate within target."""
    quick = " (--quick size)" if sizes is QUICK else ""
    rows = []
    for s in steps:
        state = "; saturated: the sweep stops here" if s.saturated else ""
        errors = f"; {s.errors} answers were not 202" if s.errors else ""
        rows.append(Row(
            f"time to 202, {s.offered:g} sales/s offered (open loop), p99", s.p99, "ms",
            target=f"≤ {P99_TARGET_MS:g} ms" if not s.saturated else "",
            passed=(s.p99 <= P99_TARGET_MS) if not s.saturated else None,
            note=f"p50 {s.p50:.2f} ms, p95 {s.p95:.2f} ms, max {s.max:.1f} ms;"
                 f" {s.answered_per_s:,.0f} answered/s; {s.n:,} sales over"
                 f" {sizes.step_s:g} s; client send lag p99 {s.lag_p99:.2f} ms{errors}"
                 f"{state}{quick}"))
    best = sustained(steps)
    where = f"; plot: {png.name}" if png else ""
    rows.append(Row(f"highest offered rate with p99 ≤ {P99_TARGET_MS:g} ms", best, "sales/s",
                    note=f"of the steps above ({', '.join(f'{s.offered:g}' for s in steps)}"
                         f" sales/s){where}"))
    return rows
