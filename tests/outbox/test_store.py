"""Unit tests of every outbox store capability, on real SQLite files."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from outbox import (
    CapacityFull,
    DedupeConflict,
    DeliveryState,
    Outbox,
    OutboxClosed,
    OutboxCorrupt,
    OutboxError,
    OutboxFull,
    OutboxUnavailable,
    SchemaTooNew,
    Settlement,
    Verdict,
    schema,
)
from outbox.db import IN_CHUNK, hop, in_chunks
from tests.outbox.conftest import Clock, OpenStore, event


async def settle(store: Outbox, event_id: int, verdict: Verdict, sink: str = "cloud",
                 **kw: object) -> None:
    await store.settle([Settlement(event_id, sink, verdict, **kw)])  # type: ignore[arg-type]


# -- append, durability, dedupe ------------------------------------------------------------


async def test_appended_event_survives_close_and_reopen_byte_for_byte(open_store: OpenStore):
    store = await open_store()
    payload = bytes(range(256)) * 3
    appended = await store.append(event(payload=payload))
    await store.close()

    reopened = await open_store()
    record = await reopened.read(appended.event_id)
    assert record is not None
    assert record.payload == payload
    assert record.idempotency_key == "key-T01-1"
    assert [d.state for d in record.deliveries] == [DeliveryState.PENDING]


async def test_concurrent_appends_are_group_committed(store: Outbox):
    """GIVEN 200 producers appending at once WHEN they all await THEN far fewer commits ran."""
    before = store.commits
    results = await asyncio.gather(*(store.append(event("T01", i)) for i in range(200)))
    assert len({r.event_id for r in results}) == 200
    assert store.commits - before <= 20


async def test_same_dedupe_key_and_payload_returns_the_original(store: Outbox, clock: Clock):
    first = await store.append(event())
    clock.advance(5)
    again = await store.append(event())
    assert first.created and not again.created
    assert (again.event_id, again.idempotency_key, again.accepted_at) == (
        first.event_id, first.idempotency_key, first.accepted_at)
    assert (await store.stats()).events == 1


async def test_same_dedupe_key_with_other_payload_conflicts_and_changes_nothing(store: Outbox):
    first = await store.append(event(payload=b"original"))
    with pytest.raises(DedupeConflict) as err:
        await store.append(event(payload=b"changed"))
    assert err.value.event_id == first.event_id
    record = await store.read(first.event_id)
    assert record is not None and record.payload == b"original"
    assert (await store.stats()).events == 1


async def test_duplicates_inside_one_batch_resolve_to_one_event(store: Outbox):
    same = await asyncio.gather(*(store.append(event()) for _ in range(10)))
    assert len({r.event_id for r in same}) == 1
    assert sum(r.created for r in same) == 1


async def test_append_many_is_all_or_nothing_when_one_event_conflicts(store: Outbox):
    await store.append(event("T01", 1, payload=b"a"))
    with pytest.raises(DedupeConflict):
        await store.append_many([event("T01", 2), event("T01", 1, payload=b"b")])
    assert (await store.stats()).events == 1
    assert await store.list_deliveries() == [
        d for d in await store.list_deliveries() if d.event_id == 1]


async def test_events_without_dedupe_key_are_always_new(store: Outbox):
    a = await store.append(event(dedupe=False))
    b = await store.append(event(dedupe=False))
    assert a.event_id != b.event_id


async def test_invalid_events_are_refused_before_anything_is_written(store: Outbox):
    with pytest.raises(ValueError, match="stream"):
        await store.append(event(stream=""))
    with pytest.raises(ValueError, match="sinks"):
        await store.append(event(sinks=("cloud", "cloud")))
    assert (await store.stats()).events == 0


# -- deliveries, fan-out, ordering ---------------------------------------------------------


async def test_event_fans_out_to_each_sink_with_its_own_state(store: Outbox):
    appended = await store.append(event(sinks=("cloud", "erp")))
    [cloud] = await store.claim("cloud", 10)
    await settle(store, cloud.event_id, Verdict.DEAD, error="422 rejected")
    [erp] = await store.claim("erp", 10)
    await settle(store, erp.event_id, Verdict.DELIVERED, sink="erp")

    record = await store.read(appended.event_id)
    assert record is not None
    states = {d.sink: d.state for d in record.deliveries}
    assert states == {"cloud": DeliveryState.DEAD, "erp": DeliveryState.DELIVERED}
    stats = await store.stats()
    assert (stats.sinks["cloud"].dead, stats.sinks["erp"].pending) == (1, 0)


async def test_claim_hands_out_one_head_per_stream_in_append_order(store: Outbox):
    for seq in range(3):
        for stream in ("T01", "T02"):
            await store.append(event(stream, seq))
    seen: dict[str, list[bytes]] = {"T01": [], "T02": []}
    while batch := await store.claim("cloud", 10):
        assert len({d.stream for d in batch}) == len(batch), "two from one stream"
        assert await store.claim("cloud", 10) == [], "a stream's next was claimable early"
        for d in batch:
            seen[d.stream].append(d.payload)
            await settle(store, d.event_id, Verdict.DELIVERED)
    for stream, payloads in seen.items():
        assert payloads == [f'{{"sale":"{stream}-{i}"}}'.encode() for i in range(3)]


async def test_a_dead_delivery_does_not_block_its_stream(store: Outbox):
    first = await store.append(event("T01", 1))
    second = await store.append(event("T01", 2))
    [d] = await store.claim("cloud", 10)
    assert d.event_id == first.event_id
    await settle(store, d.event_id, Verdict.DEAD, error="400 bad request")
    [d] = await store.claim("cloud", 10)
    assert d.event_id == second.event_id


async def test_in_doubt_and_retrying_deliveries_block_their_stream(store: Outbox,
                                                                  clock: Clock):
    first = await store.append(event("T01", 1))
    await store.append(event("T01", 2))
    [d] = await store.claim("cloud", 10)
    await settle(store, d.event_id, Verdict.IN_DOUBT, next_attempt_at=clock.now + 30,
                 error="timeout after the request was sent")
    assert await store.claim("cloud", 10) == []  # head in doubt and not yet due
    clock.advance(31)
    [d] = await store.claim("cloud", 10)
    assert (d.event_id, d.in_doubt, d.attempts) == (first.event_id, True, 1)
    await settle(store, d.event_id, Verdict.RETRY, next_attempt_at=clock.now + 10)
    record = await store.read(first.event_id)
    assert record is not None
    assert record.deliveries[0].state is DeliveryState.IN_DOUBT, "a retry keeps the doubt"
    assert await store.claim("cloud", 10) == []


async def test_retry_is_not_claimed_before_its_time(store: Outbox, clock: Clock):
    await store.append(event())
    [d] = await store.claim("cloud", 1)
    await settle(store, d.event_id, Verdict.RETRY, next_attempt_at=clock.now + 60,
                 error="503")
    clock.advance(59)
    assert await store.claim("cloud", 1) == []
    clock.advance(1)
    [again] = await store.claim("cloud", 1)
    assert (again.event_id, again.attempts, again.in_doubt) == (d.event_id, 1, False)


async def test_restart_requeues_inflight_deliveries(open_store: OpenStore, clock: Clock):
    store = await open_store()
    for seq in range(3):
        await store.append(event(f"T0{seq}", 1))
    claimed = await store.claim("cloud", 10)
    doubted = claimed[0]
    await settle(store, doubted.event_id, Verdict.IN_DOUBT, next_attempt_at=clock.now)
    [again] = [d for d in await store.claim("cloud", 10) if d.event_id == doubted.event_id]
    assert again.in_doubt
    await store.close()  # everything claimed is still in flight

    reopened = await open_store()
    assert await reopened.list_deliveries(state=DeliveryState.IN_FLIGHT) == []
    # Any of them may have been sent before the stop: all in doubt, all claimable again,
    # and a claim says so (the sink's lookup runs before a resend).
    states = {d.event_id: d.state for d in await reopened.list_deliveries()}
    assert set(states.values()) == {DeliveryState.IN_DOUBT}
    again = await reopened.claim("cloud", 10)
    assert len(again) == 3 and all(d.in_doubt for d in again)


async def test_a_sink_that_marks_its_sends_is_believed_after_a_restart(open_store: OpenStore):
    """GIVEN two printer jobs claimed, one marked sent (its bytes may be in the printer) and
    one not (the agent was still waiting for the printer) WHEN the store is reopened after
    a crash, told that printer sinks mark their sends THEN the marked job is in doubt (never
    printed twice) and the unmarked one plain pending (printed after all); a webhook claim
    beside them is in doubt as always. The counters follow."""
    def printers(sink: str) -> bool:
        return sink.startswith("printer:")

    store = await open_store(tracks_sends=printers)
    for stream in ("receipt", "kitchen"):  # two streams, so both can be in flight at once
        await store.append(event(stream, 1, sinks=("printer:receipt",)))
    await store.append(event("T01", 1))
    sent, waiting = await store.claim("printer:receipt", 2)
    [posted] = await store.claim("cloud", 1)
    await store.mark_sent(sent)
    with pytest.raises(OutboxError, match="no longer claimed"):  # not in flight: not sent
        await store.mark_sent(replace(sent, event_id=waiting.event_id + 100))
    stats = (await store.stats()).sinks["printer:receipt"]
    assert (stats.pending, stats.in_doubt) == (1, 1)  # marked: counted in doubt at once
    await store.close()  # all three still in flight, as after a SIGKILL

    reopened = await open_store(tracks_sends=printers)
    states = {(d.event_id, d.sink): d.state for d in await reopened.list_deliveries()}
    assert states == {(sent.event_id, "printer:receipt"): DeliveryState.IN_DOUBT,
                      (waiting.event_id, "printer:receipt"): DeliveryState.PENDING,
                      (posted.event_id, "cloud"): DeliveryState.IN_DOUBT}
    stats = (await reopened.stats()).sinks["printer:receipt"]
    assert (stats.pending, stats.in_doubt) == (1, 1)
    assert await reopened.check() == []


async def test_release_returns_claims_without_counting_an_attempt(store: Outbox):
    await store.append(event())
    claimed = await store.claim("cloud", 1)
    await store.release(claimed)
    [again] = await store.claim("cloud", 1)
    assert again.attempts == 0


async def test_settle_ignores_deliveries_that_are_not_in_flight(store: Outbox):
    appended = await store.append(event())
    await settle(store, appended.event_id, Verdict.DELIVERED)  # never claimed
    assert (await store.stats()).sinks["cloud"].pending == 1


async def test_a_round_settles_then_claims_the_next_of_that_stream_in_one_commit(
        store: Outbox, clock: Clock):
    """GIVEN a round that records a delivered head and a retry WHEN it claims in the same
    transaction THEN the delivered stream's next event comes out, the retried one waits."""
    first = await store.append(event("T01", 1))
    second = await store.append(event("T01", 2))
    other = await store.append(event("T02", 1))
    claimed, _ = await store.settle_and_claim("cloud", [], [], 10)
    assert [d.event_id for d in claimed] == [first.event_id, other.event_id]
    before = store.commits
    claimed, due = await store.settle_and_claim(
        "cloud", [Settlement(first.event_id, "cloud", Verdict.DELIVERED),
                  Settlement(other.event_id, "cloud", Verdict.RETRY,
                             next_attempt_at=clock.now + 60, error="503")], [], 10)
    assert store.commits - before == 1
    assert [(d.event_id, d.attempts) for d in claimed] == [(second.event_id, 0)]
    assert due == clock.now + 60, "the retried head is the next one due"
    states = {d.event_id: (d.state, d.attempts) for d in await store.list_deliveries()}
    assert states == {first.event_id: (DeliveryState.DELIVERED, 1),
                      second.event_id: (DeliveryState.IN_FLIGHT, 0),
                      other.event_id: (DeliveryState.PENDING, 1)}
    clock.advance(60)
    [again] = await store.claim("cloud", 10)
    assert (again.event_id, again.attempts, again.in_doubt) == (other.event_id, 1, False)


