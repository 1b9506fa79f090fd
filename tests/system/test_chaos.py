"""Chaos: ``tillsync run`` SIGKILLed every 1-3 s while the cloud flaps and tills keep selling.

The run, as in RELIABILITY.md:

1. A stand-in cloud (idempotent, Stripe-like) and the agent as a subprocess.
2. ``TERMINALS`` tills post sales one after another, ~200 sales/s combined, each re-posting
   a sale until it gets an answer, as real tills do.
3. The agent is SIGKILLed a random 1-3 s after each start and started again, ``KILLS``
   times, while the cloud cycles through down, 500s, 429 + Retry-After, commit-then-drop and
   slow phases.
4. The tills stop, the cloud heals, the last agent drains the backlog.
5. The checker compares what the tills were told with what the cloud committed: lost,
   duplicated and unexpected (Jepsen's queue categories), body mismatches, Retry-After
   violations, per-terminal order violations and refusals must all be 0, and the outbox file
   must pass ``PRAGMA integrity_check``.

The control run (``test_the_checker_catches_an_agent_that_acknowledges_before_commit``)
does the same to an agent patched to answer 202 before the outbox commit
(``ack_early_agent.py``) and must see losses: a harness that cannot fail proves nothing.

Knobs: ``TILLSYNC_CHAOS_KILLS`` (default 20; RELIABILITY.md has a 1,000-kill run),
``TILLSYNC_CHAOS_SEED`` replays the kill and flap timings of a run (the seed is in every
failure message), ``TILLSYNC_CHAOS_REPORT`` appends the figures as a JSON line to that file.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from agent.standin.cloud import StandinCloud
from tests.system.harness import (
    AgentProcess,
    CloudFlapper,
    Report,
    Till,
    check,
    integrity_check,
    kill_loop,
    terminal_ids,
    wait_drained,
    write_agent_config,
    young_gc_only,
)

KILLS = int(os.environ.get("TILLSYNC_CHAOS_KILLS", "20"))
SEED = int(os.environ.get("TILLSYNC_CHAOS_SEED", str(random.randrange(2**32))))
REPORT_FILE = os.environ.get("TILLSYNC_CHAOS_REPORT")
TERMINALS = terminal_ids(8)
RATE_PER_TILL = 25.0  # 8 × 25 = 200 sales/s offered
UPTIME_S = (1.0, 3.0)
CONTROL_KILLS = 6
HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300 + KILLS * 15)]


async def chaos_run(tmp_path: Path, *, kills: int, seed: int,
                    command: list[str] | None = None) -> tuple[Report, dict[str, object]]:
    """One chaos run; returns the checker's report and run facts for the message/report."""
    rng = random.Random(seed)
    async with StandinCloud() as cloud:
        config = write_agent_config(tmp_path, sink_url=cloud.url, terminals=TERMINALS)
        agent = AgentProcess(config, log_path=tmp_path / "agent.log", command=command)
        try:
            await agent.start()
            stop_tills, stop_flapping = asyncio.Event(), asyncio.Event()
            tills = [Till(t, agent.base, RATE_PER_TILL) for t in TERMINALS]
            flapper = CloudFlapper(cloud, rng)
            started = time.monotonic()
            connector = aiohttp.TCPConnector(limit=0)
            # young_gc_only: a full collection over the cloud's growing logs stalls this
            # process's loop (up to 0.7 s in long runs), which would time requests that were
            # on the wire as arriving inside a Retry-After window.
            with young_gc_only():
                async with aiohttp.ClientSession(connector=connector) as http:
                    till_tasks = [asyncio.create_task(till.run(stop_tills, http))
                                  for till in tills]
                    flapping = asyncio.create_task(flapper.run(stop_flapping))
                    try:
                        await kill_loop(agent, kills=kills, uptime_s=UPTIME_S, rng=rng)
                        await asyncio.sleep(1.0)  # the last agent sells in a calm moment too
                    finally:
                        stop_tills.set()
                        stop_flapping.set()
                        await asyncio.gather(*till_tasks, flapping)
                    chaos_s = time.monotonic() - started
                    await wait_drained(agent, cloud, timeout_s=120)
            assert await agent.stop() == 0, agent.log_tail()
            report = check(tills, cloud, agent.killed_at)
            integrity = integrity_check(tmp_path / "outbox.db")
            facts: dict[str, object] = {
                "seed": seed, "kills": agent.kills, "chaos_s": round(chaos_s, 1),
                "offered_per_s": round(sum(t.next_seq - 1 for t in tills) / chaos_s, 1),
                "answers": dict(sum((t.answers for t in tills), start=Counter[int]())),
                "unanswered_attempts": sum(t.no_answer for t in tills),
                "cloud_requests": len(cloud.requests), "cloud_effects": len(cloud.effects),
                "phases": dict(flapper.seen), "integrity_check": integrity,
                "mean_restart_to_ready_s": round(agent.mean_restart_s(), 2), **report.figures(),
            }
            return report, facts
        finally:
            await agent.kill()  # a failed run must not leave an agent behind


async def test_sigkill_every_few_seconds_with_a_flapping_cloud_loses_and_doubles_nothing(
        tmp_path: Path):
    """GIVEN tills selling ~200/s and a cloud that flaps WHEN the agent is SIGKILLed every
    1-3 s, ``KILLS`` times THEN after healing every acknowledged sale is committed exactly
    once, with the posted body, in per-terminal order, and no Retry-After was ignored."""
    report, facts = await chaos_run(tmp_path, kills=KILLS, seed=SEED)
    if REPORT_FILE:
        with open(REPORT_FILE, "a") as out:
            out.write(json.dumps(facts) + "\n")
    print(f"chaos: {json.dumps(facts)}")
    assert facts["kills"] == KILLS
    # Enough work went through for the kills to mean something.
    assert report.acknowledged >= KILLS * 50, facts
    assert report.clean, f"seed {SEED}: {report}\n{facts}"
    assert facts["integrity_check"] == "ok", facts


async def test_the_checker_catches_an_agent_that_acknowledges_before_commit(tmp_path: Path):
    """GIVEN an agent patched to answer 202 before the outbox commit (a write-behind buffer,
    like the crashed buffers of the pain points) WHEN it is SIGKILLed under load THEN the
    checker reports acknowledged sales as lost: the harness can fail."""
    command = [sys.executable, str(HERE / "ack_early_agent.py")]
    report, facts = await chaos_run(tmp_path, kills=CONTROL_KILLS, seed=SEED, command=command)
    print(f"control: {json.dumps(facts)}")
    assert report.lost, f"seed {SEED}: the control run lost nothing: {report}\n{facts}"
