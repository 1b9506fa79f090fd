"""Process-level test: a relay SIGKILLed again and again mid-delivery loses and doubles nothing.

The parent runs the stand-in cloud in its own event loop (answers delayed by
``LATENCY_S``, so a kill usually lands while requests are on the wire; a few
``commit_then_drop`` faults per run leave deliveries in doubt as well). It fills an outbox
file with events over six terminals and closes it. Then it starts ``relay_child.py`` on that
file again and again and SIGKILLs it a random 0.2-0.8 s after the relay started; a final
run is left alone until it reports the store drained. The server's effect log and the store
must then show: nothing lost, nothing doubled, no resend with other bytes, per-terminal
order kept, every delivery delivered, and a sound database file.

The workload grows with the number of kills, so that every kill finds the relay with work
left (checked after each kill): a drained store would make a kill prove nothing.

Knobs: ``TILLSYNC_RELAY_KILLS`` (default 8) kills; ``TILLSYNC_RELAY_KILL_SEED`` replays the
kill delays of a run (the seed is in every failure message).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.standin.cloud import Fault, StandinCloud
from outbox import DeliveryState, Outbox
from tests.outbox.test_relay import sale

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CHILD = HERE / "relay_child.py"

KILLS = int(os.environ.get("TILLSYNC_RELAY_KILLS", "8"))
SEED = int(os.environ.get("TILLSYNC_RELAY_KILL_SEED", str(random.randrange(2**32))))
TERMINALS = [f"T{n:02d}" for n in range(1, 7)]
# One terminal's events go out one at a time, about 25 ms each at this latency: 40 per
# kill outlasts even the longest kill delays, so no kill lands on a drained store.
LATENCY_S = 0.02
EVENTS_PER_TERMINAL = max(50, 40 * KILLS)
# Before every run, a few commit_then_drop faults are spread over its first requests (a
# run serves about 200 requests per second), so deliveries fall in doubt (and are resent
# with the same key) all through the runs, not only right after a start.
DROPS_PER_RUN = 3
DROP_WINDOW = 100
NO_FAULT = Fault.slow(0.0)  # takes a turn in the fault queue, then a normal answer
KILL_DELAY_S = (0.2, 0.8)  # after the child printed "started"
START_TIMEOUT_S = 30.0
# A run delivers about 200 events per second here; allow for a machine four times slower.
DRAIN_TIMEOUT_S = 60.0 + EVENTS_PER_TERMINAL * len(TERMINALS) / 50

pytestmark = [
    pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX"),
    pytest.mark.timeout(max(300, 10 * KILLS + DRAIN_TIMEOUT_S)),
]


@dataclass
class Kill:
    """What one SIGKILL left in the file: deliveries still owed, and those in flight."""

    delay: float
    states: Counter[str]

    @property
    def owed(self) -> int:
        return sum(n for state, n in self.states.items() if state != "delivered")


def spread_drops(rng: random.Random) -> list[Fault]:
    faults = [NO_FAULT] * DROP_WINDOW
    for index in rng.sample(range(DROP_WINDOW), DROPS_PER_RUN):
        faults[index] = Fault.commit_then_drop()
    return faults


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def start_child(db: Path, key: Path, url: str, stderr: Path) -> asyncio.subprocess.Process:
    with stderr.open("ab") as err:
        return await asyncio.create_subprocess_exec(
            sys.executable, str(CHILD), str(db), str(key), url, cwd=REPO, env=child_env(),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err)


async def expect_line(proc: asyncio.subprocess.Process, want: bytes, timeout_s: float,
                      stderr: Path) -> None:
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        line = b"<timeout>"
    assert line.strip() == want, (
        f"expected {want!r} from the child, got {line!r} (rc={proc.returncode}, seed={SEED}):\n"
        + stderr.read_text(errors="replace")[-4000:])


def delivery_states(db: Path) -> Counter[str]:
    """Count deliveries by state, read-only (no checkpoint, no recovery), between runs."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return Counter(dict(conn.execute(
            "SELECT state, count(*) FROM deliveries GROUP BY state").fetchall()))
    finally:
        conn.close()