async def test_a_round_gives_back_released_deliveries_and_claims_nothing_at_limit_zero(
        store: Outbox):
    await store.append(event("T01", 1))
    await store.append(event("T02", 1))
    claimed, _ = await store.settle_and_claim("cloud", [], [], 10)
    assert len(claimed) == 2
    again, due = await store.settle_and_claim("cloud", [], claimed, 0)
    assert again == [] and due is not None
    assert await store.list_deliveries(state=DeliveryState.IN_FLIGHT) == []
    assert [d.attempts for d in await store.claim("cloud", 10)] == [0, 0]


async def test_a_round_that_settles_everything_owed_reports_nothing_due(store: Outbox):
    appended = await store.append(event())
    [d] = await store.claim("cloud", 1)
    claimed, due = await store.settle_and_claim(
        "cloud", [Settlement(d.event_id, "cloud", Verdict.DELIVERED)], [], 10)
    assert (claimed, due) == ([], None)
    record = await store.read(appended.event_id)
    assert record is not None and record.deliveries[0].state is DeliveryState.DELIVERED


async def test_wakeup_is_set_when_events_arrive_for_a_sink(store: Outbox):
    wakeup = store.wakeup("cloud")
    wakeup.clear()
    await store.append(event(sinks=("erp",)))
    assert not wakeup.is_set()
    await store.append(event("T01", 2))
    assert wakeup.is_set()


