"""Soak: ``tillsync run`` for minutes at 50 sales/s against a flapping cloud; nothing grows.

The run, as in RELIABILITY.md ("Soak"):

1. A stand-in cloud and the agent as a subprocess (``soak.py`` as its command: the agent
   with the hourly retention purge compressed to every ``PURGE_INTERVAL_S``, and
   ``retention_days``/``forget_after_days`` set to seconds, so the outbox reaches its steady
   size within the run instead of keeping every payload for a week).
2. ``TERMINALS`` tills post at 50 sales/s combined for ``TILLSYNC_SOAK_S`` seconds (default
   120, the CI size; RELIABILITY.md has a 30-minute run) while the cloud flaps through down,
   500s, 429 + Retry-After, commit-then-drop and slow phases.
3. Every ``SAMPLE_S`` the agent is read from outside (``soak.py``): RSS, open fds, threads,
   outbox files on disk, and pending/in-doubt/live bytes from ``/v1/status``.
4. The tills stop, the cloud heals, the backlog drains; the checker must find 0 lost, 0
   duplicated, 0 out of order, and the purge must have run.

What is judged against the warm-up (the first 25 % of the run, at least 20 s), where the
allocator, aiohttp's connection pools and SQLite's page cache settle:

* RSS after warm-up never exceeds the warm-up maximum by more than ``RSS_SLACK_MB``, and its
  least-squares slope stays under the larger of the monthly budget and what
  ``RSS_SLACK_MB`` over the post-warm-up window allows (a short run cannot resolve a slope
  of 0.7 MB/h; even the 30-minute run's limit is 16 MB/h, see RELIABILITY.md for the slope
  it measured);
* open fds never exceed the warm-up maximum by more than ``FD_SLACK``, and after draining
  they are back within it; threads never exceed the warm-up maximum by more than
  ``THREAD_SLACK``;
* the database file stops growing: over the second half of the post-warm-up window it grows
  by at most ``DB_GROWTH_SLACK_BYTES`` (without the purge it grows by about 0.7 KB per
  sale, about 1.6 MB in that half of the CI run).

The test process itself collects only young garbage during the run (``harness.young_gc_only``):
full collections over the cloud's growing logs stalled its loop, and with it the checker's
Retry-After timing, for up to 0.7 s in a 30-minute run.

Knobs: ``TILLSYNC_SOAK_S`` (seconds of load), ``TILLSYNC_SOAK_SEED`` (flap timings),
``TILLSYNC_SOAK_RATE`` (sales/s offered, default 50: a faster run puts hours' worth of sales
through in minutes, which tells growth per sale from growth per hour; above about 100/s the
flapping cloud's backlog outgrows the purge, so the outbox-growth check fails by design),
``TILLSYNC_SOAK_REPORT=path`` writes the samples and summary (JSON, or CSV for ``*.csv``),
``TILLSYNC_SOAK_MEMORY=path`` has the agent log SQLite's and the allocator's own figures to
a CSV (``soak.sample_memory``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.standin.cloud import StandinCloud
from tests.system import soak
from tests.system.harness import (
    RETRY_AFTER_GRACE_S,
    AgentProcess,
    CloudFlapper,
    Report,
    Till,
    check,
    terminal_ids,
    wait_drained,
    write_agent_config,
    young_gc_only,
)

DURATION_S = float(os.environ.get("TILLSYNC_SOAK_S", "120"))
SEED = int(os.environ.get("TILLSYNC_SOAK_SEED", str(random.randrange(2**32))))
REPORT_FILE = os.environ.get("TILLSYNC_SOAK_REPORT")
TERMINALS = terminal_ids(5)
OFFERED_PER_S = float(os.environ.get("TILLSYNC_SOAK_RATE", "50"))
RATE_PER_TILL = OFFERED_PER_S / len(TERMINALS)  # 5 × 10 = 50 sales/s by default
# ~60 samples in CI, ~300 in the 30-minute run: enough points for the slope, little load.
SAMPLE_S = max(2.0, DURATION_S / 300)
# The compressed retention: payloads of delivered sales are released 10 s after delivery,
# their ids forgotten after 20 s, and the purge job runs every 5 s. At 50 sales/s the outbox
# then holds about (20 + 5) s × 50 = 1,250 event headers plus whatever the flapping cloud
# has not taken yet, and the freed pages are reused: a steady size within ~30 s.
PURGE_INTERVAL_S = 5.0
RETENTION_S = 10.0
FORGET_AFTER_S = 20.0

# A Raspberry Pi 3 has 1 GB; half of it for the agent, exhausted within 30 days, is
# 512 MB / 720 h = 0.71 MB/h: a leak at least that fast would need a restart every month.
MONTH_BUDGET_MB_PER_H = 512 / (30 * 24)
# The agent's RSS settles over minutes, not seconds: in the 30-minute runs it went 67.8 MB at
# start, 74 MB at 150 s, 75.6-75.9 MB at 300 s, 77.0 MB at 30 min. The CI run's post-warm-up window
# (30-120 s) is still on that curve and grows ~3.5 MB; the slack leaves room for that and
# still catches a leak of ~1 KB per sale (4,500 sales after warm-up in CI) or a jump.
RSS_SLACK_MB = 6.0
FD_SLACK = 4
# The default executor's first thread starts at 60 s (APScheduler runs the plain-function
# disk check there), after the CI run's 30 s warm-up: one expected, one spare.
THREAD_SLACK = 2
DB_GROWTH_SLACK_BYTES = 1_000_000
DRAIN_TIMEOUT_S = 120.0
ACK_FLOOR = 0.8  # of the offered rate: a stalled agent must fail the run, not pass it

pytestmark = [pytest.mark.slow, pytest.mark.timeout(DURATION_S + DRAIN_TIMEOUT_S + 120)]


def soak_config(root: Path, cloud_url: str) -> Path:
    """The agent's config with the compressed retention (see ``RETENTION_S``)."""
    days = 86400.0
    return write_agent_config(
        root, sink_url=cloud_url, terminals=TERMINALS,
        outbox_extra=(f"retention_days = {RETENTION_S / days!r}\n"
                      f"forget_after_days = {FORGET_AFTER_S / days!r}\n"))


