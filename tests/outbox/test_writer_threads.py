"""Where the writer runs each part of a batch, and what a COMMIT that fails there undoes.

The hot path (appends, relay rounds, stats) runs its statements on the event loop's thread
and only the COMMIT on the connection's thread; everything else runs whole on the
connection's thread (``Outbox._commit_batch`` says why). SQLite's own trace hook reports
the thread each statement really ran on.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from outbox import Outbox, OutboxUnavailable, Settlement, Verdict
from outbox.db import raw_of
from outbox.store import REOPEN_INTERVAL_S
from tests.outbox.conftest import Clock, OpenStore, event


def trace_threads(store: Outbox) -> list[tuple[bool, str]]:
    """From now on, record (ran on this thread?, first word) for each statement."""
    seen: list[tuple[bool, str]] = []
    loop_thread = threading.get_ident()
    assert store._conn is not None
    raw_of(store._conn).set_trace_callback(
        lambda sql: seen.append((threading.get_ident() == loop_thread, sql.split()[0])))
    return seen


async def test_hot_path_statements_run_on_the_loop_and_only_commit_on_the_sqlite_thread(
        store: Outbox):
    """GIVEN a store WHEN it appends, runs a relay round and reads stats THEN every
    statement but COMMIT ran on the event loop's thread, and every COMMIT on another."""
    await store.append(event("T01", 1))  # opens the heads cache and the statements
    seen = trace_threads(store)

    await store.append(event("T01", 2))
    claimed, _ = await store.settle_and_claim("cloud", [], [], 8)
    await store.settle_and_claim(
        "cloud", [Settlement(claimed[0].event_id, "cloud", Verdict.DELIVERED)], [], 8)
    await store.stats()

    commits = [on_loop for on_loop, word in seen if word == "COMMIT"]
    others = [(on_loop, word) for on_loop, word in seen if word != "COMMIT"]
    assert len(commits) == 4 and not any(commits)
    assert {"BEGIN", "INSERT", "UPDATE"} <= {word for _, word in others}
    assert all(on_loop for on_loop, _ in others), others


async def test_work_that_may_scan_many_rows_runs_whole_on_the_sqlite_thread(
        store: Outbox, clock: Clock):
    """GIVEN delivered events WHEN purged and listed THEN no statement ran on the loop."""
    await store.append(event("T01", 1))
    [claimed] = await store.claim("cloud", 8)
    await store.settle([Settlement(claimed.event_id, "cloud", Verdict.DELIVERED)])
    seen = trace_threads(store)

    clock.advance(10)
    result = await store.purge(delivered_before=clock.now)
    await store.list_deliveries()

    assert result.payloads_released == 1
    assert seen and not any(on_loop for on_loop, _ in seen), seen


async def test_a_commit_that_fails_on_the_hot_path_rolls_back_and_answers_unavailable(
        open_store: OpenStore, paths: tuple[Path, Path]):
    """GIVEN a COMMIT that SQLite refuses (a deferred foreign key left dangling by a temp
    trigger, so COMMIT itself fails and leaves the transaction open) WHEN an append hits it
    THEN the caller gets OutboxUnavailable, nothing of it is on disk, and the store reopens
    and goes on accepting."""
    store = await open_store()
    first = await store.append(event("T01", 1))
    assert store._conn is not None
    raw = raw_of(store._conn)
    raw.execute("PRAGMA foreign_keys = ON")
    raw.execute("CREATE TEMP TABLE parent (id INTEGER PRIMARY KEY)")
    raw.execute("CREATE TEMP TABLE child (id INTEGER REFERENCES parent (id)"
                " DEFERRABLE INITIALLY DEFERRED)")
    raw.execute("CREATE TEMP TRIGGER dangling AFTER INSERT ON main.events"
                " BEGIN INSERT INTO child VALUES (NEW.id); END")

    with pytest.raises(OutboxUnavailable, match="FOREIGN KEY"):
        await store.append(event("T01", 2))

    assert store._conn is None, "a handle whose COMMIT failed is dropped, never reused"
    await asyncio.sleep(REOPEN_INTERVAL_S + 0.1)
    after = await store.append(event("T01", 3))  # on a reopened handle, without the trigger
    assert after.created
    with sqlite3.connect(paths[0]) as check:
        ids = [row[0] for row in check.execute("SELECT id FROM events ORDER BY id")]
    assert ids == [first.event_id, after.event_id]
    assert (await store.stats()).sinks["cloud"].pending == 2