# -- operators: stats, list, read, requeue, purge ------------------------------------------


async def test_stats_count_states_bytes_and_oldest_age(store: Outbox, clock: Clock):
    a = await store.append(event("T01", 1))
    clock.advance(10)
    await store.append(event("T02", 1))
    await store.append(event("T01", 2))
    [first, _] = await store.claim("cloud", 10)
    assert first.event_id == a.event_id
    await settle(store, first.event_id, Verdict.DEAD, error="422")
    clock.advance(5)

    stats = await store.stats()
    cloud = stats.sinks["cloud"]
    assert (cloud.pending, cloud.in_doubt, cloud.dead) == (2, 0, 1)
    assert cloud.oldest_pending_age_s == pytest.approx(5.0)  # the dead one does not count
    assert stats.events == 3
    assert cloud.bytes == stats.bytes  # dead ones still hold their bytes
    assert stats.bytes > 3 * len(b'{"sale":"T01-1"}')


async def test_list_and_read_show_operators_the_decrypted_record(store: Outbox):
    appended = await store.append(event(payload=b'{"total":"3.98"}'))
    [d] = await store.claim("cloud", 1)
    await settle(store, d.event_id, Verdict.DEAD, error="422: total does not match lines")

    [info] = await store.list_deliveries(state=DeliveryState.DEAD)
    assert (info.event_id, info.last_error) == (appended.event_id,
                                                "422: total does not match lines")
    assert await store.list_deliveries(state=DeliveryState.PENDING) == []
    record = await store.read(appended.event_id)
    assert record is not None and record.payload == b'{"total":"3.98"}'
    assert await store.read(999) is None