async def soak_run(tmp_path: Path, rng: random.Random) -> tuple[
        Report, soak.Summary, soak.Sample, dict[str, Any], AgentProcess]:
    """One soak: load, flapping and sampling for ``DURATION_S``, then heal and drain."""
    async with StandinCloud() as cloud:
        config = soak_config(tmp_path, cloud.url)
        db = tmp_path / "outbox.db"
        agent = AgentProcess(config, log_path=tmp_path / "agent.log",
                             command=[sys.executable, str(Path(soak.__file__))],
                             env={soak.PURGE_ENV: str(PURGE_INTERVAL_S)})
        await agent.start()
        pid = agent.pid
        assert pid is not None
        tills = [Till(t, agent.base, RATE_PER_TILL) for t in TERMINALS]
        flapper = CloudFlapper(cloud, rng)
        samples: list[soak.Sample] = []
        lag = soak.LoopLag()
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http, \
                aiohttp.ClientSession() as control:

            async def take(t: float) -> soak.Sample:
                asked = time.monotonic()
                status = await agent.status(control)
                return soak.read_sample(t, pid, db, status, sum(len(x.acked) for x in tills),
                                        len(cloud.effects),
                                        status_ms=1000 * (time.monotonic() - asked),
                                        loop_lag_ms=lag.take_ms())

            stop_tills, stop_flapping, stop_sampling = (asyncio.Event() for _ in range(3))
            started, started_wall = time.monotonic(), time.time()
            lagging = asyncio.create_task(lag.run(stop_sampling))
            sampling = asyncio.create_task(
                soak.sample_every(SAMPLE_S, stop_sampling, take, samples))
            till_tasks = [asyncio.create_task(till.run(stop_tills, http)) for till in tills]
            flapping = asyncio.create_task(flapper.run(stop_flapping))
            try:
                await asyncio.sleep(DURATION_S)
            finally:
                stop_tills.set()
                stop_flapping.set()
                stop_sampling.set()
                await asyncio.gather(*till_tasks, flapping, sampling, lagging)
            load_s = time.monotonic() - started
            await wait_drained(agent, cloud, timeout_s=DRAIN_TIMEOUT_S)
            drained = await take(time.monotonic() - started)
        assert await agent.stop() == 0, agent.log_tail()

    report = check(tills, cloud)
    summary = soak.analyse(samples, drained, DURATION_S)
    purges = agent.log_path.read_text(errors="replace").count("purge: released")
    facts: dict[str, Any] = {
        "seed": SEED, "load_s": round(load_s, 1), "sample_s": SAMPLE_S,
        "purge_interval_s": PURGE_INTERVAL_S, "retention_s": RETENTION_S,
        "forget_after_s": FORGET_AFTER_S, "purge_logs": purges, "phases": dict(flapper.seen),
        "cloud_requests": len(cloud.requests),
        "unanswered_attempts": sum(t.no_answer for t in tills),
        "load_average": os.getloadavg(), **report.figures()}
    if report.retry_after_violations:
        # Which side was late: the agent ignoring Retry-After (well inside the window), or
        # a stalled loop (just past the grace; see the samples' lag and status columns).
        facts["retry_after_details"] = [
            {"t": round(d["at"] - started_wall, 2), **d}
            for d in soak.retry_after_details(cloud, RETRY_AFTER_GRACE_S)]
    print(f"\nsoak: {DURATION_S:g} s at {OFFERED_PER_S:g} sales/s offered,"
          f" sampled every {SAMPLE_S:g} s, warm-up {summary.warm_up_s:g} s, seed {SEED}")
    print(soak.table(samples))
    print(f"drained: {json.dumps(drained.__dict__)}")
    print(f"summary: {json.dumps(summary.as_dict())}")
    print(f"facts: {json.dumps(facts)}")
    if REPORT_FILE:
        soak.write_report(Path(REPORT_FILE), samples, drained, summary, facts)
    return report, summary, drained, facts, agent


