"""Model-based test: the outbox against a plain in-memory model of the design docstring.

A Hypothesis state machine drives a real store (a SQLite file under pytest's ``tmp_path``,
an injected clock) through appends (fresh, deduplicated, conflicting, in batches), claims,
settlements with every verdict, releases, operator requeues, restarts and key rotations.
After every step the store must agree with the model on every counter, every delivery's
state, attempts, due time and error text, and every payload byte.

``TILLSYNC_MODEL_EXAMPLES`` raises the number of examples (default 50).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from outbox import (
    Appended,
    DedupeConflict,
    Delivery,
    DeliveryState,
    NewEvent,
    Outbox,
    OutboxStats,
    Settlement,
    Verdict,
)

T = TypeVar("T")

EXAMPLES = int(os.environ.get("TILLSYNC_MODEL_EXAMPLES", "50"))
STEPS = 50

STREAMS = ("till-a", "till-b", "till-c")
KINDS = ("sale", "void")
SINK_CHOICES = (("cloud",), ("erp",), ("cloud", "erp"), ("erp", "cloud"))
ENVELOPE = 28  # nonce(12) + tag(16) around every sealed payload
START = 1_000.0

S = DeliveryState
OWED = (S.PENDING, S.IN_FLIGHT, S.IN_DOUBT)
# State filters of list_deliveries checked row for row each step (the pending and in_doubt
# filters follow the stats' counting, in flight included, which the counters cover).
FILTERED = (S.IN_FLIGHT, S.DEAD)

payloads = st.binary(max_size=48)
streams = st.sampled_from(STREAMS)
kinds = st.sampled_from(KINDS)
sink_sets = st.sampled_from(SINK_CHOICES)
sinks = st.sampled_from(("cloud", "erp"))
errors = st.one_of(st.none(), st.text(max_size=20))
verdicts = st.sampled_from(list(Verdict))


async def gather(aws: list[Awaitable[T]]) -> list[T]:
    """``asyncio.gather`` inside the running loop, so the calls share the writer's batches."""
    return list(await asyncio.gather(*aws))


@dataclass(frozen=True)
class MEvent:
    """An event as the model remembers it."""

    event_id: int
    stream: str
    kind: str
    payload: bytes
    idempotency_key: str
    dedupe_key: str | None
    sinks: tuple[str, ...]
    created_at: float
    expires_at: float | None


@dataclass(frozen=True)
class MDelivery:
    """A delivery as the model tracks it (``doubt`` survives DEAD, as in the store)."""

    state: DeliveryState
    doubt: bool
    attempts: int
    next_attempt_at: float
    last_error: str | None

    def owed_again(self) -> MDelivery:
        """Back from in flight (release) or from dead (requeue)."""
        return replace(self, state=S.IN_DOUBT if self.doubt else S.PENDING)

    def recovered(self) -> MDelivery:
        """Back from in flight at a restart: in doubt, as it may have been sent."""
        return replace(self, state=S.IN_DOUBT, doubt=True)

    def shown(self) -> tuple[DeliveryState, int, float | None, str | None]:
        """What ``DeliveryInfo`` shows: next_attempt_at only while pending or in doubt."""
        due = self.next_attempt_at if self.state in (S.PENDING, S.IN_DOUBT) else None
        return self.state, self.attempts, due, self.last_error


@dataclass(frozen=True)
class Spec:
    """One event of an append batch, and what the model expects of it."""

    event: NewEvent
    same_as: int | None = None  # id of the original it deduplicates to
    conflicts_with: int | None = None  # id of the original (-1: an earlier one in the batch)