async def test_list_pages_through_deliveries_in_event_order(store: Outbox):
    for seq in range(7):
        await store.append(event("T01", seq))
    page1 = await store.list_deliveries(limit=4)
    page2 = await store.list_deliveries(limit=4, after_event_id=page1[-1].event_id)
    assert [d.event_id for d in page1 + page2] == list(range(1, 8))


async def test_requeue_dead_makes_deliveries_pending_again(store: Outbox):
    for seq in range(2):
        await store.append(event(f"T0{seq}", 1))
    for d in await store.claim("cloud", 10):
        await settle(store, d.event_id, Verdict.DEAD, error="400")
    assert await store.requeue_dead(event_id=1) == 1
    assert (await store.stats()).sinks["cloud"].dead == 1
    assert await store.requeue_dead() == 1
    stats = (await store.stats()).sinks["cloud"]
    assert (stats.pending, stats.dead) == (2, 0)
    assert len(await store.claim("cloud", 10)) == 2


async def test_reschedule_makes_waiting_deliveries_due_now(store: Outbox, clock: Clock):
    await store.append(event())
    [d] = await store.claim("cloud", 1)
    await settle(store, d.event_id, Verdict.RETRY, next_attempt_at=clock.now + 3600)
    assert await store.claim("cloud", 1) == []
    assert await store.reschedule("cloud") == 1
    assert len(await store.claim("cloud", 1)) == 1


