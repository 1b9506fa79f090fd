"""The body of every outbox transaction, run on the writer connection's own thread.

``Outbox`` (in ``outbox.store``) queues callers' work and hands each group commit to
``Transactions.run_batch`` in one hop (see ``outbox.db``). Everything here is synchronous
and runs on that one thread, one batch at a time, so the in-memory ledger it keeps (next
event id, live bytes, data-key uses) never races; the event loop only reads it between hops.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outbox import schema
from outbox.crypto import MAX_ENCRYPTIONS_PER_KEY, KeyRing, error_aad, event_aad
from outbox.db import (
    Raw,
    commit,
    fetchall,
    fetchone,
    fetchone_or_none,
    in_chunks,
    is_full,
    migrate,
    release,
    rollback,
)
from outbox.errors import (
    CapacityFull,
    DedupeConflict,
    OutboxError,
    OutboxUnavailable,
    RecordTampered,
)
from outbox.heads import ClaimRow, Heads
from outbox.models import (
    Appended,
    Delivery,
    DeliveryInfo,
    DeliveryState,
    EventRecord,
    NewEvent,
    OutboxStats,
    Settlement,
    SinkStats,
    Verdict,
)

# meta row holding a sink's last Retry-After deadline, so that a restart honours it too.
HOLD_PREFIX = "retry_after_until:"
# meta row holding when a sink last took a delivery, so status still shows it after a restart.
DELIVERED_PREFIX = "last_delivered_at:"
log = logging.getLogger("outbox.store")

Clock = Callable[[], float]


def tracks_nothing(sink: str) -> bool:
    """Say no sink marks its sends: the default; every interrupted claim is in doubt."""
    return False
ACTIVE = schema.ACTIVE
PARKED = schema.PARKED
# Purge and reclaim work in slices so they never hold the writer for long.
PURGE_SLICE = 2000

# What dedupe remembers of an accepted event: id, fingerprint, idempotency key, sinks, time.
_Known = tuple[int, bytes, str, tuple[str, ...], float]


@dataclass
class Work:
    """One queued non-append operation: ``fn(raw)``, in a savepoint when ``isolated``.

    ``on_commit(outcome)`` runs right after the COMMIT that made ``fn``'s changes durable,
    before the next batch starts: in-memory state (the key ring, the ledger) follows the
    disk, never leads it, and never races the next batch.

    ``brief`` marks work that touches a bounded handful of rows (a relay round, a stats
    read): a batch made only of appends and brief work runs its statements on the event
    loop's thread (see ``Outbox._commit_batch``). Anything that may scan or rewrite many
    rows (purge, requeue, key retirement, listings) leaves it False and runs on the
    connection's thread, so it never holds up the loop.
    """

    fn: Callable[[Raw], Any]
    isolated: bool = True
    on_commit: Callable[[Any], None] | None = None
    brief: bool = False


@dataclass
class AppendPlan:
    """What the appends of one batch did: a result (or refusal) per append call."""

    results: list[list[Appended] | OutboxError] = field(default_factory=list)
    added_bytes: int = 0
    freed_bytes: int = 0  # payloads of delivered events released to make room
    sealed: int = 0  # encryptions under the active data key
    sinks: set[str] = field(default_factory=set)


@dataclass
class BatchResult:
    """A committed batch: an outcome per ``Work`` (a value or the exception it raised)."""

    outcomes: list[Any]
    plan: AppendPlan


@dataclass
class Staged:
    """A batch whose statements have run inside its open transaction; its COMMIT is owed."""

    work: Sequence[Work]
    outcomes: list[Any]
    plan: AppendPlan


class Transactions:
    """Transaction bodies plus the ledger they keep in memory between commits."""

    def __init__(self, keyring: KeyRing, clock: Clock, capacity_bytes: int | None,
                 tracks_sends: Callable[[str], bool] = tracks_nothing) -> None:
        self.keyring = keyring
        # Sinks that mark a delivery in doubt themselves (``mark_sent``) just before it can
        # reach the far side, so a claim they did not mark was certainly not sent. Worth a
        # commit per attempt only where a second attempt is costly and cannot be looked up
        # (a receipt printer).
        self.tracks_sends = tracks_sends
        self.clock = clock
        self.capacity_bytes = capacity_bytes
        self.next_id = 1
        self.live_bytes = 0
        self.key_uses: dict[int, int] = {}
        # Reclaim skips its scan while nothing was delivered since it last found nothing.
        self.reclaim_hopeless = False
        # The size of the last append refused for capacity, until one that size fits again.
        self.refused_bytes: int | None = None
        self._broken: Raw | None = None  # the handle that last failed with an I/O error
        # Opened on a full disk: interrupted attempts still to be put back (next batch).
        self.recovery_owed = False
        self.heads = Heads()

    # -- open ------------------------------------------------------------------------------

    def prepare(self, raw: Raw, path: Path) -> None:
        """Migrate, load the data keys, put interrupted attempts back, read the ledger."""
        old = migrate(raw, path)
        if old == 0:
            log.info("outbox: created %s (schema version %d)", path, schema.LATEST)
        elif old < schema.LATEST:
            log.info("outbox: migrated %s from schema version %d to %d", path, old,
                     schema.LATEST)
        rows = fetchall(raw, "SELECT key_id, wrapped, uses FROM data_keys")
        for key_id, wrapped, uses in rows:
            self.keyring.add_wrapped(key_id, wrapped)
            self.key_uses[key_id] = uses
        raw.execute("BEGIN IMMEDIATE")
        try:
            new_key = None if rows else self._insert_data_key(raw, 1)
            self._put_back_interrupted(raw)
            raw.execute("COMMIT")
        except BaseException as err:
            rollback(raw)
            if not (rows and isinstance(err, sqlite3.Error) and is_full(err)):
                raise
            # A full disk must not keep the agent from starting (it would answer nobody,
            # and systemd would give up restarting it): it opens, refuses appends with
            # OutboxFull, and the first batch that finds room puts the attempts back.
            self.recovery_owed = True
            log.warning("outbox: the disk is full; attempts interrupted by the last stop"
                        " will be retried once there is room")
        if new_key is not None:
            self.activate_key(*new_key)
        seq, live = fetchone(raw, "SELECT (SELECT seq FROM sqlite_sequence WHERE name ="
                                  " 'events'), (SELECT bytes FROM totals)")
        self.next_id = (seq or 0) + 1
        self.live_bytes = live

    # -- the group commit ------------------------------------------------------------------

    def run_batch(self, raw: Raw, work: Sequence[Work],
                  appends: Sequence[Sequence[NewEvent]]) -> BatchResult:
        """One transaction, one COMMIT: the other work first, then every append.

        A ``sqlite3.Error`` rolls the whole batch back and propagates (the caller decides:
        full disk or broken handle); an exception from one isolated ``Work`` is rolled back
        to its savepoint and becomes that work's outcome. The same three steps as below, all
        on the calling thread.
        """
        staged = self.stage(raw, work, appends)
        try:
            commit(raw)
        except BaseException as err:
            self.abandon(raw, err)
            raise
        return self.committed(staged)

    def stage(self, raw: Raw, work: Sequence[Work],
              appends: Sequence[Sequence[NewEvent]]) -> Staged:
        """BEGIN and run the batch's statements; the caller then runs ``commit(raw)``.

        On any error the transaction is rolled back (``abandon``) before this raises.
        """
        if raw is self._broken:
            # A batch queued behind one that hit an I/O error: never write on that handle.
            raise OutboxUnavailable("the write connection failed; waiting to reopen")
        try:
            self._rotate_if_worn(raw)
            raw.execute("BEGIN IMMEDIATE")
            if self.recovery_owed:
                self._put_back_interrupted(raw)
                self.heads.forget()  # they saw those deliveries in flight
            outcomes: list[Any] = []
            for item in work:
                outcomes.append(self._run_work(raw, item))
            plan = self._append(raw, appends) if appends else AppendPlan()
        except BaseException as err:
            self.abandon(raw, err)
            raise
        return Staged(work, outcomes, plan)

    def abandon(self, raw: Raw, err: BaseException) -> None:
        """Undo a batch that failed before or at its COMMIT; forget what it changed."""
        rollback(raw)
        self.heads.forget()  # it may hold changes that were just rolled back
        if isinstance(err, sqlite3.Error) and not is_full(err):
            self._broken = raw

    def committed(self, staged: Staged) -> BatchResult:
        """Bring in-memory state level with a batch whose COMMIT succeeded."""
        plan = staged.plan
        self.recovery_owed = False
        if self.refused_bytes is not None and plan.added_bytes and not any(
                isinstance(r, CapacityFull) for r in plan.results):
            self.refused_bytes = None  # events fit again (looked at only after a refusal)
        self.live_bytes += plan.added_bytes - plan.freed_bytes
        active = self.keyring.active_id
        self.key_uses[active] = self.key_uses.get(active, 0) + plan.sealed
        for item, outcome in zip(staged.work, staged.outcomes, strict=True):
            if item.on_commit is not None and not isinstance(outcome, Exception):
                item.on_commit(outcome)
        return BatchResult(staged.outcomes, plan)

    def _put_back_interrupted(self, raw: Raw) -> None:
        # Recovery: an attempt in flight when the process died is owed again, and in doubt:
        # its request may have reached the sink and taken effect unanswered. It is settled
        # by the sink's lookup, or resent with the same key and body (CONTRACT §6). A sink
        # that marks its sends is believed: what it did not mark was never sent.
        unsent = [(event_id, sink) for event_id, sink in fetchall(
            raw, "SELECT event_id, sink FROM deliveries WHERE state = 'in_flight' AND doubt = 0")
            if self.tracks_sends(sink)]
        raw.executemany("UPDATE deliveries SET state = 'pending' WHERE event_id = ? AND sink = ?"
                        " AND state = 'in_flight'", unsent)
        raw.execute("UPDATE deliveries SET state = 'in_doubt', doubt = 1"
                    " WHERE state = 'in_flight'")

    def mark_sent(self, raw: Raw, event_id: int, sink: str) -> bool:
        """Record that a claimed delivery may now reach its sink (see ``tracks_sends``)."""
        cur = raw.execute("UPDATE deliveries SET doubt = 1 WHERE event_id = ? AND sink = ?"
                          " AND state = 'in_flight'", (event_id, sink))
        return cur.rowcount == 1

    def _run_work(self, raw: Raw, item: Work) -> Any:
        if not item.isolated:
            return item.fn(raw)
        # A savepoint per call: one operator request failing leaves the rest intact.
        raw.execute("SAVEPOINT work")
        try:
            outcome = item.fn(raw)
        except sqlite3.Error:
            raise
        except Exception as err:  # handed to its caller, not swallowed
            raw.execute("ROLLBACK TO work")
            self.heads.forget()
            outcome = err
        raw.execute("RELEASE work")
        return outcome

    # -- keys ------------------------------------------------------------------------------

    def _insert_data_key(self, raw: Raw, key_id: int) -> tuple[int, bytes]:
        # The key joins the ring only after COMMIT: a ring holding a key the database
        # lacks would seal records that nobody could open after a restart.
        wrapped = self.keyring.wrap_new_data_key(key_id)
        raw.execute("INSERT INTO data_keys (key_id, wrapped, created_at) VALUES (?, ?, ?)",
                    (key_id, wrapped, self.clock()))
        return key_id, wrapped

    def activate_key(self, key_id: int, wrapped: bytes) -> None:
        """Start sealing with a committed data key."""
        self.keyring.add_wrapped(key_id, wrapped)
        self.key_uses.setdefault(key_id, 0)

    def new_key(self, raw: Raw) -> tuple[int, bytes]:
        """Insert the next data key (activated by the caller after COMMIT)."""
        (top,) = fetchone(raw, "SELECT MAX(key_id) FROM data_keys")
        return self._insert_data_key(raw, (top or 0) + 1)

    def _rotate_if_worn(self, raw: Raw) -> None:
        if self.key_uses.get(self.keyring.active_id, 0) < MAX_ENCRYPTIONS_PER_KEY:
            return
        raw.execute("BEGIN IMMEDIATE")
        try:
            new = self._insert_data_key(raw, self.keyring.active_id + 1)
            raw.execute("COMMIT")
        except BaseException:
            rollback(raw)
            raise
        self.activate_key(*new)
        log.info("outbox: data key %d reached its nonce budget; rotated to %d",
                 new[0] - 1, new[0])

    def retire_keys(self, raw: Raw) -> list[int]:
        """Delete data keys (other than the active one) that no record needs any more."""
        old = [r[0] for r in fetchall(raw, "SELECT key_id FROM data_keys WHERE key_id != ?",
                                      (self.keyring.active_id,))]
        retired = []
        for key_id in old:
            (used,) = fetchone(
                raw, "SELECT EXISTS (SELECT 1 FROM events WHERE key_id = ?1"
                     " AND sealed IS NOT NULL) OR EXISTS (SELECT 1 FROM deliveries"
                     " WHERE error_key_id = ?1)", (key_id,))
            if not used:
                raw.execute("DELETE FROM data_keys WHERE key_id = ?", (key_id,))
                retired.append(key_id)
        return retired

    def forget_keys(self, key_ids: list[int]) -> None:
        """Drop retired data keys from memory (after the COMMIT that deleted them)."""
        for key_id in key_ids:
            self.keyring.forget(key_id)
            self.key_uses.pop(key_id, None)
            log.info("outbox: data key %d retired; no record needs it any more", key_id)

    # -- append ----------------------------------------------------------------------------

    def _append(self, raw: Raw, calls: Sequence[Sequence[NewEvent]]) -> AppendPlan:
        """Dedupe, seal and insert every append call of the batch; each is all-or-nothing."""
        now = self.clock()
        plan = AppendPlan()
        known = self._existing(raw, {e.dedupe_key for events in calls for e in events
                                     if e.dedupe_key})
        event_rows: list[tuple[Any, ...]] = []
        delivery_rows: list[tuple[Any, ...]] = []
        per_sink: dict[str, list[int]] = {}  # sink -> [deliveries added, bytes added]
        for events in calls:
            staged: dict[str, _Known] = {}
            rows: list[tuple[Any, ...]] = []
            try:
                results = [self._stage(ev, known, staged, rows, now) for ev in events]
                op_bytes = sum(row[9] for row in rows)
                self._make_room(raw, plan, op_bytes)
            except OutboxError as refused:
                plan.results.append(refused)
                continue
            plan.results.append(results)
            known.update(staged)
            event_rows.extend(rows)
            plan.added_bytes += op_bytes
            for row, done in zip(rows, (r for r in results if r.created), strict=True):
                event_id, stream, size = row[0], row[1], row[9]
                for sink in done.sinks:
                    delivery_rows.append((event_id, sink, stream, now, size, now))
                    counts = per_sink.setdefault(sink, [0, 0])
                    counts[0] += 1
                    counts[1] += size
        if event_rows:
            self._insert(raw, event_rows, delivery_rows, per_sink, plan)
        return plan

    def _stage(self, ev: NewEvent, known: dict[str, _Known], staged: dict[str, _Known],
               rows: list[tuple[Any, ...]], now: float) -> Appended:
        """Stage one event: the original on a dedupe hit, else a new sealed row."""
        ring = self.keyring
        fp = ring.fingerprint(ev.stream.encode(), ev.kind.encode(), ev.payload)
        prior = None
        if ev.dedupe_key:
            prior = staged.get(ev.dedupe_key) or known.get(ev.dedupe_key)
        if prior is not None:
            event_id, prior_fp, key, sinks, accepted = prior
            if prior_fp != fp:
                raise DedupeConflict(ev.dedupe_key or "", event_id)
            return Appended(event_id, key, sinks, accepted, created=False)
        event_id = self.next_id
        self.next_id += 1  # ids of rolled-back batches are skipped, never reused
        key_id = ring.active_id
        sealed = ring.seal(ev.payload, event_aad(event_id, ev.kind, key_id, ev.stream,
                                                 ev.idempotency_key))
        rows.append((event_id, ev.stream, ev.kind, ev.dedupe_key, ev.idempotency_key, fp,
                     _sinks_json(tuple(ev.sinks)), key_id, sealed, len(sealed), now,
                     ev.expires_at))
        if ev.dedupe_key:
            staged[ev.dedupe_key] = (event_id, fp, ev.idempotency_key, ev.sinks, now)
        return Appended(event_id, ev.idempotency_key, ev.sinks, now, created=True)

    def _make_room(self, raw: Raw, plan: AppendPlan, op_bytes: int) -> None:
        if not op_bytes or self.capacity_bytes is None:
            return
        held = self.live_bytes + plan.added_bytes - plan.freed_bytes
        over = held + op_bytes - self.capacity_bytes
        if over <= 0:
            return
        freed = self._reclaim(raw, over)
        plan.freed_bytes += freed
        if freed < over:
            self.refused_bytes = op_bytes
            raise CapacityFull(f"the outbox holds {held - freed} of {self.capacity_bytes}"
                               f" bytes; {op_bytes} more do not fit")

    def room_regained(self, raw: Raw) -> bool:
        """Whether an append of the last refused size would fit now; forgets the refusal if so.

        Room comes from payloads the purge released, or delivered since and releasable.
        """
        if self.room_regained_in_memory():
            return True
        assert self.refused_bytes is not None and self.capacity_bytes is not None
        over = self.live_bytes + self.refused_bytes - self.capacity_bytes
        if self.reclaim_hopeless or self._reclaimable(raw, over) < over:
            self.reclaim_hopeless = True  # as _reclaim would have found: nothing to release
            return False
        self.refused_bytes = None
        return True

    def room_regained_in_memory(self) -> bool:
        """``room_regained`` without reading the database.

        Enough while nothing was delivered since the last look: only a purge made room.
        """
        need = self.refused_bytes
        if need is None or self.capacity_bytes is None:
            return True
        if self.live_bytes + need > self.capacity_bytes:
            return False
        self.refused_bytes = None
        return True

    def _reclaimable(self, raw: Raw, needed: int) -> int:
        """Bytes ``_reclaim`` could release, counted until ``needed`` is reached."""
        found = 0
        for _event_id, size in self._delivered_payloads(raw):
            found += size
            if found >= needed:
                break
        return found

    def _insert(self, raw: Raw, event_rows: list[tuple[Any, ...]],
                delivery_rows: list[tuple[Any, ...]], per_sink: dict[str, list[int]],
                plan: AppendPlan) -> None:
        raw.executemany(
            "INSERT INTO events (id, stream, kind, dedupe_key, idempotency_key, fingerprint,"
            " sinks, key_id, sealed, size, created_at, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", event_rows)
        raw.executemany(
            "INSERT INTO deliveries (event_id, sink, stream, state, next_attempt_at, size,"
            " updated_at) VALUES (?, ?, ?, 'pending', ?, ?, ?)", delivery_rows)
        for event_id, sink, stream, now, _, _ in delivery_rows:
            self.heads.appended(sink, stream, event_id, now)
        # The counters an insert trigger would keep, once per batch instead of once per row.
        raw.execute("UPDATE totals SET events = events + ?, bytes = bytes + ?",
                    (len(event_rows), plan.added_bytes))
        raw.executemany(
            "INSERT INTO sink_stats (sink, pending, bytes) VALUES (?, ?, ?) ON CONFLICT (sink)"
            " DO UPDATE SET pending = pending + excluded.pending,"
            " bytes = bytes + excluded.bytes",
            [(sink, n, size) for sink, (n, size) in per_sink.items()])
        raw.execute("UPDATE data_keys SET uses = uses + ? WHERE key_id = ?",
                    (len(event_rows), self.keyring.active_id))
        plan.sealed = len(event_rows)
        plan.sinks.update(per_sink)

    def _existing(self, raw: Raw, keys: set[str]) -> dict[str, _Known]:
        found: dict[str, _Known] = {}
        ordered = sorted(keys)
        for chunk, marks in in_chunks(ordered):
            rows = fetchall(
                raw, "SELECT dedupe_key, id, fingerprint, idempotency_key, sinks, created_at"
                     f" FROM events WHERE dedupe_key IN ({marks})", chunk)
            for dedupe_key, event_id, fp, key, sinks, created in rows:
                found[dedupe_key] = (event_id, fp, key, tuple(json.loads(sinks)), created)
        return found

    # -- making room and purging -----------------------------------------------------------

    def _reclaim(self, raw: Raw, needed: int) -> int:
        """Release payloads of fully delivered events, oldest first, to fit ``needed`` bytes.

        Delivered events are only kept for operators and retention; releasing them early
        is the one thing done to make room. Nothing owed is ever dropped.
        """
        if self.reclaim_hopeless:
            return 0
        freed = 0
        take: list[int] = []
        for event_id, size in self._delivered_payloads(raw):
            take.append(event_id)
            freed += size
            if freed >= needed:
                break
        release(raw, take)
        if freed < needed:
            self.reclaim_hopeless = True
        return freed

    @staticmethod
    def _delivered_payloads(raw: Raw) -> Iterator[tuple[int, int]]:
        """(event id, size) of fully delivered events still holding a payload, oldest first.

        Read a slice at a time: callers stop as soon as they have enough.
        """
        after = 0
        while True:
            rows = fetchall(
                raw, "SELECT id, size FROM events WHERE id > ? AND sealed IS NOT NULL AND NOT"
                     " EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id AND"
                     " d.state != 'delivered') ORDER BY id LIMIT ?", (after, PURGE_SLICE))
            yield from rows
            if len(rows) < PURGE_SLICE:
                return
            after = rows[-1][0]

    def release_payloads(self, raw: Raw, delivered_before: float) -> tuple[int, int]:
        """One slice of purge: payloads of events delivered everywhere before the cut-off.

        Returns (events released, bytes freed); the caller books the bytes after COMMIT.
        """
        ids = [r[0] for r in fetchall(
            raw, "SELECT id FROM events WHERE created_at < ?1 AND sealed IS NOT NULL AND NOT"
                 " EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id AND"
                 " (d.state != 'delivered' OR d.updated_at >= ?1)) ORDER BY id LIMIT ?2",
            (delivered_before, PURGE_SLICE))]
        return len(ids), release(raw, ids)

    def released(self, result: tuple[int, int]) -> None:
        """Book the bytes a committed purge slice freed."""
        self.live_bytes -= result[1]

    def forget_events(self, raw: Raw, forget_before: float) -> int:
        """One slice of purge: headers of released events older than the cut-off."""
        cur = raw.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < ?"
            " AND sealed IS NULL AND quarantined = 0 ORDER BY id LIMIT ?)",
            (forget_before, PURGE_SLICE))
        return cur.rowcount

    # -- claim and settle ------------------------------------------------------------------

    def claim(self, raw: Raw, sink: str, limit: int, now: float) -> list[Delivery]:
        """Mark up to ``limit`` due stream heads of ``sink`` in flight; return them opened."""
        heads = self.heads.of(raw, sink)
        due = sorted((h.event_id, stream) for stream, h in heads.items()
                     if h.state != DeliveryState.IN_FLIGHT and h.next_at <= now)[:limit]
        if not due:
            return []
        # A head read from the database carries its claim columns; read the others.
        read: dict[int, ClaimRow] = {}
        missing = [event_id for event_id, stream in due if heads[stream].row is None]
        for chunk, marks in in_chunks(missing):
            for event_id, *row in fetchall(
                    raw, "SELECT e.id, e.kind, e.idempotency_key, e.key_id, e.sealed,"
                         " e.expires_at, d.attempts, d.doubt FROM deliveries d JOIN events e"
                         f" ON e.id = d.event_id WHERE d.sink = ? AND d.event_id IN ({marks})",
                    [sink, *chunk]):
                read[event_id] = tuple(row)
        claimed: list[Delivery] = []
        tampered: list[int] = []
        opened: list[int] = []
        ring = self.keyring
        for event_id, stream in due:
            head = heads[stream]
            row = head.row if head.row is not None else read.get(event_id)
            if row is None:
                continue  # no such delivery row (the cache is rebuilt from disk at worst)
            kind, key, key_id, sealed, expires, attempts, doubt = row
            try:
                if sealed is None:
                    raise RecordTampered("owed event has no payload")
                payload = ring.open(key_id, sealed,
                                    event_aad(event_id, kind, key_id, stream, key))
            except RecordTampered:
                tampered.append(event_id)
                continue
            claimed.append(Delivery(event_id, sink, stream, kind, key, payload, attempts,
                                    bool(doubt), head.created, expires))
            opened.append(event_id)
        # One statement per chunk: an IN-list costs about half what executemany does per row.
        for chunk, marks in in_chunks(opened):
            raw.execute("UPDATE deliveries SET state = 'in_flight', updated_at = ? WHERE"
                        f" sink = ? AND event_id IN ({marks})", [now, sink, *chunk])
        self.heads.claimed(sink, opened)
        if tampered:
            self.quarantine(raw, tampered)
        return claimed

    def next_due(self, raw: Raw, sink: str) -> float | None:
        """When the earliest claimable delivery for ``sink`` falls due; None if none is."""
        times = [h.next_at for h in self.heads.of(raw, sink).values()
                 if h.state != DeliveryState.IN_FLIGHT]
        return min(times) if times else None

    def settle(self, raw: Raw, settlements: Sequence[Settlement]) -> None:
        """Record verdicts; only a delivery still in flight is changed."""
        now = self.clock()
        ring = self.keyring
        delivered: dict[str, list[int]] = {}  # sink -> event ids
        retry, dead = [], []
        for s in settlements:
            if s.verdict is Verdict.DELIVERED:
                ids = delivered.get(s.sink)
                if ids is None:
                    ids = delivered[s.sink] = []
                ids.append(s.event_id)
                continue
            error = None
            if s.error is not None:
                error = ring.seal(s.error.encode(), error_aad(s.event_id, s.sink, ring.active_id))
            if s.verdict is Verdict.DEAD:
                dead.append((error, ring.active_id, now, s.event_id, s.sink))
            else:
                doubt = 1 if s.verdict is Verdict.IN_DOUBT else 0
                next_at = now if s.next_attempt_at is None else s.next_attempt_at
                retry.append((doubt, doubt, next_at, error, ring.active_id, now,
                              s.event_id, s.sink))
        for sink, ids in delivered.items():
            # The common verdict is the same for every row: one statement per chunk.
            for chunk, marks in in_chunks(ids):
                raw.execute(
                    "UPDATE deliveries SET state = 'delivered', doubt = 0, attempts = attempts"
                    " + 1, last_error = NULL, error_key_id = NULL, updated_at = ? WHERE"
                    f" sink = ? AND state = 'in_flight' AND event_id IN ({marks})",
                    [now, sink, *chunk])
            self._set_time(raw, DELIVERED_PREFIX + sink, now)
        if delivered:
            self.reclaim_hopeless = False
        if retry:
            # A retry keeps an earlier doubt: that attempt may still have taken effect.
            raw.executemany(
                "UPDATE deliveries SET state = CASE WHEN ? = 1 OR doubt = 1 THEN 'in_doubt'"
                " ELSE 'pending' END, doubt = MAX(doubt, ?), attempts = attempts + 1,"
                " next_attempt_at = ?, last_error = ?, error_key_id = ?, updated_at = ?"
                " WHERE event_id = ? AND sink = ? AND state = 'in_flight'", retry)
        if dead:
            raw.executemany(
                "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, last_error = ?,"
                " error_key_id = ?, updated_at = ? WHERE event_id = ? AND sink = ?"
                " AND state = 'in_flight'", dead)
        self._reread_heads(raw, [(s.event_id, s.sink) for s in settlements])

    def settle_and_claim(self, raw: Raw, sink: str, settlements: Sequence[Settlement],
                         released: Sequence[tuple[int, str]], limit: int, now: float,
                         hold_until: float | None = None,
                         ) -> tuple[list[Delivery], float | None]:
        """Settle, release, then claim for ``sink``: one relay round (see ``Outbox``)."""
        if hold_until is not None:
            self.set_hold(raw, sink, hold_until)
        if settlements:
            self.settle(raw, settlements)
        if released:
            self.release_claimed(raw, released)
        claimed = self.claim(raw, sink, limit, now) if limit > 0 else []
        return claimed, self.next_due(raw, sink)

    def set_hold(self, raw: Raw, sink: str, until: float) -> None:
        """Record that no request may go to ``sink`` before ``until`` (a Retry-After)."""
        self._set_time(raw, HOLD_PREFIX + sink, until)

    def hold_of(self, raw: Raw, sink: str) -> float | None:
        """Return the last recorded Retry-After deadline of ``sink`` (wall clock), if any."""
        return self._time_of(raw, HOLD_PREFIX + sink)

    def last_delivered_of(self, raw: Raw, sink: str) -> float | None:
        """Return when ``sink`` last took a delivery (wall clock), if it ever did."""
        return self._time_of(raw, DELIVERED_PREFIX + sink)

    @staticmethod
    def _set_time(raw: Raw, name: str, at: float) -> None:
        raw.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name)"
                    " DO UPDATE SET value = excluded.value", (name, repr(at)))

    @staticmethod
    def _time_of(raw: Raw, name: str) -> float | None:
        row = raw.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else float(row[0])

    def _reread_heads(self, raw: Raw, keys: Sequence[tuple[int, str]]) -> None:
        # Only a head can be in flight, so only streams whose head was touched can change.
        touched: dict[str, set[str]] = {}
        for event_id, sink in keys:
            stream = self.heads.stream_of(sink, event_id)
            if stream is not None:
                touched.setdefault(sink, set()).add(stream)
        for sink, streams in touched.items():
            self.heads.reread(raw, sink, streams)

    def release_claimed(self, raw: Raw, keys: Sequence[tuple[int, str]]) -> None:
        """Give back claimed deliveries that were never attempted."""
        raw.executemany(
            "UPDATE deliveries SET state = CASE doubt WHEN 1 THEN 'in_doubt'"
            " ELSE 'pending' END WHERE event_id = ? AND sink = ? AND state = 'in_flight'", keys)
        self._reread_heads(raw, keys)

    def quarantine(self, raw: Raw, event_ids: list[int]) -> None:
        """Park events whose payload failed authentication; they are never sent."""
        now = self.clock()
        for chunk, marks in in_chunks(event_ids):
            raw.execute(f"UPDATE events SET quarantined = 1 WHERE id IN ({marks})", chunk)
            raw.execute(
                "UPDATE deliveries SET state = 'quarantined', updated_at = ? WHERE event_id IN"
                f" ({marks}) AND state != 'delivered'", [now, *chunk])
        self.heads.forget()  # rare: rebuilt on next use
        for event_id in event_ids:
            log.error("outbox: event %d failed authentication; quarantined, will not be sent",
                      event_id)

    # -- operators -------------------------------------------------------------------------

    def requeue_dead(self, raw: Raw, event_id: int | None, sink: str | None,
                     ) -> tuple[int, set[str]]:
        """Make dead deliveries owed again; returns (how many, their sinks)."""
        where: list[str] = ["state IN " + PARKED, "state = 'dead'"]
        params: list[int | str] = []
        if event_id is not None:
            where.append("event_id = ?")
            params.append(event_id)
        if sink is not None:
            where.append("sink = ?")
            params.append(sink)
        now = self.clock()
        sinks = {r[0] for r in fetchall(
            raw, f"SELECT DISTINCT sink FROM deliveries WHERE {' AND '.join(where)}", params)}
        cur = raw.execute(
            "UPDATE deliveries SET state = CASE doubt WHEN 1 THEN 'in_doubt'"
            " ELSE 'pending' END, next_attempt_at = ?, updated_at = ?"
            f" WHERE {' AND '.join(where)}", [now, now, *params])
        if cur.rowcount:
            self.heads.forget()  # a requeued delivery may be older than its stream's head
        return cur.rowcount, sinks

    def reschedule(self, raw: Raw, sink: str, at: float | None) -> int:
        """Make every owed delivery of ``sink`` due at ``at`` (default now)."""
        when = self.clock() if at is None else at
        cur = raw.execute(
            f"UPDATE deliveries SET next_attempt_at = ? WHERE sink = ? AND {schema.OWED}"
            " AND next_attempt_at > ?", (when, sink, when))
        if cur.rowcount:
            self.heads.forget()
        return cur.rowcount

    def stats(self, raw: Raw) -> OutboxStats:
        """Counters per sink and for the store; oldest age from per-stream heads."""
        now = self.clock()
        events, total = fetchone(raw, "SELECT events, bytes FROM totals")
        sinks: dict[str, SinkStats] = {}
        for sink, pending, in_doubt, dead, quarantined, size in fetchall(
                raw, "SELECT sink, pending, in_doubt, dead, quarantined, bytes FROM sink_stats"
                     " ORDER BY sink"):
            oldest = None
            if pending or in_doubt:
                created = [h.created for h in self.heads.of(raw, sink).values()]
                oldest = max(0.0, now - min(created)) if created else None
            sinks[sink] = SinkStats(sink, pending, in_doubt, dead, quarantined, size, oldest)
        return OutboxStats(events, total, self.capacity_bytes, sinks)

    def list_deliveries(self, raw: Raw, state: DeliveryState | None, sink: str | None,
                        after: int, limit: int) -> list[DeliveryInfo]:
        """Deliveries in event order, filtered by state and sink."""
        where: list[str] = ["d.event_id > ?"]
        params: list[int | str] = [after]
        if state is not None:
            where.append(_STATE_FILTER[DeliveryState(state)])
        if sink is not None:
            where.append("d.sink = ?")
            params.append(sink)
        rows = fetchall(
            raw, f"SELECT {_INFO_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id"
                 f" WHERE {' AND '.join(where)} ORDER BY d.event_id, d.sink LIMIT ?",
            [*params, limit])
        return [self._info(row) for row in rows]

    def read(self, raw: Raw, event_id: int) -> EventRecord | None:
        """One event with its decrypted payload and deliveries; None if unknown."""
        row = fetchone_or_none(
            raw, "SELECT id, stream, kind, idempotency_key, dedupe_key, created_at, expires_at,"
                 " size, quarantined, key_id, sealed FROM events WHERE id = ?", (event_id,))
        if row is None:
            return None
        (event_id, stream, kind, key, dedupe, created, expires, size, quarantined, key_id,
         sealed) = row
        payload = None
        if sealed is not None and not quarantined:
            try:
                payload = self.keyring.open(key_id, sealed,
                                            event_aad(event_id, kind, key_id, stream, key))
            except RecordTampered:
                self.quarantine(raw, [event_id])
                quarantined = 1
        deliveries = [self._info(r) for r in fetchall(
            raw, f"SELECT {_INFO_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id"
                 " WHERE d.event_id = ? ORDER BY d.sink", (event_id,))]
        return EventRecord(event_id, stream, kind, key, dedupe, created, expires, size,
                           bool(quarantined), sealed is None, payload, deliveries)

    def _info(self, row: tuple[Any, ...]) -> DeliveryInfo:
        (event_id, sink, stream, kind, state, _doubt, attempts, next_at, error, error_key,
         updated, created, key, dedupe) = row
        text = None
        if error is not None:
            try:
                text = self.keyring.open(error_key, error,
                                         error_aad(event_id, sink, error_key)).decode()
            except RecordTampered:
                text = "(error text failed authentication)"
        shown = DeliveryState(state)
        owed = shown in (DeliveryState.PENDING, DeliveryState.IN_DOUBT)
        return DeliveryInfo(event_id, sink, stream, kind, shown, attempts,
                            next_at if owed else None, text, updated, created, key, dedupe)


@functools.lru_cache(maxsize=64)
def _sinks_json(sinks: tuple[str, ...]) -> str:
    return json.dumps(list(sinks))  # a store has a handful of sink sets: encode each once


_INFO_COLUMNS = ("d.event_id, d.sink, d.stream, e.kind, d.state, d.doubt, d.attempts,"
                 " d.next_attempt_at, d.last_error, d.error_key_id, d.updated_at, e.created_at,"
                 " e.idempotency_key, e.dedupe_key")

# Each filter repeats the partial index predicate verbatim so SQLite can use that index.
_STATE_FILTER = {
    DeliveryState.PENDING: f"d.state IN {ACTIVE} AND d.state IN ('pending', 'in_flight')"
                           " AND d.doubt = 0",
    DeliveryState.IN_FLIGHT: "d.state = 'in_flight'",
    DeliveryState.IN_DOUBT: f"d.state IN {ACTIVE} AND d.doubt = 1",
    DeliveryState.DELIVERED: "d.state = 'delivered'",
    DeliveryState.DEAD: f"d.state IN {PARKED} AND d.state = 'dead'",
    DeliveryState.QUARANTINED: f"d.state IN {PARKED} AND d.state = 'quarantined'",
}

