"""The durable, encrypted outbox store (the design is in the ``outbox`` package docstring)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite

from outbox import schema
from outbox.crypto import (
    MAX_ENCRYPTIONS_PER_KEY,
    KeyRing,
    create_key_file,
    error_aad,
    event_aad,
    load_key_file,
)
from outbox.db import (
    IN_CHUNK,
    Conn,
    Durability,
    connect,
    fetchall,
    fetchone,
    fetchone_or_none,
    migrate,
    open_error,
    quick_check,
    release,
    rollback,
    stream_heads,
)
from outbox.errors import (
    DedupeConflict,
    KeyFileMissing,
    OutboxClosed,
    OutboxCorrupt,
    OutboxError,
    OutboxFull,
    OutboxUnavailable,
    RecordTampered,
)
from outbox.models import (
    Appended,
    Delivery,
    DeliveryInfo,
    DeliveryState,
    EventRecord,
    NewEvent,
    OutboxStats,
    PurgeResult,
    Settlement,
    SinkStats,
    Verdict,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]

ACTIVE = schema.ACTIVE
PARKED = schema.PARKED

# A group commit takes whatever is waiting, up to this many operations: enough to amortise
# one fsync over a burst of producers, few enough to keep one transaction short.
MAX_BATCH_OPS = 512
# Purge and reclaim work in slices so they never hold the writer for long.
PURGE_SLICE = 2000
# A failed reopen is retried no more often than this.
REOPEN_INTERVAL_S = 1.0


@dataclass(eq=False)
class _Op:
    future: asyncio.Future[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.future = asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class _AppendOp(_Op):
    events: Sequence[NewEvent]


@dataclass(eq=False)
class _SettleOp(_Op):
    settlements: Sequence[Settlement]


@dataclass(eq=False)
class _CallOp(_Op):
    fn: Callable[[Conn], Awaitable[Any]]
    after_commit: Callable[[Any], None] | None = None


@dataclass
class _AppendPlan:
    """What an append batch wrote, applied to in-memory state only after COMMIT."""

    event_rows: list[tuple[Any, ...]] = field(default_factory=list)
    delivery_rows: list[tuple[Any, ...]] = field(default_factory=list)
    results: dict[_AppendOp, list[Appended] | OutboxError] = field(default_factory=dict)
    added_bytes: int = 0
    freed_bytes: int = 0  # payloads of delivered events released to make room
    sinks: set[str] = field(default_factory=set)


class Outbox:
    """An async, group-committing, encrypted outbox on one SQLite writer connection."""

    def __init__(self, path: Path, keyring: KeyRing, conn: Conn, *, durability: Durability,
                 capacity_bytes: int | None, max_db_bytes: int | None, clock: Clock) -> None:
        self.path = path
        self.durability: Durability = durability
        self.capacity_bytes = capacity_bytes
        self.max_db_bytes = max_db_bytes
        self.commits = 0  # transactions committed by the writer: evidence of group commit
        self._keyring = keyring
        self._conn: Conn | None = conn
        self._clock = clock
        self._ops: asyncio.Queue[_Op] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: OutboxError | None = None
        self._last_reopen = 0.0
        self._next_id = 1
        self._live_bytes = 0
        self._key_uses: dict[int, int] = {}
        # Reclaim skips its scan while nothing was delivered since it last found nothing.
        self._reclaim_hopeless = False
        self._wakeups: dict[str, asyncio.Event] = {}
        self._check_task: asyncio.Task[list[str]] | None = None
        self.integrity: Literal["checking", "ok", "corrupt"] = "ok"

    # -- opening and closing -------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | Path, key_file: str | Path, *,
                   durability: Durability = "full", capacity_bytes: int | None = None,
                   max_db_bytes: int | None = None, create_key: bool = False,
                   clock: Clock = time.time) -> Outbox:
        """Open (or create) the outbox at ``path`` with the master key in ``key_file``.

        A missing key is created only when ``create_key`` is set *and* no database exists:
        a new key beside an existing queue would orphan every record in it.
        """
        path, key_file = Path(path), Path(key_file)
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {durability!r}")
        db_exists = path.exists() and path.stat().st_size > 0
        if not key_file.exists():
            if db_exists:
                raise KeyFileMissing(
                    key_file,
                    f"is missing but the database {path} exists; a new key would orphan "
                    "its queue",
                    hint="restore the key file from backup; do not create a new one")
            if not create_key:
                raise KeyFileMissing(key_file, "does not exist",
                                     hint="create one with `tillsync init`")
            create_key_file(key_file)
        keyring = KeyRing(load_key_file(key_file), key_file)

        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = await connect(path, durability, max_db_bytes)
        except sqlite3.Error as err:
            raise open_error(path, err) from err
        store = cls(path, keyring, conn, durability=durability, capacity_bytes=capacity_bytes,
                    max_db_bytes=max_db_bytes, clock=clock)
        try:
            await store._prepare(conn)
        except sqlite3.Error as err:
            await conn.close()
            raise open_error(path, err) from err
        except BaseException:
            await conn.close()
            raise
        store._writer = asyncio.create_task(store._write_loop(), name="outbox-writer")
        if db_exists:
            store.integrity = "checking"
            store._check_task = asyncio.create_task(store._check_in_background(),
                                                    name="outbox-quick-check")
        return store

    async def _check_in_background(self) -> list[str]:
        # quick_check reads the whole file (about 1 s per 700 MB here), so it runs beside
        # the writer on a read-only connection instead of delaying readiness. A reader
        # never writes or checkpoints, so this stays clear of the WAL-reset bug.
        reader = await aiosqlite.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            problems = await quick_check(reader)
        finally:
            await reader.close()
        if problems:
            self.integrity = "corrupt"
            first = " ".join(problems[0].split())[:200]
            self._failure = OutboxCorrupt(f"{self.path} failed quick_check: {first}")
            log.error("outbox: %s failed quick_check (%s); refusing writes", self.path,
                      problems[0])
        else:
            self.integrity = "ok"
        return problems

    async def verified(self) -> list[str]:
        """Wait for the quick_check started at open; returns the problems it found."""
        if self._check_task is None:
            return []
        return await asyncio.shield(self._check_task)

    async def _prepare(self, conn: Conn) -> None:
        await migrate(conn, self.path)
        rows = await fetchall(conn, "SELECT key_id, wrapped, uses FROM data_keys")
        for key_id, wrapped, uses in rows:
            self._keyring.add_wrapped(key_id, wrapped)
            self._key_uses[key_id] = uses
        await conn.execute("BEGIN IMMEDIATE")
        try:
            new_key = None if rows else await self._insert_data_key(conn, 1)
            # Recovery: an attempt in flight when the process died is owed again. One that
            # was already in doubt stays in doubt (same key, settled by lookup or resend).
            await conn.execute(
                "UPDATE deliveries SET state = CASE doubt WHEN 1 THEN 'in_doubt'"
                " ELSE 'pending' END WHERE state = 'in_flight'")
            await conn.execute("COMMIT")
        except BaseException:
            await rollback(conn)
            raise
        if new_key is not None:
            self._activate_key(*new_key)
        seq, live = await fetchone(
            conn, "SELECT (SELECT seq FROM sqlite_sequence WHERE name = 'events'),"
                  " (SELECT bytes FROM totals)")
        self._next_id = (seq or 0) + 1
        self._live_bytes = live

    async def close(self) -> None:
        """Finish queued work, stop the writer and close the database. Idempotent."""
        if self._closed:
            return
        if self._writer is not None and not self._writer.done():
            # Everything queued before this marker is committed before close returns.
            marker = _CallOp(fn=_noop)
            self._ops.put_nowait(marker)
            self._closed = True
            await asyncio.wait([marker.future])
            if not marker.future.cancelled():
                marker.future.exception()  # retrieved: a refusal here needs no report
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        self._closed = True
        if self._check_task is not None and not self._check_task.done():
            self._check_task.cancel()
            await asyncio.gather(self._check_task, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        for wakeup in self._wakeups.values():
            wakeup.set()  # let relays notice the close

    async def __aenter__(self) -> Outbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def healthy(self) -> bool:
        """True while the store accepts writes (open, and the writer has no I/O failure)."""
        return not self._closed and self._failure is None

    @property
    def closed(self) -> bool:
        """True once ``close`` was called."""
        return self._closed

    def wakeup(self, sink: str) -> asyncio.Event:
        """Return the event set whenever deliveries for ``sink`` may have become claimable."""
        event = self._wakeups.get(sink)
        if event is None:
            event = self._wakeups[sink] = asyncio.Event()
            event.set()  # a new waiter should look at least once
        return event

    # -- the public operations -------------------------------------------------------------

    async def append(self, event: NewEvent) -> Appended:
        """Append one event; returns once its transaction is durable."""
        return (await self.append_many([event]))[0]

    async def append_many(self, events: Sequence[NewEvent]) -> list[Appended]:
        """Append events all-or-nothing; returns once their transaction is durable."""
        for event in events:
            _validate(event)
        result: list[Appended] = await self._submit(_AppendOp(events=events))
        return result

    async def claim(self, sink: str, limit: int, *, now: float | None = None) -> list[Delivery]:
        """Claim up to ``limit`` due deliveries for ``sink``, at most one per stream.

        Only a stream's head (its oldest owed delivery to this sink) can be claimed, so a
        stream never has two deliveries in flight and never overtakes itself.
        """
        if limit <= 0:
            return []
        at = self._clock() if now is None else now
        claimed: list[Delivery] = await self._call(lambda c: self._claim_tx(c, sink, limit, at))
        return claimed

    async def next_due(self, sink: str) -> float | None:
        """When the earliest claimable delivery for ``sink`` falls due; None if none is owed."""
        async def tx(conn: Conn) -> float | None:
            times = [next_at for _, state, next_at, _ in await stream_heads(conn, sink)
                     if state != DeliveryState.IN_FLIGHT]
            return min(times) if times else None

        due: float | None = await self._call(tx)
        return due

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        """Record the verdicts of finished attempts (group-committed with other writes)."""
        if settlements:
            await self._submit(_SettleOp(settlements=settlements))

    async def release(self, deliveries: Iterable[Delivery]) -> None:
        """Give back claimed deliveries that were never attempted (e.g. at shutdown)."""
        keys = [(d.event_id, d.sink) for d in deliveries]
        if not keys:
            return

        async def tx(conn: Conn) -> None:
            await conn.executemany(
                "UPDATE deliveries SET state = CASE doubt WHEN 1 THEN 'in_doubt'"
                " ELSE 'pending' END WHERE event_id = ? AND sink = ? AND state = 'in_flight'",
                keys)

        await self._call(tx, after_commit=lambda _: self._wake({s for _, s in keys}))

    async def requeue_dead(self, *, event_id: int | None = None,
                           sink: str | None = None) -> int:
        """Make dead deliveries pending again (an operator's retry); returns how many.

        A requeued delivery becomes its stream's head again if nothing older is owed, so
        it goes out before later events of that stream that are still pending.
        """
        where: list[str] = ["state IN " + PARKED, "state = 'dead'"]
        params: list[int | str] = []
        if event_id is not None:
            where.append("event_id = ?")
            params.append(event_id)
        if sink is not None:
            where.append("sink = ?")
            params.append(sink)

        async def tx(conn: Conn) -> tuple[int, set[str]]:
            now = self._clock()
            sinks = {r[0] for r in await fetchall(
                conn, f"SELECT DISTINCT sink FROM deliveries WHERE {' AND '.join(where)}",
                params)}
            cur = await conn.execute(
                "UPDATE deliveries SET state = CASE doubt WHEN 1 THEN 'in_doubt'"
                " ELSE 'pending' END, next_attempt_at = ?, updated_at = ?"
                f" WHERE {' AND '.join(where)}", [now, now, *params])
            return cur.rowcount, sinks

        count, _ = await self._call(tx, after_commit=lambda r: self._wake(r[1]))
        return int(count)

    async def reschedule(self, sink: str, *, at: float | None = None) -> int:
        """Make every owed delivery of ``sink`` due at ``at`` (default now); returns how many.

        Used when a paused or backed-off sink is re-checked on an operator's request.
        """
        async def tx(conn: Conn) -> int:
            when = self._clock() if at is None else at
            cur = await conn.execute(
                f"UPDATE deliveries SET next_attempt_at = ? WHERE sink = ? AND state IN {ACTIVE}"
                " AND next_attempt_at > ?", (when, sink, when))
            return cur.rowcount

        count: int = await self._call(tx, after_commit=lambda _: self._wake({sink}))
        return count

    async def purge(self, *, delivered_before: float,
                    forget_before: float | None = None) -> PurgeResult:
        """Drop payloads of events delivered to every sink before ``delivered_before``.

        The event's header (ids and fingerprint) stays so a late resubmission is still
        recognised as a duplicate, until ``forget_before`` (when given) removes it too.
        Retired data keys that no record needs any more are deleted last.
        """
        released = forgotten = 0
        while True:
            n, _ = await self._call(lambda c: self._release_payloads(c, delivered_before),
                                    after_commit=self._released)
            released += n
            if n < PURGE_SLICE:
                break
        while forget_before is not None:
            n = await self._call(lambda c: self._forget_events(c, forget_before))
            forgotten += n
            if n < PURGE_SLICE:
                break
        retired: list[int] = await self._call(self._retire_keys_tx,
                                              after_commit=self._forget_keys)
        return PurgeResult(released, forgotten, len(retired))

    async def rotate_key(self) -> int:
        """Start sealing new records with a new data key; returns its id."""
        async def tx(conn: Conn) -> tuple[int, bytes]:
            (top,) = await fetchone(conn, "SELECT MAX(key_id) FROM data_keys")
            return await self._insert_data_key(conn, (top or 0) + 1)

        key_id, _ = await self._call(tx, after_commit=lambda r: self._activate_key(*r))
        log.info("outbox: data key %d is now used for new records", key_id)
        return int(key_id)

    async def stats(self) -> OutboxStats:
        """Counters per sink and for the store; oldest age from per-stream heads."""
        return await self._call(self._stats_tx)  # type: ignore[no-any-return]

    async def list_deliveries(self, *, state: DeliveryState | None = None,
                              sink: str | None = None, after_event_id: int = 0,
                              limit: int = 100) -> list[DeliveryInfo]:
        """Deliveries in event order, filtered by state and sink, for operators."""
        return await self._call(  # type: ignore[no-any-return]
            lambda c: self._list_tx(c, state, sink, after_event_id, limit))

    async def read(self, event_id: int) -> EventRecord | None:
        """One event with its decrypted payload and deliveries; None if unknown."""
        return await self._call(lambda c: self._read_tx(c, event_id))  # type: ignore[no-any-return]

    async def check(self) -> list[str]:
        """Run ``PRAGMA quick_check``; returns the problems found (empty when sound)."""
        return await self._call(quick_check)  # type: ignore[no-any-return]

    # -- the writer ------------------------------------------------------------------------

    async def _submit(self, op: _Op) -> Any:
        if self._closed:
            raise OutboxClosed("the outbox is closed")
        self._ops.put_nowait(op)
        return await asyncio.shield(op.future)

    async def _call(self, fn: Callable[[Conn], Awaitable[T]],
                    after_commit: Callable[[T], None] | None = None) -> Any:
        return await self._submit(_CallOp(fn=fn, after_commit=after_commit))

    async def _write_loop(self) -> None:
        """Run the single writer: take all queued work, one transaction, one fsync."""
        try:
            while True:
                batch = [await self._ops.get()]
                while len(batch) < MAX_BATCH_OPS and not self._ops.empty():
                    batch.append(self._ops.get_nowait())
                await self._run_batch(batch)
        except asyncio.CancelledError:
            while not self._ops.empty():
                _fail(self._ops.get_nowait(), OutboxClosed("the outbox is closed"))
            raise

    async def _run_batch(self, batch: list[_Op]) -> None:
        try:
            conn = await self._connection()
            await self._rotate_if_worn(conn)
        except OutboxError as err:
            for op in batch:
                _fail(op, err)
            return
        appends = [op for op in batch if isinstance(op, _AppendOp)]
        others = [op for op in batch if not isinstance(op, _AppendOp)]
        try:
            outcomes, plan = await self._transaction(conn, others, appends)
        except sqlite3.Error as err:
            await self._batch_failed(conn, batch, appends, others, err)
            return
        except Exception as err:
            # A bug must not kill the writer: every later caller would wait for ever.
            log.exception("outbox: internal error in a write batch; it was rolled back")
            await rollback(conn)
            for op in batch:
                _fail(op, OutboxUnavailable(f"internal error: {err!r}"))
            return
        self.commits += 1
        self._after_commit(plan, outcomes)

    async def _batch_failed(self, conn: Conn, batch: list[_Op], appends: list[_AppendOp],
                            others: list[_Op], err: sqlite3.Error) -> None:
        """Handle a failed batch: full → fail appends, retry the rest; else reopen."""
        await rollback(conn)
        if not _is_full(err):
            await self._writer_failed(err)
            for op in batch:
                _fail(op, OutboxUnavailable(f"write failed: {err}"))
            return
        full = OutboxFull(f"the disk or database is full ({err})")
        for op in appends:
            _fail(op, full)
        if not others:
            return
        # Settling and admin work free space rather than use it: try them alone.
        try:
            outcomes, plan = await self._transaction(conn, others, [])
        except sqlite3.Error as err2:
            await rollback(conn)
            for op in others:
                _fail(op, OutboxFull(f"the disk or database is full ({err2})")
                      if _is_full(err2) else OutboxUnavailable(f"write failed: {err2}"))
            if not _is_full(err2):
                await self._writer_failed(err2)
            return
        self.commits += 1
        self._after_commit(plan, outcomes)

    async def _transaction(self, conn: Conn, others: list[_Op], appends: list[_AppendOp],
                           ) -> tuple[dict[_Op, Any], _AppendPlan]:
        outcomes: dict[_Op, Any] = {}
        await conn.execute("BEGIN IMMEDIATE")
        for op in others:
            if isinstance(op, _SettleOp):
                await self._settle_tx(conn, op.settlements)
                outcomes[op] = None
            elif isinstance(op, _CallOp):
                # A savepoint per call: one operator request failing leaves the rest intact.
                await conn.execute("SAVEPOINT call")
                try:
                    outcomes[op] = await op.fn(conn)
                except sqlite3.Error:
                    raise
                except Exception as err:  # handed to its caller, not swallowed
                    await conn.execute("ROLLBACK TO call")
                    outcomes[op] = err
                await conn.execute("RELEASE call")
        plan = await self._append_tx(conn, appends) if appends else _AppendPlan()
        await conn.execute("COMMIT")
        return outcomes, plan

    def _after_commit(self, plan: _AppendPlan, outcomes: dict[_Op, Any]) -> None:
        self._live_bytes += plan.added_bytes - plan.freed_bytes
        active = self._keyring.active_id
        self._key_uses[active] = self._key_uses.get(active, 0) + len(plan.event_rows)
        self._wake(plan.sinks)
        for append_op, result in plan.results.items():
            if isinstance(result, OutboxError):
                _fail(append_op, result)
            else:
                _resolve(append_op, result)
        for op, outcome in outcomes.items():
            if isinstance(outcome, Exception):
                _fail(op, outcome)
                continue
            if isinstance(op, _CallOp) and op.after_commit is not None:
                op.after_commit(outcome)
            _resolve(op, outcome)

    async def _connection(self) -> Conn:
        if self.integrity == "corrupt" and self._failure is not None:
            raise self._failure  # a damaged file is not written to; an operator decides
        if self._conn is not None:
            return self._conn
        now = time.monotonic()
        if self._failure is not None and now - self._last_reopen < REOPEN_INTERVAL_S:
            raise self._failure
        self._last_reopen = now
        try:
            self._conn = await connect(self.path, self.durability, self.max_db_bytes)
        except sqlite3.Error as err:
            self._failure = OutboxUnavailable(f"cannot reopen {self.path}: {err}")
            raise self._failure from err
        log.warning("outbox: reopened %s after a write failure", self.path)
        self._failure = None
        return self._conn

    async def _writer_failed(self, err: sqlite3.Error) -> None:
        # After an I/O or fsync error the handle's view of the disk cannot be trusted
        # (fsyncgate): never retry on it. Drop it; the next batch reopens from disk.
        log.error("outbox: write to %s failed (%s); refusing writes until reopened",
                  self.path, err)
        self._failure = OutboxUnavailable(f"write failed: {err}")
        self._last_reopen = time.monotonic()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except sqlite3.Error as close_err:
                log.debug("outbox: closing the failed connection: %s", close_err)

    def _wake(self, sinks: Iterable[str]) -> None:
        for sink in sinks:
            self.wakeup(sink).set()

    # -- keys ------------------------------------------------------------------------------

    async def _insert_data_key(self, conn: Conn, key_id: int) -> tuple[int, bytes]:
        # The key joins the ring only after COMMIT: a ring holding a key the database
        # lacks would seal records that nobody could open after a restart.
        wrapped = self._keyring.wrap_new_data_key(key_id)
        await conn.execute(
            "INSERT INTO data_keys (key_id, wrapped, created_at) VALUES (?, ?, ?)",
            (key_id, wrapped, self._clock()))
        return key_id, wrapped

    def _activate_key(self, key_id: int, wrapped: bytes) -> None:
        self._keyring.add_wrapped(key_id, wrapped)
        self._key_uses.setdefault(key_id, 0)

    async def _rotate_if_worn(self, conn: Conn) -> None:
        if self._key_uses.get(self._keyring.active_id, 0) < MAX_ENCRYPTIONS_PER_KEY:
            return
        await conn.execute("BEGIN IMMEDIATE")
        try:
            new = await self._insert_data_key(conn, self._keyring.active_id + 1)
            await conn.execute("COMMIT")
        except sqlite3.Error:
            await rollback(conn)
            raise
        self._activate_key(*new)
        log.info("outbox: data key %d reached its nonce budget; rotated to %d",
                 new[0] - 1, new[0])

    async def _retire_keys_tx(self, conn: Conn) -> list[int]:
        active = self._keyring.active_id
        old = [r[0] for r in await fetchall(
            conn, "SELECT key_id FROM data_keys WHERE key_id != ?", (active,))]
        retired = []
        for key_id in old:
            (used,) = await fetchone(
                conn, "SELECT EXISTS (SELECT 1 FROM events WHERE key_id = ?1"
                      " AND sealed IS NOT NULL) OR EXISTS (SELECT 1 FROM deliveries"
                      " WHERE error_key_id = ?1)", (key_id,))
            if not used:
                await conn.execute("DELETE FROM data_keys WHERE key_id = ?", (key_id,))
                retired.append(key_id)
        return retired

    def _forget_keys(self, key_ids: list[int]) -> None:
        for key_id in key_ids:
            self._keyring.forget(key_id)
            self._key_uses.pop(key_id, None)
            log.info("outbox: data key %d retired; no record needs it any more", key_id)

    # -- transactions (run by the writer only) ---------------------------------------------

    async def _append_tx(self, conn: Conn, ops: list[_AppendOp]) -> _AppendPlan:
        now = self._clock()
        plan = _AppendPlan()
        known = await self._existing(conn, {e.dedupe_key for op in ops for e in op.events
                                            if e.dedupe_key is not None})
        ring = self._keyring
        for op in ops:
            results: list[Appended] = []
            rows: list[tuple[Any, ...]] = []
            deliveries: list[tuple[Any, ...]] = []
            staged: dict[str, tuple[int, bytes, str, tuple[str, ...], float]] = {}
            op_bytes = 0
            failure: OutboxError | None = None
            for ev in op.events:
                fp = ring.fingerprint(ev.stream.encode(), ev.kind.encode(), ev.payload)
                prior = staged.get(ev.dedupe_key) if ev.dedupe_key else None
                if prior is None and ev.dedupe_key:
                    prior = known.get(ev.dedupe_key)
                if prior is not None:
                    event_id, prior_fp, key, sinks, accepted = prior
                    if prior_fp != fp:
                        failure = DedupeConflict(ev.dedupe_key or "", event_id)
                        break
                    results.append(Appended(event_id, key, sinks, accepted, created=False))
                    continue
                event_id = self._next_id
                self._next_id += 1  # ids of rolled-back batches are skipped, never reused
                key_id = ring.active_id
                sealed = ring.seal(ev.payload, event_aad(event_id, ev.kind, key_id, ev.stream,
                                                         ev.idempotency_key))
                size = len(sealed)
                op_bytes += size
                rows.append((event_id, ev.stream, ev.kind, ev.dedupe_key, ev.idempotency_key,
                             fp, json.dumps(list(ev.sinks)), key_id, sealed, size, now,
                             ev.expires_at))
                deliveries.extend((event_id, sink, ev.stream, now, size, now)
                                  for sink in ev.sinks)
                if ev.dedupe_key:
                    staged[ev.dedupe_key] = (event_id, fp, ev.idempotency_key, ev.sinks, now)
                results.append(Appended(event_id, ev.idempotency_key, ev.sinks, now,
                                        created=True))
            if failure is None and op_bytes and self.capacity_bytes is not None:
                held = self._live_bytes + plan.added_bytes - plan.freed_bytes
                over = held + op_bytes - self.capacity_bytes
                if over > 0:
                    freed = await self._reclaim(conn, over)
                    plan.freed_bytes += freed
                    if freed < over:
                        failure = OutboxFull(
                            f"the outbox holds {held - freed} of {self.capacity_bytes} bytes;"
                            f" {op_bytes} more do not fit")
            if failure is not None:
                plan.results[op] = failure
                continue
            plan.results[op] = results
            plan.event_rows.extend(rows)
            plan.delivery_rows.extend(deliveries)
            plan.added_bytes += op_bytes
            plan.sinks.update(s for ev in op.events for s in ev.sinks)
            for dedupe_key, entry in staged.items():
                known[dedupe_key] = entry
        if plan.event_rows:
            await conn.executemany(
                "INSERT INTO events (id, stream, kind, dedupe_key, idempotency_key, fingerprint,"
                " sinks, key_id, sealed, size, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", plan.event_rows)
            await conn.executemany(
                "INSERT INTO deliveries (event_id, sink, stream, state, next_attempt_at, size,"
                " updated_at) VALUES (?, ?, ?, 'pending', ?, ?, ?)", plan.delivery_rows)
            await conn.execute("UPDATE data_keys SET uses = uses + ? WHERE key_id = ?",
                               (len(plan.event_rows), ring.active_id))
        return plan

    async def _existing(self, conn: Conn, keys: set[str],
                        ) -> dict[str, tuple[int, bytes, str, tuple[str, ...], float]]:
        found: dict[str, tuple[int, bytes, str, tuple[str, ...], float]] = {}
        ordered = sorted(keys)
        for i in range(0, len(ordered), IN_CHUNK):
            chunk = ordered[i:i + IN_CHUNK]
            rows = await fetchall(
                conn, "SELECT dedupe_key, id, fingerprint, idempotency_key, sinks, created_at"
                f" FROM events WHERE dedupe_key IN ({','.join('?' * len(chunk))})", chunk)
            for dedupe_key, event_id, fp, key, sinks, created in rows:
                found[dedupe_key] = (event_id, fp, key, tuple(json.loads(sinks)), created)
        return found

    async def _reclaim(self, conn: Conn, needed: int) -> int:
        """Release payloads of fully delivered events, oldest first, to fit ``needed`` bytes.

        Delivered events are only kept for operators and retention; releasing them early
        is the one thing done to make room. Nothing owed is ever dropped.
        """
        if self._reclaim_hopeless:
            return 0
        freed = 0
        after = 0
        while freed < needed:
            rows = await fetchall(
                conn, "SELECT id, size FROM events WHERE id > ? AND sealed IS NOT NULL AND NOT"
                      " EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id AND"
                      " d.state != 'delivered') ORDER BY id LIMIT ?", (after, PURGE_SLICE))
            if not rows:
                break
            take = []
            for event_id, size in rows:
                take.append((event_id,))
                freed += size
                after = event_id
                if freed >= needed:
                    break
            await release(conn, take)
        if freed < needed:
            self._reclaim_hopeless = True
        return freed

    async def _release_payloads(self, conn: Conn, delivered_before: float,
                                ) -> tuple[int, int]:
        rows = await fetchall(
            conn, "SELECT id FROM events WHERE created_at < ?1 AND sealed IS NOT NULL AND NOT"
                  " EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = events.id AND"
                  " (d.state != 'delivered' OR d.updated_at >= ?1)) ORDER BY id LIMIT ?2",
            (delivered_before, PURGE_SLICE))
        return len(rows), await release(conn, rows)

    def _released(self, result: tuple[int, int]) -> None:
        self._live_bytes -= result[1]

    async def _forget_events(self, conn: Conn, forget_before: float) -> int:
        cur = await conn.execute(
            "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE created_at < ?"
            " AND sealed IS NULL AND quarantined = 0 ORDER BY id LIMIT ?)",
            (forget_before, PURGE_SLICE))
        return cur.rowcount

    async def _claim_tx(self, conn: Conn, sink: str, limit: int, now: float) -> list[Delivery]:
        heads = await stream_heads(conn, sink)
        due = sorted(event_id for event_id, state, next_at, _ in heads
                     if state != DeliveryState.IN_FLIGHT and next_at <= now)[:limit]
        if not due:
            return []
        rows = await fetchall(
            conn, "SELECT e.id, e.stream, e.kind, e.idempotency_key, e.key_id, e.sealed,"
                  " e.created_at, e.expires_at, d.attempts, d.doubt FROM deliveries d"
                  " JOIN events e ON e.id = d.event_id WHERE d.sink = ? AND d.event_id IN"
                  f" ({','.join('?' * len(due))}) ORDER BY e.id", [sink, *due])
        claimed: list[Delivery] = []
        tampered: list[int] = []
        for (event_id, stream, kind, key, key_id, sealed, created, expires, attempts,
             doubt) in rows:
            try:
                if sealed is None:
                    raise RecordTampered("owed event has no payload")
                payload = self._keyring.open(key_id, sealed,
                                             event_aad(event_id, kind, key_id, stream, key))
            except RecordTampered:
                tampered.append(event_id)
                continue
            claimed.append(Delivery(event_id, sink, stream, kind, key, payload, attempts,
                                    bool(doubt), created, expires))
        if tampered:
            await self._quarantine(conn, tampered)
        await conn.executemany(
            "UPDATE deliveries SET state = 'in_flight', updated_at = ? WHERE event_id = ?"
            " AND sink = ?", [(now, d.event_id, sink) for d in claimed])
        return claimed

    async def _settle_tx(self, conn: Conn, settlements: Sequence[Settlement]) -> None:
        now = self._clock()
        ring = self._keyring
        delivered, retry, dead = [], [], []
        for s in settlements:
            error = None
            if s.error is not None:
                error = ring.seal(s.error.encode(), error_aad(s.event_id, s.sink, ring.active_id))
            if s.verdict is Verdict.DELIVERED:
                delivered.append((now, s.event_id, s.sink))
            elif s.verdict is Verdict.DEAD:
                dead.append((error, ring.active_id, now, s.event_id, s.sink))
            else:
                doubt = 1 if s.verdict is Verdict.IN_DOUBT else 0
                next_at = now if s.next_attempt_at is None else s.next_attempt_at
                retry.append((doubt, doubt, next_at, error, ring.active_id, now,
                              s.event_id, s.sink))
        if delivered:
            await conn.executemany(
                "UPDATE deliveries SET state = 'delivered', doubt = 0, attempts = attempts + 1,"
                " last_error = NULL, error_key_id = NULL, updated_at = ? WHERE event_id = ?"
                " AND sink = ? AND state = 'in_flight'", delivered)
            self._reclaim_hopeless = False
        if retry:
            # A retry keeps an earlier doubt: that attempt may still have taken effect.
            await conn.executemany(
                "UPDATE deliveries SET state = CASE WHEN ? = 1 OR doubt = 1 THEN 'in_doubt'"
                " ELSE 'pending' END, doubt = MAX(doubt, ?), attempts = attempts + 1,"
                " next_attempt_at = ?, last_error = ?, error_key_id = ?, updated_at = ?"
                " WHERE event_id = ? AND sink = ? AND state = 'in_flight'", retry)
        if dead:
            await conn.executemany(
                "UPDATE deliveries SET state = 'dead', attempts = attempts + 1, last_error = ?,"
                " error_key_id = ?, updated_at = ? WHERE event_id = ? AND sink = ?"
                " AND state = 'in_flight'", dead)

    async def _quarantine(self, conn: Conn, event_ids: list[int]) -> None:
        marks = ",".join("?" * len(event_ids))
        await conn.execute(f"UPDATE events SET quarantined = 1 WHERE id IN ({marks})", event_ids)
        await conn.execute(
            "UPDATE deliveries SET state = 'quarantined', updated_at = ? WHERE event_id IN"
            f" ({marks}) AND state != 'delivered'", [self._clock(), *event_ids])
        for event_id in event_ids:
            log.error("outbox: event %d failed authentication; quarantined, will not be sent",
                      event_id)

    async def _stats_tx(self, conn: Conn) -> OutboxStats:
        now = self._clock()
        events, total = await fetchone(conn, "SELECT events, bytes FROM totals")
        sinks: dict[str, SinkStats] = {}
        for sink, pending, in_doubt, dead, quarantined, size in await fetchall(
                conn, "SELECT sink, pending, in_doubt, dead, quarantined, bytes FROM sink_stats"
                      " ORDER BY sink"):
            oldest = None
            if pending or in_doubt:
                created = [c for *_, c in await stream_heads(conn, sink)]
                oldest = max(0.0, now - min(created)) if created else None
            sinks[sink] = SinkStats(sink, pending, in_doubt, dead, quarantined, size, oldest)
        return OutboxStats(events, total, self.capacity_bytes, sinks)

    async def _list_tx(self, conn: Conn, state: DeliveryState | None, sink: str | None,
                       after: int, limit: int) -> list[DeliveryInfo]:
        where: list[str] = ["d.event_id > ?"]
        params: list[int | str] = [after]
        if state is not None:
            where.append(_STATE_FILTER[DeliveryState(state)])
        if sink is not None:
            where.append("d.sink = ?")
            params.append(sink)
        rows = await fetchall(
            conn, f"SELECT {_INFO_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id"
                  f" WHERE {' AND '.join(where)} ORDER BY d.event_id, d.sink LIMIT ?",
            [*params, limit])
        return [self._info(row) for row in rows]

    async def _read_tx(self, conn: Conn, event_id: int) -> EventRecord | None:
        row = await fetchone_or_none(
            conn, "SELECT id, stream, kind, idempotency_key, dedupe_key, created_at, expires_at,"
                  " size, quarantined, key_id, sealed FROM events WHERE id = ?", (event_id,))
        if row is None:
            return None
        (event_id, stream, kind, key, dedupe, created, expires, size, quarantined, key_id,
         sealed) = row
        payload = None
        if sealed is not None and not quarantined:
            try:
                payload = self._keyring.open(key_id, sealed,
                                             event_aad(event_id, kind, key_id, stream, key))
            except RecordTampered:
                await self._quarantine(conn, [event_id])
                quarantined = 1
        deliveries = [self._info(r) for r in await fetchall(
            conn, f"SELECT {_INFO_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id"
                  " WHERE d.event_id = ? ORDER BY d.sink", (event_id,))]
        return EventRecord(event_id, stream, kind, key, dedupe, created, expires, size,
                           bool(quarantined), sealed is None, payload, deliveries)

    def _info(self, row: tuple[Any, ...]) -> DeliveryInfo:
        (event_id, sink, stream, kind, state, _doubt, attempts, next_at, error, error_key,
         updated, created, key, dedupe) = row
        text = None
        if error is not None:
            try:
                text = self._keyring.open(error_key, error,
                                          error_aad(event_id, sink, error_key)).decode()
            except RecordTampered:
                text = "(error text failed authentication)"
        shown = DeliveryState(state)
        owed = shown in (DeliveryState.PENDING, DeliveryState.IN_DOUBT)
        return DeliveryInfo(event_id, sink, stream, kind, shown, attempts,
                            next_at if owed else None, text, updated, created, key, dedupe)


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


# -- helpers -------------------------------------------------------------------------------


def _validate(event: NewEvent) -> None:
    for name in ("stream", "kind", "idempotency_key"):
        value = getattr(event, name)
        if not isinstance(value, str) or not value or "\x00" in value:
            raise ValueError(f"{name} must be a non-empty string without NUL, not {value!r}")
    if not isinstance(event.payload, bytes):
        raise TypeError(f"payload must be bytes, not {type(event.payload).__name__}")
    if len(set(event.sinks)) != len(event.sinks) or not all(event.sinks):
        raise ValueError(f"sinks must be distinct non-empty names, not {event.sinks!r}")


async def _noop(conn: Conn) -> None:
    return None


def _is_full(err: sqlite3.Error) -> bool:
    # SQLITE_FULL: the disk, or max_page_count, has no room. Python 3.11+ names the code.
    return getattr(err, "sqlite_errorname", "") == "SQLITE_FULL"


def _fail(op: _Op, err: BaseException) -> None:
    if not op.future.done():
        op.future.set_exception(err)


def _resolve(op: _Op, value: Any) -> None:
    if not op.future.done():
        op.future.set_result(value)