async def test_purge_releases_delivered_payloads_but_remembers_dedupe_keys(
        store: Outbox, clock: Clock):
    delivered = await store.append(event("T01", 1))
    owed = await store.append(event("T02", 1))
    [d, _] = await store.claim("cloud", 10)
    await settle(store, d.event_id, Verdict.DELIVERED)
    await store.release([x for x in await store.claim("cloud", 10)])
    clock.advance(8 * 86400)

    result = await store.purge(delivered_before=clock.now - 7 * 86400)
    assert result.payloads_released == 1
    gone = await store.read(delivered.event_id)
    assert gone is not None and gone.purged and gone.payload is None
    kept = await store.read(owed.event_id)
    assert kept is not None and kept.payload is not None, "an owed event is never purged"
    again = await store.append(event("T01", 1))
    assert (again.event_id, again.created) == (delivered.event_id, False)


async def test_purge_keeps_events_delivered_within_the_retention(store: Outbox,
                                                                 clock: Clock):
    await store.append(event())
    [d] = await store.claim("cloud", 1)
    clock.advance(86400)
    await settle(store, d.event_id, Verdict.DELIVERED)
    result = await store.purge(delivered_before=clock.now - 3600)
    assert result.payloads_released == 0


async def test_purge_forgets_old_headers_when_asked(store: Outbox, clock: Clock):
    await store.append(event())
    [d] = await store.claim("cloud", 1)
    await settle(store, d.event_id, Verdict.DELIVERED)
    clock.advance(100)
    result = await store.purge(delivered_before=clock.now, forget_before=clock.now)
    assert (result.payloads_released, result.events_forgotten) == (1, 1)
    assert await store.read(d.event_id) is None
    fresh = await store.append(event())
    assert fresh.created and fresh.event_id > d.event_id, "ids are never reused"


# -- capacity and full disks ---------------------------------------------------------------


async def test_capacity_refuses_new_events_and_keeps_committed_ones(open_store: OpenStore):
    store = await open_store(capacity_bytes=2000)
    accepted = []
    with pytest.raises(OutboxFull):
        for seq in range(100):
            accepted.append(await store.append(event("T01", seq, payload=b"x" * 200)))
    assert 5 <= len(accepted) < 100
    for a in accepted:
        record = await store.read(a.event_id)
        assert record is not None and record.payload == b"x" * 200
    # Delivering frees room: the next append releases a delivered payload and fits.
    [d] = await store.claim("cloud", 1)
    await settle(store, d.event_id, Verdict.DELIVERED)
    more = await store.append(event("T01", 1000, payload=b"y" * 200))
    assert more.created
    first = await store.read(d.event_id)
    assert first is not None and first.purged


async def test_a_capacity_refusal_is_reported_until_an_event_that_size_fits_again(
        open_store: OpenStore):
    """GIVEN a store refusing a 200-byte event for capacity_bytes
    WHEN nothing changes THEN it keeps reporting why (status says "failing");
    WHEN one owed event is delivered THEN the refusal is over at once, without waiting for
    the next append: the delivered payload can be released to make room (the agent's status
    and /readyz said "full" for up to a minute after the room was back)."""
    store = await open_store(capacity_bytes=2000)
    assert await store.capacity_refusal() is None
    with pytest.raises(CapacityFull):
        for seq in range(100):
            await store.append(event("T01", seq, payload=b"x" * 200))
    refusal = await store.capacity_refusal()
    assert refusal is not None and "of 2000 bytes" in refusal and "owed" in refusal
    # A retry that is refused again, and a settle that delivers nothing, change nothing.
    with pytest.raises(CapacityFull):
        await store.append(event("T01", 500, payload=b"x" * 200))
    [d] = await store.claim("cloud", 1)
    await settle(store, d.event_id, Verdict.RETRY, next_attempt_at=0)
    assert await store.capacity_refusal() is not None
    # Delivering one frees enough for one more event of that size: no longer refused.
    [d] = await store.claim("cloud", 1)
    await settle(store, d.event_id, Verdict.DELIVERED)
    assert await store.capacity_refusal() is None
    assert (await store.append(event("T01", 1000, payload=b"y" * 200))).created
    # Full again: refused again, and reported again.
    with pytest.raises(CapacityFull):
        await store.append(event("T01", 1001, payload=b"z" * 200))
    assert await store.capacity_refusal() is not None


