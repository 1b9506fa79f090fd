"""The durable, encrypted outbox store (the design is in the ``outbox`` package docstring).

``Outbox`` is the async face: it validates calls, queues them for the single writer, and
answers each caller after the COMMIT that made its work durable. The transaction bodies
live in ``outbox.transactions``; where each part of a batch runs is ``_commit_batch``'s
choice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite

from outbox.crypto import KeyRing, create_key_file, load_key_file
from outbox.db import (
    OPEN_HINT,
    Conn,
    Durability,
    Raw,
    commit,
    connect,
    hop,
    is_full,
    keep_wal_short,
    open_error,
    quick_check,
    raw_of,
)
from outbox.errors import (
    KeyFileMissing,
    OutboxClosed,
    OutboxCorrupt,
    OutboxError,
    OutboxFull,
    OutboxUnavailable,
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
)
from outbox.reserve import DiskReserve
from outbox.transactions import PURGE_SLICE, BatchResult, Transactions, Work, tracks_nothing

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]

# A group commit takes whatever is waiting, up to this many operations: enough to amortise
# one fsync over a burst of producers, few enough to keep one transaction short.
MAX_BATCH_OPS = 512
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
class _WorkOp(_Op):
    work: Work
    after_commit: Callable[[Any], None] | None = None


class Outbox:
    """An async, group-committing, encrypted outbox on one SQLite writer connection."""

    def __init__(self, path: Path, keyring: KeyRing, conn: Conn, *, durability: Durability,
                 capacity_bytes: int | None, max_db_bytes: int | None, clock: Clock,
                 disk_reserve_bytes: int = 0,
                 tracks_sends: Callable[[str], bool] = tracks_nothing) -> None:
        self.path = path
        self.durability: Durability = durability
        self.capacity_bytes = capacity_bytes
        self.max_db_bytes = max_db_bytes
        self.commits = 0  # transactions committed by the writer: evidence of group commit
        self.reserve = DiskReserve(path.with_name(path.name + ".reserve"), disk_reserve_bytes)
        self._tx = Transactions(keyring, clock, capacity_bytes, tracks_sends)
        self._conn: Conn | None = conn
        self._clock = clock
        self._ops: asyncio.Queue[_Op] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: OutboxError | None = None
        self._last_reopen = 0.0
        self._wakeups: dict[str, asyncio.Event] = {}
        self._checker: Conn | None = None
        self._check_task: asyncio.Task[list[str]] | None = None
        self.integrity: Literal["checking", "ok", "corrupt"] = "ok"

    # -- opening and closing -------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | Path, key_file: str | Path, *,
                   durability: Durability = "full", capacity_bytes: int | None = None,
                   max_db_bytes: int | None = None, create_key: bool = False,
                   disk_reserve_bytes: int = 0, clock: Clock = time.time,
                   tracks_sends: Callable[[str], bool] = tracks_nothing) -> Outbox:
        """Open (or create) the outbox at ``path`` with the master key in ``key_file``.

        A missing key is created only when ``create_key`` is set *and* no database exists:
        a new key beside an existing queue would orphan every record in it.
        ``disk_reserve_bytes`` keeps that much disk for deliveries (``outbox.reserve``).
        ``tracks_sends`` names the sinks that mark their sends (``mark_sent``): after a crash
        their unmarked claims go back to pending, everyone else's to in doubt.
        """
        path, key_file = Path(path), Path(key_file)
        if path.is_dir():
            raise OutboxUnavailable(f"{path} is a directory, not a database file",
                                    hint=f"set outbox.path to a file, e.g. {path / 'outbox.db'}")
        if durability not in ("full", "normal"):
            raise ValueError(f"durability must be 'full' or 'normal', not {durability!r}")
        if disk_reserve_bytes < 0:  # before anything is opened that would need closing
            raise ValueError(f"disk_reserve_bytes cannot be negative ({disk_reserve_bytes})")
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
        if not path.exists():
            # Payloads are sealed, but event ids, streams and dedupe keys (transaction ids)
            # are not: owner-only, like the key, whatever the umask (the unit sets 0077; a
            # shell's 022 made it 0644). SQLite gives -wal and -shm the database's mode.
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except OSError as err:
                raise OutboxUnavailable(f"cannot create {path}: {err.strerror or err}",
                                        hint=OPEN_HINT) from err
        try:
            conn = await connect(path, durability, max_db_bytes)
        except sqlite3.Error as err:
            raise open_error(path, err) from err
        store = cls(path, keyring, conn, durability=durability, capacity_bytes=capacity_bytes,
                    max_db_bytes=max_db_bytes, clock=clock, disk_reserve_bytes=disk_reserve_bytes,
                    tracks_sends=tracks_sends)
        reserve = store.reserve
        try:
            await hop(conn, lambda raw: store._tx.prepare(raw, path))
            if not await asyncio.to_thread(reserve.hold):
                log.warning("outbox: the %d-byte disk reserve cannot be put in place (it needs"
                            " twice that free): new events are refused until there is room",
                            reserve.size)
                await store._keep_wal_short(True)
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
        self._checker = await aiosqlite.connect(f"{self.path.resolve().as_uri()}?mode=ro",
                                                uri=True)
        try:
            problems = [] if self._closed else await hop(self._checker, quick_check)
        finally:
            checker, self._checker = self._checker, None
            await checker.close()
        if self._closed:
            return problems  # interrupted by close: no verdict on the file
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

    async def close(self) -> None:
        """Finish queued work, stop the writer and close the database. Idempotent."""
        if self._closed:
            return
        if self._writer is not None and not self._writer.done():
            # Everything queued before this marker is committed before close returns.
            marker = _WorkOp(work=Work(_noop))
            self._ops.put_nowait(marker)
            self._closed = True
            await asyncio.wait([marker.future])
            if not marker.future.cancelled():
                marker.future.exception()  # retrieved: a refusal here needs no report
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        self._closed = True
        if self._check_task is not None and not self._check_task.done():
            # A cold quick_check of a big file takes many seconds; a stopping service
            # must not wait for it (systemd would kill it first).
            if self._checker is not None:
                await self._checker.interrupt()
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
        claimed: list[Delivery] = await self._call(
            lambda raw: self._tx.claim(raw, sink, limit, at), brief=True)
        return claimed

    async def next_due(self, sink: str) -> float | None:
        """When the earliest claimable delivery for ``sink`` falls due; None if none is owed."""
        due: float | None = await self._call(lambda raw: self._tx.next_due(raw, sink),
                                             brief=True)
        return due

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        """Record the verdicts of finished attempts (group-committed with other writes)."""
        if settlements:
            # Not isolated: a settle fails only with its whole batch (a SQLite error).
            await self._submit(_WorkOp(work=Work(
                lambda raw: self._tx.settle(raw, settlements), isolated=False, brief=True)))

    async def settle_and_claim(self, sink: str, settlements: Sequence[Settlement],
                               released: Sequence[Delivery], limit: int, *,
                               now: float | None = None, hold_until: float | None = None,
                               ) -> tuple[list[Delivery], float | None]:
        """One relay round for ``sink`` in one transaction (one fsync).

        Records ``settlements`` (as ``settle``), gives back ``released`` (as ``release``),
        then claims up to ``limit`` due stream heads (as ``claim``): a stream whose head was
        just settled can hand out its next delivery in the same round. Returns the claimed
        deliveries and when the earliest claimable delivery left falls due (as ``next_due``).
        ``hold_until`` records a Retry-After deadline for ``sink`` (see ``sink_hold``).
        """
        at = self._clock() if now is None else now
        keys = [(d.event_id, d.sink) for d in released]
        result: tuple[list[Delivery], float | None] = await self._submit(_WorkOp(
            work=Work(lambda raw: self._tx.settle_and_claim(raw, sink, settlements, keys,
                                                            limit, at, hold_until),
                      isolated=False, brief=True),
            after_commit=(lambda _: self._wake({s for _, s in keys})) if keys else None))
        return result

    async def sink_hold(self, sink: str) -> float | None:
        """Return the last Retry-After deadline recorded for ``sink`` (wall clock), if any.

        A relay reads it when it starts: a sink that said "not before T" hears nothing
        before T, even from an agent restarted in between.
        """
        until: float | None = await self._call(lambda raw: self._tx.hold_of(raw, sink),
                                               brief=True)
        return until

    def tracks_sends(self, sink: str) -> bool:
        """Whether ``sink`` marks its sends (``mark_sent``), as the store was opened with."""
        return self._tx.tracks_sends(sink)

    async def mark_sent(self, delivery: Delivery) -> None:
        """Durably mark a claimed delivery in doubt before the sink lets it out.

        For sinks the store was opened with in ``tracks_sends``: from the commit on, a crash or stop
        leaves it in doubt, and before it, plain pending. Raises ``OutboxError`` when it
        cannot be recorded (then it must not be sent).
        """
        marked = await self._call(lambda raw: self._tx.mark_sent(raw, delivery.event_id,
                                                                 delivery.sink), brief=True)
        if not marked:  # put back meanwhile (a reopen after an I/O error): not ours to send
            raise OutboxError(f"delivery of event {delivery.event_id} to {delivery.sink} is"
                              " no longer claimed")

    async def sink_last_delivered(self, sink: str) -> float | None:
        """Return when ``sink`` last took a delivery (wall clock), even before a restart."""
        at: float | None = await self._call(lambda raw: self._tx.last_delivered_of(raw, sink),
                                            brief=True)
        return at

    async def release(self, deliveries: Iterable[Delivery]) -> None:
        """Give back claimed deliveries that were never attempted (e.g. at shutdown)."""
        keys = [(d.event_id, d.sink) for d in deliveries]
        if keys:
            await self._call(lambda raw: self._tx.release_claimed(raw, keys), brief=True,
                             after_commit=lambda _: self._wake({s for _, s in keys}))

    async def requeue_dead(self, *, event_id: int | None = None,
                           sink: str | None = None) -> int:
        """Make dead deliveries pending again (an operator's retry); returns how many.

        A requeued delivery becomes its stream's head again if nothing older is owed, so
        it goes out before later events of that stream that are still pending.
        """
        count, _ = await self._call(lambda raw: self._tx.requeue_dead(raw, event_id, sink),
                                    after_commit=lambda r: self._wake(r[1]))
        return int(count)

    async def reschedule(self, sink: str, *, at: float | None = None) -> int:
        """Make every owed delivery of ``sink`` due at ``at`` (default now); returns how many.

        Used when a paused or backed-off sink is re-checked on an operator's request.
        """
        count: int = await self._call(lambda raw: self._tx.reschedule(raw, sink, at),
                                      after_commit=lambda _: self._wake({sink}))
        return count

    async def purge(self, *, delivered_before: float,
                    forget_before: float | None = None) -> PurgeResult:
        """Drop payloads of events delivered to every sink before ``delivered_before``.

        The event's header (ids and fingerprint) stays so a late resubmission is still
        recognised as a duplicate, until ``forget_before`` (when given) removes it too.
        Retired data keys that no record needs any more are deleted last. Each slice is
        its own transaction, so appends are never held up for long.
        """
        released = forgotten = 0
        while True:
            n, _ = await self._call(
                lambda raw: self._tx.release_payloads(raw, delivered_before),
                on_commit=self._tx.released)
            released += n
            if n < PURGE_SLICE:
                break
        while forget_before is not None:
            n = await self._call(lambda raw: self._tx.forget_events(raw, forget_before))
            forgotten += n
            if n < PURGE_SLICE:
                break
        retired: list[int] = await self._call(self._tx.retire_keys,
                                              on_commit=self._tx.forget_keys)
        return PurgeResult(released, forgotten, len(retired))

    async def rotate_key(self) -> int:
        """Start sealing new records with a new data key; returns its id."""
        key_id, _ = await self._call(self._tx.new_key,
                                     on_commit=lambda r: self._tx.activate_key(*r))
        log.info("outbox: data key %d is now used for new records", key_id)
        return int(key_id)

    async def stats(self) -> OutboxStats:
        """Counters per sink and for the store; oldest age from per-stream heads."""
        return await self._call(self._tx.stats, brief=True)  # type: ignore[no-any-return]

    async def list_deliveries(self, *, state: DeliveryState | None = None,
                              sink: str | None = None, after_event_id: int = 0,
                              limit: int = 100) -> list[DeliveryInfo]:
        """Deliveries in event order, filtered by state and sink, for operators."""
        return await self._call(  # type: ignore[no-any-return]
            lambda raw: self._tx.list_deliveries(raw, state, sink, after_event_id, limit))

    async def read(self, event_id: int) -> EventRecord | None:
        """One event with its decrypted payload and deliveries; None if unknown."""
        return await self._call(  # type: ignore[no-any-return]
            lambda raw: self._tx.read(raw, event_id))

    async def check(self) -> list[str]:
        """Run ``PRAGMA quick_check``; returns the problems found (empty when sound)."""
        return await self._call(quick_check)  # type: ignore[no-any-return]

    # -- the writer ------------------------------------------------------------------------

    async def _submit(self, op: _Op) -> Any:
        if self._closed:
            raise OutboxClosed("the outbox is closed")
        self._ops.put_nowait(op)
        # No shield: a caller cancelled while waiting only stops waiting; the writer still
        # commits the queued work and finds the future done (``_resolve`` checks).
        return await op.future

    async def _call(self, fn: Callable[[Raw], Any], *, brief: bool = False,
                    on_commit: Callable[[Any], None] | None = None,
                    after_commit: Callable[[Any], None] | None = None) -> Any:
        """Queue ``fn`` for the writer and return its outcome once committed.

        ``on_commit`` runs with the batch (see ``Work``) and ``after_commit`` on the event
        loop (for waking tasks), both only after the COMMIT succeeded. ``brief``: see
        ``Work``.
        """
        work = Work(fn, on_commit=on_commit, brief=brief)
        return await self._submit(_WorkOp(work=work, after_commit=after_commit))

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
        """Commit ``batch`` in one transaction (``_commit_batch``); answer callers."""
        try:
            conn = await self._connection()
        except OutboxError as err:
            for op in batch:
                _fail(op, err)
            return
        others = [op for op in batch if isinstance(op, _WorkOp)]
        appends = [op for op in batch if isinstance(op, _AppendOp)]
        if appends and not self.reserve.held and not await self._hold_reserve():
            refused = OutboxFull(self.disk_refusal() or "the disk reserve cannot be written")
            for append_op in appends:
                _fail(append_op, refused)
            appends = []
            if not others:
                return
        work = [op.work for op in others]
        events = [op.events for op in appends]
        try:
            result = await self._commit_batch(conn, work, events)
        except OutboxError as err:
            for op in (*others, *appends):
                _fail(op, err)
            return
        except sqlite3.Error as err:
            await self._batch_failed(appends, others, err)
            return
        except Exception as err:
            # A bug must not kill the writer: every later caller would wait for ever.
            log.exception("outbox: internal error in a write batch; it was rolled back")
            for op in (*others, *appends):
                _fail(op, OutboxUnavailable(f"internal error: {err!r}"))
            return
        self.commits += 1
        self._answer(others, appends, result)

    async def _commit_batch(self, conn: Conn, work: list[Work],
                            events: list[Sequence[NewEvent]]) -> BatchResult:
        """Run one batch: its statements, then its COMMIT; raise as ``run_batch`` does.

        A batch of appends and brief work runs its statements here, on the event loop's
        thread, and only the COMMIT (the fsync) on the connection's thread. The sqlite3
        module lets go of the GIL around every statement step; on the connection's thread
        each step then had to win the GIL back from a busy event loop, which can take up to
        the 5 ms switch interval (measured: a 13-sale batch held the writer for 4.7 ms of
        which 1.1 ms was CPU, and a relay round 3.1 ms of which 1.5 ms was). The loop pays
        the statements' CPU either way; it no longer waits on them. Anything else runs
        whole on the connection's thread, as before. The statements touch pages the cache
        holds; the one call here that could block is BEGIN IMMEDIATE if another process
        wrote to the file (up to the 5 s busy timeout), which the agent's lock file rules
        out for everything but a hand-run ``sqlite3`` shell.
        """
        if not all(item.brief for item in work):
            return await hop(conn, lambda raw: self._tx.run_batch(raw, work, events))
        raw = raw_of(conn)
        staged = self._tx.stage(raw, work, events)
        try:
            await hop(conn, commit)
        except asyncio.CancelledError:
            # The COMMIT goes on in the connection's thread; touching the handle from here
            # now would race it. Only a closing store cancels the writer.
            raise
        except BaseException as err:
            self._tx.abandon(raw, err)
            raise
        return self._tx.committed(staged)

    async def _batch_failed(self, appends: list[_AppendOp], others: list[_WorkOp],
                            err: sqlite3.Error) -> None:
        """Handle a failed batch: full → fail appends, retry the rest; else reopen."""
        if not is_full(err):
            await self._writer_failed(err)
            for op in (*others, *appends):
                _fail(op, OutboxUnavailable(f"write failed: {err}"))
            return
        full = OutboxFull(f"the disk or database is full ({err})")
        for append_op in appends:
            _fail(append_op, full)
        reserve = self.reserve
        if reserve.held and await asyncio.to_thread(reserve.disk_is_short):
            freed = await asyncio.to_thread(reserve.release)
            log.warning("outbox: the disk is full; %s; new events are refused until %d bytes"
                        " are free", f"released the {reserve.size}-byte reserve so that"
                        " deliveries go on" if freed else f"could not delete {reserve.path}",
                        2 * reserve.size)
            await self._keep_wal_short(True)
        if not others or self._conn is None:
            return
        # Settling and admin work free space rather than use it: try them alone.
        work = [op.work for op in others]
        try:
            result = await hop(self._conn, lambda raw: self._tx.run_batch(raw, work, []))
        except (OutboxError, sqlite3.Error) as err2:
            for op in others:
                _fail(op, OutboxFull(f"the disk or database is full ({err2})")
                      if isinstance(err2, sqlite3.Error) and is_full(err2)
                      else OutboxUnavailable(f"write failed: {err2}"))
            if isinstance(err2, sqlite3.Error) and not is_full(err2):
                await self._writer_failed(err2)
            return
        self.commits += 1
        self._answer(others, [], result)

    async def capacity_refusal(self) -> str | None:
        """Why new events are refused for ``capacity_bytes``, or None.

        Set by an append refused with ``CapacityFull``; cleared as soon as an event of that
        size would fit again: after a successful append, a purge, or deliveries whose
        payloads can now be released (checked here, on the writer, only while refused and
        only when something was delivered since the last look).
        """
        tx = self._tx
        if tx.room_regained_in_memory():  # also: nothing was refused
            return None
        if not tx.reclaim_hopeless and not self._closed:
            try:
                if await self._call(tx.room_regained, brief=True):
                    return None
            except OutboxError:
                pass  # the writer cannot look now: report what is known
        need = tx.refused_bytes
        if need is None:  # an append went through meanwhile
            return None
        return (f"the outbox holds {tx.live_bytes} of {tx.capacity_bytes} bytes, all owed to"
                f" sinks; an event of {need} bytes does not fit")

    def disk_refusal(self) -> str | None:
        """Why new events are refused to keep the disk reserve, or None.

        Cheap enough for every ``/readyz`` (one statvfs): right after a restart on a full
        disk it tells the truth before any till has been refused.
        """
        reserve = self.reserve
        if reserve.held:
            return None
        try:
            free = reserve.free_bytes()
        except OSError as err:
            return f"the disk reserve is released and free space unknown ({err})"
        if free >= 2 * reserve.size:
            return None  # the next append puts the reserve back
        return (f"the disk is full: {free} bytes free, and the outbox keeps {reserve.size}"
                f" for deliveries; new events resume once {2 * reserve.size} are free")

    async def _hold_reserve(self) -> bool:
        """Try to put the released disk reserve back; log when appends can resume."""
        if not await asyncio.to_thread(self.reserve.hold):
            return False
        await self._keep_wal_short(False)
        log.info("outbox: disk space is back; the %d-byte reserve is in place and new"
                 " events are accepted again", self.reserve.size)
        return True

    async def _keep_wal_short(self, short: bool) -> None:
        """See ``outbox.db.keep_wal_short``; runs between batches, on the writer's handle."""
        if self._conn is None:
            return
        try:
            await hop(self._conn, lambda raw: keep_wal_short(raw, short))
        except (sqlite3.Error, ValueError) as err:
            log.debug("outbox: WAL cadence not changed: %s", err)

    def _answer(self, others: list[_WorkOp], appends: list[_AppendOp],
                result: BatchResult) -> None:
        """After COMMIT: wake the sinks that got work, then answer every caller."""
        self._wake(result.plan.sinks)
        for append_op, appended in zip(appends, result.plan.results, strict=True):
            if isinstance(appended, OutboxError):
                _fail(append_op, appended)
            else:
                _resolve(append_op, appended)
        for op, outcome in zip(others, result.outcomes, strict=True):
            if isinstance(outcome, Exception):
                _fail(op, outcome)
                continue
            if op.after_commit is not None:
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
        self._tx.heads.forget()  # read the heads afresh from what the disk holds
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


def _noop(raw: Raw) -> None:
    return None


def _fail(op: _Op, err: BaseException) -> None:
    if not op.future.done():
        op.future.set_exception(err)


def _resolve(op: _Op, value: Any) -> None:
    if not op.future.done():
        op.future.set_result(value)