class OutboxMachine(RuleBasedStateMachine):
    """The outbox and its model, stepped together."""

    def __init__(self, base: Path) -> None:
        super().__init__()
        self.dir = base
        self.loop = asyncio.new_event_loop()
        self.now = START
        self.names = itertools.count(1)
        self.outbox = self.run(self.open())
        self.events: dict[int, MEvent] = {}
        self.by_dedupe: dict[str, int] = {}
        self.deliveries: dict[tuple[int, str], MDelivery] = {}
        self.claimed: dict[tuple[int, str], Delivery] = {}
        self.sinks_seen: set[str] = set()
        self.last_key_id = 1
        self.unread: set[int] = set()  # appended since the last payload read-back
        self.read_all = False  # read every payload back at the next check
        self.steps = 0

    # -- plumbing ----------------------------------------------------------------------

    def run(self, aw: Coroutine[Any, Any, T]) -> T:
        """Run one coroutine on the machine's own event loop."""
        return self.loop.run_until_complete(aw)

    async def open(self) -> Outbox:
        return await Outbox.open(self.dir / "outbox.db", self.dir / "outbox.key",
                                 durability="normal", create_key=True, clock=lambda: self.now)

    def teardown(self) -> None:
        try:
            self.run(self.outbox.close())
        finally:
            self.loop.close()

    def fresh(self, prefix: str) -> str:
        return f"{prefix}-{next(self.names)}"

    def record_new(self, ev: NewEvent, appended: Appended) -> None:
        assert appended.created
        assert appended.event_id > max(self.events, default=0), "ids must rise"
        assert (appended.idempotency_key, appended.sinks, appended.accepted_at) == (
            ev.idempotency_key, ev.sinks, self.now)
        self.events[appended.event_id] = MEvent(
            appended.event_id, ev.stream, ev.kind, ev.payload, ev.idempotency_key,
            ev.dedupe_key, ev.sinks, self.now, ev.expires_at)
        if ev.dedupe_key is not None:
            self.by_dedupe[ev.dedupe_key] = appended.event_id
        self.unread.add(appended.event_id)
        for sink in ev.sinks:
            self.deliveries[(appended.event_id, sink)] = MDelivery(S.PENDING, False, 0,
                                                                   self.now, None)
            self.sinks_seen.add(sink)

    def check_duplicate(self, appended: Appended, original: int) -> None:
        """A resubmission answers with the original's id, key, sinks and time."""
        orig = self.events[original]
        assert appended == Appended(original, orig.idempotency_key, orig.sinks,
                                    orig.created_at, created=False)

    def heads(self, sink: str) -> dict[str, int]:
        """Each stream's head for ``sink``: its lowest owed event id (dead never blocks)."""
        heads: dict[str, int] = {}
        for (event_id, s), d in sorted(self.deliveries.items()):
            stream = self.events[event_id].stream
            if s == sink and d.state in OWED and stream not in heads:
                heads[stream] = event_id
        return heads

    # -- appends -----------------------------------------------------------------------

    @initialize(events=st.lists(st.tuples(streams, kinds, payloads, sink_sets), max_size=6))
    def some_events_to_start_with(self, events: list[tuple[str, str, bytes, tuple[str, ...]]],
                                  ) -> None:
        batch = [NewEvent(stream, kind, payload, sinks, self.fresh("idem"), self.fresh("key"))
                 for stream, kind, payload, sinks in events]
        for ev, res in zip(batch, self.run(self.outbox.append_many(batch)), strict=True):
            self.record_new(ev, res)

    @rule(stream=streams, kind=kinds, payload=payloads, sinks=sink_sets,
          dedupe=st.booleans(), expires=st.booleans())
    def append_new(self, stream: str, kind: str, payload: bytes, sinks: tuple[str, ...],
                   dedupe: bool, expires: bool) -> None:
        ev = NewEvent(stream, kind, payload, sinks, self.fresh("idem"),
                      self.fresh("key") if dedupe else None,
                      self.now + 3_600 if expires else None)
        self.record_new(ev, self.run(self.outbox.append(ev)))

    @precondition(lambda self: self.by_dedupe)
    @rule(data=st.data(), same=st.booleans())
    def resubmitting_a_dedupe_key_returns_the_original_or_conflicts(
            self, data: st.DataObject, same: bool) -> None:
        """Same key and same (stream, kind, payload): the original's id and key, nothing new
        (the resubmission's sinks and idempotency key do not matter). Same key, different
        stream, kind or payload: DedupeConflict naming the original, nothing changes."""
        key = data.draw(st.sampled_from(sorted(self.by_dedupe)))
        orig = self.events[self.by_dedupe[key]]
        if same:
            ev = NewEvent(orig.stream, orig.kind, orig.payload, data.draw(sink_sets),
                          self.fresh("idem"), key)
            self.check_duplicate(self.run(self.outbox.append(ev)), orig.event_id)
            return
        with pytest.raises(DedupeConflict) as caught:
            self.run(self.outbox.append(self.conflicting(data, orig)))
        assert (caught.value.dedupe_key, caught.value.event_id) == (key, orig.event_id)

    def conflicting(self, data: st.DataObject, orig: MEvent | NewEvent) -> NewEvent:
        what = data.draw(st.sampled_from(("payload", "stream", "kind")))
        stream, kind, payload = orig.stream, orig.kind, orig.payload
        if what == "payload":
            payload = data.draw(payloads.filter(lambda p: p != orig.payload))
        elif what == "stream":
            stream = data.draw(streams.filter(lambda s: s != orig.stream))
        else:
            kind = data.draw(kinds.filter(lambda k: k != orig.kind))
        return NewEvent(stream, kind, payload, data.draw(sink_sets), self.fresh("idem"),
                        orig.dedupe_key)

    @rule(data=st.data(), size=st.integers(1, 4))
    def append_many_is_all_or_nothing(self, data: st.DataObject, size: int) -> None:
        """A batch mixing new events, duplicates (of stored or earlier-in-batch events) and
        at most one conflict: with the conflict nothing is stored, else each gets its id."""
        specs: list[Spec] = []
        for _ in range(size):
            kinds_of_spec = ["new", "new"]
            staged = [s for s in specs if s.same_as is None and s.conflicts_with is None
                      and s.event.dedupe_key is not None]
            if self.by_dedupe or staged:
                kinds_of_spec.append("dup")
                if not any(s.conflicts_with is not None for s in specs):
                    kinds_of_spec.append("conflict")
            choice = data.draw(st.sampled_from(kinds_of_spec))
            if choice == "new":
                ev = NewEvent(data.draw(streams), data.draw(kinds), data.draw(payloads),
                              data.draw(sink_sets), self.fresh("idem"),
                              self.fresh("key") if data.draw(st.booleans()) else None)
                specs.append(Spec(ev))
                continue
            # Resubmit a stored event or one staged earlier in this batch.
            pool: list[MEvent | NewEvent] = [self.events[i] for i in self.by_dedupe.values()]
            pool += [s.event for s in staged]
            orig = data.draw(st.sampled_from(pool))
            original_id = orig.event_id if isinstance(orig, MEvent) else -1
            if choice == "dup":
                specs.append(Spec(NewEvent(orig.stream, orig.kind, orig.payload,
                                           data.draw(sink_sets), self.fresh("idem"),
                                           orig.dedupe_key), same_as=original_id))
            else:
                specs.append(Spec(self.conflicting(data, orig), conflicts_with=original_id))

        events = [s.event for s in specs]
        conflict = next((s for s in specs if s.conflicts_with is not None), None)
        if conflict is not None:
            with pytest.raises(DedupeConflict) as caught:
                self.run(self.outbox.append_many(events))
            assert caught.value.dedupe_key == conflict.event.dedupe_key
            if conflict.conflicts_with != -1:
                assert caught.value.event_id == conflict.conflicts_with
            return  # and the invariants check that nothing of the batch was stored

        results = self.run(self.outbox.append_many(events))
        assert len(results) == len(specs)
        staged_ids: dict[str, int] = {}
        for spec, res in zip(specs, results, strict=True):
            ev = spec.event
            if spec.same_as is None:
                self.record_new(ev, res)
                if ev.dedupe_key is not None:
                    staged_ids[ev.dedupe_key] = res.event_id
            else:
                original = (spec.same_as if spec.same_as != -1
                            else staged_ids[ev.dedupe_key or ""])
                self.check_duplicate(res, original)

    @rule(data=st.data(), size=st.integers(2, 4))
    def concurrent_appends_of_one_dedupe_key_make_one_event(self, data: st.DataObject,
                                                            size: int) -> None:
        """Appends racing in one group commit: the first with a new dedupe key creates the
        event, identical resubmissions get its id, different content gets DedupeConflict,
        each call on its own (one caller's conflict does not fail the others)."""
        key = self.fresh("key")
        first = NewEvent(data.draw(streams), data.draw(kinds), data.draw(payloads),
                         data.draw(sink_sets), self.fresh("idem"), key)
        calls = [first]
        for _ in range(size - 1):
            choice = data.draw(st.sampled_from(("dup", "conflict", "other")))
            if choice == "dup":
                calls.append(NewEvent(first.stream, first.kind, first.payload,
                                      data.draw(sink_sets), self.fresh("idem"), key))
            elif choice == "conflict":
                calls.append(self.conflicting(data, first))
            else:
                calls.append(NewEvent(data.draw(streams), data.draw(kinds),
                                      data.draw(payloads), data.draw(sink_sets),
                                      self.fresh("idem"), None))

        async def race() -> list[Appended | BaseException]:
            return list(await asyncio.gather(*(self.outbox.append(ev) for ev in calls),
                                             return_exceptions=True))

        results = self.run(race())
        for ev, res in zip(calls, results, strict=True):
            if ev is first or ev.dedupe_key is None:
                assert isinstance(res, Appended), res
                self.record_new(ev, res)
            elif ev.payload == first.payload and (ev.stream, ev.kind) == (first.stream,
                                                                          first.kind):
                assert isinstance(res, Appended), res
                self.check_duplicate(res, self.by_dedupe[key])
            else:
                assert isinstance(res, DedupeConflict), res
                assert (res.dedupe_key, res.event_id) == (key, self.by_dedupe[key])

    # -- time, claims and verdicts ------------------------------------------------------

    @rule(seconds=st.integers(1, 120))
    def time_passes(self, seconds: int) -> None:
        self.now += seconds

    @rule(sink=sinks, limit=st.integers(0, 4), ahead=st.sampled_from([None, 0, 30, 10**6]))
    def claim_hands_out_due_heads_in_order(self, sink: str, limit: int,
                                           ahead: int | None) -> None:
        """Only each stream's head, never one in flight, only when due, lowest ids first."""
        self.claim(sink, limit, ahead)

    @precondition(lambda self: self.claimed)
    @rule(data=st.data(), together=st.booleans())
    def settle_records_each_verdict(self, data: st.DataObject, together: bool) -> None:
        """Some of the claimed deliveries, in one call or in concurrent calls."""
        keys = data.draw(st.lists(st.sampled_from(sorted(self.claimed)), min_size=1,
                                  unique=True))
        self.settle([self.draw_settlement(data, key) for key in keys], together)

    @rule(data=st.data(), which=st.sampled_from([("cloud",), ("erp",), ("cloud", "erp")]),
          limit=st.integers(1, 4), ahead=st.sampled_from([None, 10**6]))
    def relay_round_claims_then_settles(self, data: st.DataObject, which: tuple[str, ...],
                                        limit: int, ahead: int | None) -> None:
        """What a relay does per sink: claim a batch, then settle it in one call; sometimes
        only the start of it (the rest stays in flight, as when a relay is cut short)."""
        for sink in which:
            got = self.claim(sink, limit, ahead)
            done = data.draw(st.sampled_from([len(got), len(got), len(got) // 2, 0]))
            if done:
                self.settle([self.draw_settlement(data, (d.event_id, sink))
                             for d in got[:done]], True)

    @rule(data=st.data(), sink=sinks, limit=st.integers(0, 4),
          ahead=st.sampled_from([None, 10**6]))
    def a_relay_round_settles_releases_then_claims(self, data: st.DataObject, sink: str,
                                                   limit: int, ahead: int | None) -> None:
        """``settle_and_claim``: the verdicts and the releases first, then the claim, all in
        one commit; it also tells when the earliest claimable delivery left falls due."""
        mine = sorted(key for key in self.claimed if key[1] == sink)
        chosen = data.draw(st.lists(st.sampled_from(mine), unique=True)) if mine else []
        split = data.draw(st.integers(0, len(chosen)))
        settlements = [self.draw_settlement(data, key) for key in chosen[:split]]
        released = [self.claimed[key] for key in chosen[split:]]
        now = self.now if ahead is None else self.now + ahead
        commits = self.outbox.commits
        got, due = self.run(self.outbox.settle_and_claim(
            sink, settlements, released, limit, now=None if ahead is None else now))
        assert self.outbox.commits == commits + 1
        self.settled(settlements)
        for d in released:
            del self.claimed[(d.event_id, sink)]
            self.deliveries[(d.event_id, sink)] = self.deliveries[(d.event_id, sink)].owed_again()
        self.claimed_as_expected(sink, limit, now, got)
        waiting = [self.deliveries[(event_id, sink)].next_attempt_at
                   for event_id in self.heads(sink).values()
                   if self.deliveries[(event_id, sink)].state is not S.IN_FLIGHT]
        assert due == (min(waiting) if waiting else None)

    def claim(self, sink: str, limit: int, ahead: int | None) -> list[Delivery]:
        now = self.now if ahead is None else self.now + ahead
        got = self.run(self.outbox.claim(sink, limit, now=None if ahead is None else now))
        self.claimed_as_expected(sink, limit, now, got)
        return got

    def claimed_as_expected(self, sink: str, limit: int, now: float,
                            got: list[Delivery]) -> None:
        heads = self.heads(sink)
        due = sorted(event_id for event_id in heads.values()
                     if self.deliveries[(event_id, sink)].state is not S.IN_FLIGHT
                     and self.deliveries[(event_id, sink)].next_attempt_at <= now)
        expected = due[:limit]
        assert [d.event_id for d in got] == expected
        assert len({d.stream for d in got}) == len(got), "two from one stream"
        for d in got:
            # The ordering rule in its own words: nothing earlier of the stream still owed.
            assert not [eid for (eid, s), md in self.deliveries.items()
                        if s == sink and eid < d.event_id and md.state in OWED
                        and self.events[eid].stream == d.stream], f"{d.event_id} overtook"
            ev, md = self.events[d.event_id], self.deliveries[(d.event_id, sink)]
            assert d == Delivery(ev.event_id, sink, ev.stream, ev.kind, ev.idempotency_key,
                                 ev.payload, md.attempts, md.doubt, ev.created_at,
                                 ev.expires_at)
            self.deliveries[(d.event_id, sink)] = replace(md, state=S.IN_FLIGHT)
            self.claimed[(d.event_id, sink)] = d

    def draw_settlement(self, data: st.DataObject, key: tuple[int, str]) -> Settlement:
        next_at = data.draw(st.one_of(st.none(), st.integers(-50, 300)))
        return Settlement(key[0], key[1], data.draw(verdicts),
                          next_attempt_at=None if next_at is None else self.now + next_at,
                          error=data.draw(errors))

    def settle(self, settlements: list[Settlement], together: bool) -> None:
        """DELIVERED → delivered; DEAD → dead; RETRY → pending (in doubt if it was);
        IN_DOUBT → in doubt; attempts + 1; RETRY/IN_DOUBT due at next_attempt_at (or now)."""
        if together:
            self.run(self.outbox.settle(settlements))
        else:  # concurrently, so the writer group-commits them
            self.run(gather([self.outbox.settle([s]) for s in settlements]))
        self.settled(settlements)

    def settled(self, settlements: list[Settlement]) -> None:
        """The model's side of ``settle``."""
        for s in settlements:
            key = (s.event_id, s.sink)
            del self.claimed[key]
            md = self.deliveries[key]
            md = replace(md, attempts=md.attempts + 1, last_error=s.error)
            if s.verdict is Verdict.DELIVERED:
                md = replace(md, state=S.DELIVERED, doubt=False, last_error=None)
            elif s.verdict is Verdict.DEAD:
                md = replace(md, state=S.DEAD)
            else:
                doubt = md.doubt or s.verdict is Verdict.IN_DOUBT
                md = replace(md, state=S.IN_DOUBT if doubt else S.PENDING, doubt=doubt,
                             next_attempt_at=(self.now if s.next_attempt_at is None
                                              else s.next_attempt_at))
            self.deliveries[key] = md

    @precondition(lambda self: self.claimed)
    @rule(data=st.data())
    def release_gives_claims_back_unattempted(self, data: st.DataObject) -> None:
        keys = data.draw(st.lists(st.sampled_from(sorted(self.claimed)), min_size=1,
                                  unique=True))
        self.run(self.outbox.release([self.claimed.pop(k) for k in keys]))
        for key in keys:
            self.deliveries[key] = self.deliveries[key].owed_again()

    @precondition(lambda self: any(d.state is S.DEAD for d in self.deliveries.values()))
    @rule(data=st.data())
    def requeue_dead_makes_them_owed_and_due_now(self, data: st.DataObject) -> None:
        """Only dead deliveries matching the filter; they keep attempts, error and doubt."""
        by = data.draw(st.sampled_from(("all", "event", "sink", "both")))
        event_id = sink = None
        if by in ("event", "both") and self.events:
            event_id = data.draw(st.sampled_from(sorted(self.events)))
        if by in ("sink", "both"):
            sink = data.draw(sinks)
        match = [k for k, d in self.deliveries.items() if d.state is S.DEAD
                 and event_id in (None, k[0]) and sink in (None, k[1])]
        assert self.run(self.outbox.requeue_dead(event_id=event_id, sink=sink)) == len(match)
        for key in match:
            self.deliveries[key] = replace(self.deliveries[key].owed_again(),
                                           next_attempt_at=self.now)

    @precondition(lambda self: self.claimed)  # recovery matters when something is in flight
    @rule()
    def restart_makes_in_flight_owed_again(self) -> None:
        """Close and reopen: in flight → in doubt (it may have been sent)."""
        self.run(self.outbox.close())
        self.outbox = self.run(self.open())  # open runs recovery and quick_check
        assert self.run(self.outbox.check()) == []
        for key in self.claimed:
            self.deliveries[key] = self.deliveries[key].recovered()
        self.claimed.clear()
        self.read_all = True

    @precondition(lambda self: self.last_key_id < 4)
    @rule()
    def rotate_key_keeps_old_records_readable(self) -> None:
        key_id = self.run(self.outbox.rotate_key())
        assert key_id > self.last_key_id
        self.last_key_id = key_id
        self.read_all = True

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def store_agrees_with_the_model(self) -> None:
        """Counters, every delivery row, the state filters, and payloads byte for byte.

        Payloads are read back for every new event, for all events after a restart or a
        key rotation, and for a few more each step in turn (they never change, and a full
        read per step would cost most of the test's time). All reads go out together, so
        the writer answers them in one transaction.
        """
        every = sorted(self.events)
        self.steps += 1
        turn = set(every[self.steps * 2 % len(every):][:2]) if every else set()
        ids = every if self.read_all else sorted(self.unread | turn)
        self.unread.clear()
        self.read_all = False

        async def observe() -> list[Any]:
            return await asyncio.gather(
                self.outbox.stats(),
                self.outbox.list_deliveries(limit=10**6),
                *(self.outbox.list_deliveries(state=state, limit=10**6)
                  for state in FILTERED),
                *(self.outbox.read(i) for i in ids))

        stats, rows, *rest = self.run(observe())
        filtered, records = rest[:len(FILTERED)], rest[len(FILTERED):]
        self.check_stats(stats)

        # Every delivery: exactly the model's rows, states, attempts, due times, errors.
        assert [(d.event_id, d.sink, d.stream, d.kind, d.idempotency_key, d.dedupe_key,
                 d.created_at, *(d.state, d.attempts, d.next_attempt_at, d.last_error))
                for d in rows] == [
            (eid, sink, self.events[eid].stream, self.events[eid].kind,
             self.events[eid].idempotency_key, self.events[eid].dedupe_key,
             self.events[eid].created_at, *md.shown())
            for (eid, sink), md in sorted(self.deliveries.items())]
        for state, listed in zip(FILTERED, filtered, strict=True):
            assert [(d.event_id, d.sink) for d in listed] == sorted(
                k for k, d in self.deliveries.items() if d.state is state), state

        # Every event reads back byte for byte, with its deliveries.
        for event_id, rec in zip(ids, records, strict=True):
            ev = self.events[event_id]
            assert rec is not None
            assert (rec.event_id, rec.stream, rec.kind, rec.idempotency_key, rec.dedupe_key,
                    rec.created_at, rec.expires_at, rec.size, rec.quarantined, rec.purged,
                    rec.payload) == (
                ev.event_id, ev.stream, ev.kind, ev.idempotency_key, ev.dedupe_key,
                ev.created_at, ev.expires_at, len(ev.payload) + ENVELOPE, False, False,
                ev.payload)
            assert rec.deliveries == [d for d in rows if d.event_id == event_id]

    def check_stats(self, stats: OutboxStats) -> None:
        """Per sink: pending (in flight included), in doubt, dead, bytes, oldest age."""
        assert stats.events == len(self.events)
        assert stats.bytes == sum(len(e.payload) + ENVELOPE for e in self.events.values())
        assert set(stats.sinks) == self.sinks_seen
        for sink, got in stats.sinks.items():
            mine = {eid: d for (eid, s), d in self.deliveries.items() if s == sink}
            owed = [eid for eid, d in mine.items() if d.state in OWED]
            heads = self.heads(sink).values()
            oldest = (max(0.0, self.now - min(self.events[e].created_at for e in heads))
                      if owed else None)
            expected = (
                sum(1 for d in mine.values() if d.state in OWED and not d.doubt),
                sum(1 for d in mine.values() if d.state in OWED and d.doubt),
                sum(1 for d in mine.values() if d.state is S.DEAD),
                0,
                sum(len(self.events[e].payload) + ENVELOPE for e, d in mine.items()
                    if d.state is not S.DELIVERED),
                oldest,
            )
            assert (got.pending, got.in_doubt, got.dead, got.quarantined, got.bytes,
                    got.oldest_pending_age_s) == expected, sink


# Room for the examples (~0.4 s each) and for Hypothesis to finish shrinking a failure (it
# stops itself after 300 s) and report it, instead of pytest-timeout cutting it short.
@pytest.mark.timeout(max(900, 600 + EXAMPLES))
def test_outbox_behaves_like_its_model(tmp_path: Path) -> None:
    """GIVEN random sequences of every operation on a real store with a fixed clock
    THEN after each step counters, delivery states, due times, errors and payloads are
    exactly the model's (see ``OutboxMachine``).
    """
    runs = itertools.count()

    def machine() -> OutboxMachine:
        return OutboxMachine(tmp_path / f"run-{next(runs)}")

    run_state_machine_as_test(machine, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