async def test_a_relay_killed_mid_delivery_again_and_again_loses_and_doubles_nothing(
        tmp_path: Path) -> None:
    """GIVEN an outbox file with events for six terminals and a cloud that answers slowly
    and sometimes drops the answer after committing
    WHEN a relay process is SIGKILLed at random moments while delivering, many times, and
    a last one runs until the store is drained
    THEN every event took effect exactly once with its original bytes, each terminal's
    effects are in append order, every delivery is delivered and the file is sound."""
    rng = random.Random(SEED)
    db, key, stderr = tmp_path / "outbox.db", tmp_path / "outbox.key", tmp_path / "child.err"
    appended: dict[str, list[int]] = defaultdict(list)
    store = await Outbox.open(db, key, create_key=True)
    try:
        events = [sale(t, seq) for seq in range(EVENTS_PER_TERMINAL) for t in TERMINALS]
        for event, result in zip(events, await store.append_many(events), strict=True):
            appended[event.stream].append(result.event_id)
    finally:
        await store.close()
    total = len(events)

    kills: list[Kill] = []
    async with StandinCloud() as cloud:
        cloud.latency_s = LATENCY_S
        for _ in range(KILLS):
            cloud.faults.clear()
            cloud.faults.extend(spread_drops(rng))
            proc = await start_child(db, key, cloud.url, stderr)
            await expect_line(proc, b"started", START_TIMEOUT_S, stderr)
            delay = rng.uniform(*KILL_DELAY_S)
            await asyncio.sleep(delay)
            alive = proc.returncode is None
            if alive:
                proc.send_signal(signal.SIGKILL)
            await proc.wait()
            assert alive and proc.returncode == -signal.SIGKILL, (
                f"the child exited before the kill (rc={proc.returncode}, seed={SEED}):\n"
                + stderr.read_text(errors="replace")[-4000:])
            kills.append(Kill(delay, delivery_states(db)))
            assert kills[-1].owed > 0, (
                f"kill {len(kills)} found the store drained: the workload is too small "
                f"(seed={SEED}, kills={kills})")

        cloud.faults.clear()
        cloud.faults.extend(spread_drops(rng))
        proc = await start_child(db, key, cloud.url, stderr)
        await expect_line(proc, b"started", START_TIMEOUT_S, stderr)
        await expect_line(proc, b"drained", DRAIN_TIMEOUT_S, stderr)
        assert await proc.wait() == 0
        await asyncio.sleep(2 * LATENCY_S)  # nothing may still be on its way in
        log = stderr.read_text(errors="replace")
        assert "Traceback" not in log and "crashed" not in log, log[-4000:]

        # Evidence that the kills hit requests on the wire, not an idle relay.
        assert sum(k.states["in_flight"] for k in kills) > 0, (kills, SEED)
        effect_ids = Counter(int(e.event_id or -1) for e in cloud.effects)
        every_id = {i for ids in appended.values() for i in ids}
        assert set(effect_ids) - every_id == set(), f"unknown effects (seed={SEED})"
        lost = every_id - set(effect_ids)
        assert not lost, f"{len(lost)} events lost, e.g. {sorted(lost)[:10]} (seed={SEED})"
        doubled = {i: n for i, n in effect_ids.items() if n > 1}
        assert doubled == {}, f"events with several effects: {doubled} (seed={SEED})"
        assert cloud.duplicates() == {}
        assert set(cloud.effects_by_key.values()) == {1} and len(cloud.effects) == total
        assert cloud.body_mismatches == []
        order = {t: [int(i) for i in ids] for t, ids in cloud.order_by_stream().items()}
        for terminal in TERMINALS:
            assert order[terminal] == appended[terminal], (
                f"{terminal}: first effects out of append order (seed={SEED})")
        assert not cloud.faults, "the last run's faults were never all served"
        dropped = sum(r.outcome == "committed_dropped" for r in cloud.requests)
        assert dropped >= DROPS_PER_RUN, dropped

    store = await Outbox.open(db, key)
    try:
        assert await store.verified() == []
        deliveries = await store.list_deliveries(limit=total + 1)
        stats = (await store.stats()).sinks["cloud"]
    finally:
        await store.close()
    assert len(deliveries) == total
    assert Counter(d.state for d in deliveries) == {DeliveryState.DELIVERED: total}
    assert (stats.pending, stats.in_doubt, stats.dead, stats.quarantined) == (0, 0, 0, 0)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