async def test_sqlite_page_limit_raises_outbox_full_with_data_intact(open_store: OpenStore,
                                                                    paths: tuple[Path, Path]):
    store = await open_store(max_db_bytes=256 * 1024)
    accepted = []
    with pytest.raises(OutboxFull):
        for seq in range(10_000):
            accepted.append(await store.append(event("T01", seq, payload=bytes(1500))))
    assert len(accepted) > 20
    # Settling and reading still work while full.
    [d] = await store.claim("cloud", 1)
    await settle(store, d.event_id, Verdict.RETRY, next_attempt_at=0)
    await store.close()

    roomy = await open_store(max_db_bytes=16 * 1024 * 1024)
    for a in accepted:
        record = await roomy.read(a.event_id)
        assert record is not None and record.payload == bytes(1500)
    assert (await roomy.append(event("T01", 99_999))).created
    assert await roomy.check() == []


# -- opening: pragmas, schema, corruption --------------------------------------------------


async def test_a_new_database_and_its_wal_are_readable_by_the_owner_only(tmp_path: Path):
    """Dedupe keys hold transaction ids in plaintext; a shell's umask 022 made the files
    0644 (the service's UMask=0077 did not, but `tillsync run` by hand did)."""
    old_umask = os.umask(0o022)
    try:
        store = await Outbox.open(tmp_path / "outbox.db", tmp_path / "outbox.key",
                                  create_key=True)
        await store.append(event("T01", 1))
        modes = {name: (tmp_path / name).stat().st_mode & 0o777
                 for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm")}
        await store.close()
    finally:
        os.umask(old_umask)
    assert modes == dict.fromkeys(modes, 0o600)


async def test_a_directory_as_the_database_path_is_refused_by_name(tmp_path: Path):
    with pytest.raises(OutboxUnavailable, match="is a directory") as refused:
        await Outbox.open(tmp_path, tmp_path / "outbox.key", create_key=True)
    assert str(tmp_path / "outbox.db") in refused.value.hint


def test_a_database_that_cannot_be_opened_fails_once_without_a_thread_traceback(
        tmp_path: Path):
    """GIVEN a database path SQLite cannot create (under /proc/self) WHEN a process opens
    the outbox, reports the error and exits THEN stderr holds no traceback. aiosqlite left
    its thread running after the failed connect; it then reported to the closed event loop
    ("RuntimeError: Event loop is closed", 25 lines) after the CLI's one-line error."""
    script = (
        "import asyncio, sys\n"
        "from outbox import Outbox, OutboxError\n"
        "async def main():\n"
        "    try:\n"
        f"        await Outbox.open('/proc/self/tillsync.db', {str(tmp_path / 'k')!r},"
        " create_key=True)\n"
        "    except OutboxError as err:\n"
        "        print(f'refused: {err} ({err.hint})', file=sys.stderr)\n"
        "asyncio.run(main())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refused: cannot create"), done.stderr
    assert "outbox.path" in lines[0] and "retries" not in lines[0]


@pytest.mark.parametrize(("durability", "expected"), [("full", 2), ("normal", 1)])
async def test_durability_sets_wal_and_synchronous(open_store: OpenStore, durability: str,
                                                   expected: int):
    store = await open_store(durability=durability)
    conn = store._conn
    assert conn is not None
    # Also pins the one private aiosqlite call the store relies on (outbox.db.hop).
    pragmas = await hop(conn, lambda raw: raw.execute(
        "SELECT synchronous, journal_mode, temp_store FROM pragma_synchronous,"
        " pragma_journal_mode, pragma_temp_store").fetchone())
    assert pragmas == (expected, "wal", 2)  # temp_store 2 = MEMORY


async def test_unknown_durability_is_refused(open_store: OpenStore):
    with pytest.raises(ValueError, match="durability"):
        await open_store(durability="sometimes")


async def test_schema_is_versioned_and_a_newer_one_is_refused(open_store: OpenStore,
                                                              paths: tuple[Path, Path]):
    store = await open_store()
    await store.close()
    with sqlite3.connect(paths[0]) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.LATEST
        db.execute(f"PRAGMA user_version = {schema.LATEST + 1}")
    with pytest.raises(SchemaTooNew, match="schema version"):
        await open_store()


async def test_a_file_that_is_not_a_database_is_refused(open_store: OpenStore,
                                                        paths: tuple[Path, Path]):
    store = await open_store()
    await store.close()
    paths[0].write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxCorrupt):
        await open_store()