async def test_fifty_sales_a_second_against_a_flapping_cloud_grows_nothing(tmp_path: Path):
    """GIVEN the agent under 50 sales/s while the cloud flaps, for ``TILLSYNC_SOAK_S`` s
    WHEN its RSS, fds, threads and outbox files are sampled every few seconds
    THEN after warm-up none of them grows beyond the warm-up's level plus a small slack, the
    outbox file stops growing, and after healing every sale is committed exactly once."""
    with young_gc_only():
        report, summary, drained, facts, agent = await soak_run(tmp_path, random.Random(SEED))
    where = f"seed {SEED}; log {agent.log_path}"

    # The run did what it says: the load was offered and answered, the purge ran.
    assert report.acknowledged >= ACK_FLOOR * OFFERED_PER_S * DURATION_S, (report, facts)
    assert facts["purge_logs"] >= 1, f"the purge never released anything: {where}"
    # After healing, every acknowledged sale was committed exactly once, in order, and no
    # Retry-After was ignored.
    assert report.clean, f"{where}: {report}\n{facts.get('retry_after_details')}"

    # Memory: no level shift and no trend after warm-up.
    assert summary.rss_post_max_mb <= summary.rss_warm_max_mb + RSS_SLACK_MB, summary
    window_h = (summary.duration_s - summary.warm_up_s) / 3600
    slope_limit = max(MONTH_BUDGET_MB_PER_H, RSS_SLACK_MB / window_h)
    assert summary.rss_slope_mb_per_h <= slope_limit, (slope_limit, summary)
    # File descriptors and threads: nothing accumulates (sockets to a cloud that came and
    # went, SQLite handles, executor threads).
    assert summary.fds_post_max <= summary.fds_warm_max + FD_SLACK, summary
    assert summary.fds_drained <= summary.fds_warm_max, summary
    assert summary.threads_post_max <= summary.threads_warm_max + THREAD_SLACK, summary
    # The outbox: once the purge keeps pace, freed pages are reused and the file stops
    # growing; the backlog is bounded by the flapping, and gone after healing.
    assert summary.db_end_bytes - summary.db_mid_bytes <= DB_GROWTH_SLACK_BYTES, summary
    assert drained.pending == 0 and drained.in_doubt == 0, drained