async def test_quick_check_runs_on_open_of_an_existing_database(open_store: OpenStore):
    store = await open_store()
    assert store.integrity == "ok"  # fresh: nothing to check
    await store.append(event())
    await store.close()
    reopened = await open_store()
    assert await reopened.verified() == []
    assert reopened.integrity == "ok" and reopened.healthy


async def test_close_during_the_open_time_check_is_no_verdict_of_damage(
        open_store: OpenStore):
    """GIVEN a store reopened with enough data that its quick_check takes a while WHEN it is
    closed at once (a service stopping) THEN the interrupted check does not mark the file
    corrupt, and the next open checks it clean."""
    store = await open_store()
    big = bytes(2000)
    for start in range(0, 20_000, 1000):
        await store.append_many([event("T01", seq, payload=big + b"%d" % seq)
                                 for seq in range(start, start + 1000)])
    await store.close()
    reopened = await open_store()
    await reopened.close()
    assert reopened.integrity != "corrupt"
    again = await open_store()
    assert await again.verified() == []
    assert again.integrity == "ok"

async def test_a_damaged_btree_found_by_quick_check_stops_writes(open_store: OpenStore,
                                                                 paths: tuple[Path, Path]):
    store = await open_store()
    await store.append_many([event("T01", i, payload=bytes(300)) for i in range(200)])
    await store.close()
    data = bytearray(paths[0].read_bytes())
    page = 4096
    # Scribble over the middle of the file's interior pages, past the schema page.
    for offset in range(3 * page + 100, len(data) - page, page):
        data[offset:offset + 64] = b"\xff" * 64
    paths[0].write_bytes(bytes(data))
    try:
        reopened = await open_store()
    except OutboxCorrupt:
        return  # refused outright at open: also correct
    problems = await reopened.verified()
    assert problems and reopened.integrity == "corrupt" and not reopened.healthy
    with pytest.raises(OutboxCorrupt):
        await reopened.append(event("T09", 1))


async def test_closed_store_refuses_work_and_close_is_idempotent(store: Outbox):
    await store.close()
    await store.close()
    with pytest.raises(OutboxClosed):
        await store.append(event())


async def test_an_internal_error_fails_its_batch_but_never_kills_the_writer(
        store: Outbox, monkeypatch: pytest.MonkeyPatch):
    """GIVEN a bug that raises inside a write batch WHEN it happens THEN that batch's callers
    get OutboxUnavailable, nothing of it is committed, and later writes still work."""
    from outbox import OutboxUnavailable

    def broken(raw, settlements):
        raise RuntimeError("bug")

    await store.append(event("T01", 1))
    [d] = await store.claim("cloud", 1)
    with monkeypatch.context() as patch:
        patch.setattr(store._tx, "settle", broken)
        with pytest.raises(OutboxUnavailable, match="internal error"):
            await settle(store, d.event_id, Verdict.DELIVERED)
    assert (await store.append(event("T01", 2))).created
    await settle(store, d.event_id, Verdict.DELIVERED)
    assert (await store.stats()).sinks["cloud"].pending == 1


def test_in_chunks_splits_at_the_bound_and_marks_each_chunk() -> None:
    """GIVEN more ids than one IN list takes WHEN chunked THEN every id once, in order, each
    chunk at most IN_CHUNK long with one "?" per id."""
    ids = list(range(2 * IN_CHUNK + 1))
    chunks = list(in_chunks(ids))
    assert [len(c) for c, _ in chunks] == [IN_CHUNK, IN_CHUNK, 1]
    assert [i for c, _ in chunks for i in c] == ids
    assert all(marks == ",".join("?" * len(c)) for c, marks in chunks)
    assert list(in_chunks([])) == []
