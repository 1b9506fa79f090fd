"""SQLite plumbing for the outbox: the connection, one-hop execution, migrations, queries.

The writer connection is an ``aiosqlite`` connection: SQLite gets its own thread, and the
slow calls (the fsync of COMMIT, checkpoints, scans) never block the event loop. Its
public API costs one thread round trip per statement (about 80 µs here, more than the
fsync), and a transaction takes half a dozen statements. So the store runs a whole
transaction as one plain function on that thread (``hop``), or, for the hot path, runs the
statements on the loop's thread and hops only for the COMMIT (``raw_of`` and ``commit``;
the reason is in ``Outbox._commit_batch``). Either way one batch at a time touches the
handle. Everything below except ``connect`` and ``hop`` is that synchronous side (or, for
the quick_check at open, runs on a read-only connection).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite

from outbox import schema
from outbox.errors import OutboxCorrupt, OutboxError, OutboxUnavailable, SchemaTooNew

log = logging.getLogger("outbox.store")

T = TypeVar("T")
Conn = aiosqlite.Connection
Raw = sqlite3.Connection
Durability = Literal["full", "normal"]
OWED = schema.OWED
# SQLite caps host parameters per statement; IN-lists are chunked below it.
IN_CHUNK = 500


async def connect(path: Path, durability: Durability, max_db_bytes: int | None) -> Conn:
    """Open the writer connection: WAL, the durability's synchronous, bounded WAL."""
    # check_same_thread off: the writer runs hot-path statements on the loop's thread and
    # the COMMIT on this connection's thread, one after the other, never at once.
    conn = aiosqlite.connect(path, isolation_level=None, check_same_thread=False)
    try:
        await conn
    except BaseException:
        # aiosqlite asks its thread to stop but does not wait for it; the thread then
        # reports to the loop, and if the loop has closed by then (the agent exiting on
        # this very error) it prints an "Event loop is closed" traceback. Wait here.
        await asyncio.to_thread(conn._thread.join, THREAD_JOIN_S)
        raise
    try:
        await hop(conn, lambda raw: _configure(raw, path, durability, max_db_bytes))
    except BaseException:
        await conn.close()
        raise
    return conn


def _configure(raw: Raw, path: Path, durability: Durability, max_db_bytes: int | None) -> None:
    (mode,) = fetchone(raw, "PRAGMA journal_mode = WAL")
    if mode != "wal":
        raise OutboxUnavailable(f"{path}: cannot switch to WAL (journal_mode is {mode})")
    raw.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
    raw.execute("PRAGMA busy_timeout = 5000")
    # Sorting and IN-lists inside statements and triggers use temporary b-trees; in a
    # file they cost a file create per statement (about 100 µs a row measured here).
    raw.execute("PRAGMA temp_store = MEMORY")
    # Bound the WAL left behind after a burst; this connection does every checkpoint.
    raw.execute("PRAGMA journal_size_limit = 67108864")
    if max_db_bytes is not None:
        (page_size,) = fetchone(raw, "PRAGMA page_size")
        raw.execute(f"PRAGMA max_page_count = {max(1, max_db_bytes // page_size)}")


# How long to wait for aiosqlite's thread to end after a failed connect.
THREAD_JOIN_S = 2.0

# SQLite's default: checkpoint once the WAL holds this many pages.
AUTOCHECKPOINT_PAGES = 1000
# While the disk reserve is released (``outbox.reserve``): checkpoint every few pages, so
# deliveries cycle through the WAL's existing blocks instead of growing it into the last
# free ones (at 1,000 pages the WAL could want 4 MB more before its first checkpoint).
TIGHT_AUTOCHECKPOINT_PAGES = 16


def keep_wal_short(raw: Raw, short: bool) -> None:
    """Checkpoint often and now (``short``), or go back to SQLite's default cadence.

    The RESTART checkpoint moves what the WAL holds into the database, so the next commit
    writes the WAL from its start again. A checkpoint that cannot finish is harmless here.
    """
    raw.execute(f"PRAGMA wal_autocheckpoint = "
                f"{TIGHT_AUTOCHECKPOINT_PAGES if short else AUTOCHECKPOINT_PAGES}")
    if short:
        raw.execute("PRAGMA wal_checkpoint(RESTART)")


async def hop(conn: Conn, fn: Callable[[Raw], T]) -> T:
    """Run ``fn(raw_connection)`` on the connection's thread: one round trip for it all.

    Uses ``aiosqlite.Connection._execute``, the queue every public aiosqlite method goes
    through (``pyproject.toml`` pins the versions it is tested with; ``test_store`` fails
    loudly if it changes). ``fn`` must not touch the event loop.
    """
    raw = raw_of(conn)
    run: Callable[..., Awaitable[T]] = conn._execute  # untyped upstream
    return await run(fn, raw)


def raw_of(conn: Conn) -> Raw:
    """Return the ``sqlite3`` handle under ``conn`` (``ValueError`` once it is closed)."""
    raw: Raw = conn._conn  # aiosqlite's handle; see ``hop``
    return raw


def commit(raw: Raw) -> None:
    """COMMIT the open transaction: with ``synchronous=FULL``, the fsync that makes it durable."""
    raw.execute("COMMIT")


def quick_check(raw: Raw) -> list[str]:
    """Run ``PRAGMA quick_check``; return the problems found (empty when sound)."""
    try:
        rows = fetchall(raw, "PRAGMA quick_check")
    except sqlite3.DatabaseError as err:
        return [str(err)]
    problems = [str(r[0]) for r in rows]
    return [] if problems == ["ok"] else problems


def migrate(raw: Raw, path: Path) -> int:
    """Bring the schema to ``schema.LATEST``, one transaction per step; returns the old one."""
    (version,) = fetchone(raw, "PRAGMA user_version")
    if version > schema.LATEST:
        raise SchemaTooNew(f"{path} has schema version {version}; this tillsync knows up to "
                           f"{schema.LATEST}")
    for target in range(version + 1, schema.LATEST + 1):
        # One transaction per step, version bump included: a crash leaves the old version.
        script = schema.MIGRATIONS[target - 1]
        try:
            raw.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;")
        except sqlite3.Error:
            rollback(raw)
            raise
    return int(version)


# What a claim needs of a delivery, read together with its head: kind, idempotency_key,
# key_id, sealed, expires_at (from the event), attempts and doubt (from the delivery).
HEAD_COLUMNS = ("d.event_id, d.state, d.next_attempt_at, e.created_at, e.kind,"
                " e.idempotency_key, e.key_id, e.sealed, e.expires_at, d.attempts, d.doubt")


def stream_heads(raw: Raw, sink: str) -> list[tuple[Any, ...]]:
    """Each stream's oldest owed delivery for ``sink``: rows of (stream, ``HEAD_COLUMNS``)."""
    # A skip-scan over the partial index: O(streams × log n), not a scan of the backlog.
    return [tuple(r) for r in fetchall(
        raw,
        f"""WITH RECURSIVE s(stream) AS (
              SELECT MIN(stream) FROM deliveries WHERE sink = :sink AND {OWED}
              UNION ALL
              SELECT (SELECT MIN(stream) FROM deliveries
                      WHERE sink = :sink AND {OWED} AND stream > s.stream)
              FROM s WHERE s.stream IS NOT NULL)
            SELECT s.stream, {HEAD_COLUMNS}
            FROM s
            JOIN deliveries d ON d.sink = :sink AND d.event_id = (
                SELECT MIN(event_id) FROM deliveries
                WHERE sink = :sink AND {OWED} AND stream = s.stream)
            JOIN events e ON e.id = d.event_id
            WHERE s.stream IS NOT NULL""",
        {"sink": sink})]


def in_chunks(values: Sequence[T]) -> Iterator[tuple[list[T], str]]:
    """Split ``values`` for ``IN (...)`` lists: (chunk, its "?,?,..." marks), IN_CHUNK each."""
    for i in range(0, len(values), IN_CHUNK):
        chunk = list(values[i:i + IN_CHUNK])
        yield chunk, ",".join("?" * len(chunk))


def release(raw: Raw, ids: Sequence[int]) -> int:
    """Drop the payloads and delivery rows of these events; return bytes freed."""
    freed = 0
    for chunk, marks in in_chunks(ids):
        (size,) = fetchone(raw, f"SELECT TOTAL(size) FROM events WHERE id IN ({marks})", chunk)
        freed += int(size)
        raw.execute(f"UPDATE events SET sealed = NULL, size = 0 WHERE id IN ({marks})", chunk)
        raw.execute(f"DELETE FROM deliveries WHERE event_id IN ({marks})", chunk)
    return freed


def fetchall(raw: Raw, sql: str, params: Any = ()) -> list[Any]:
    """Run a query and return every row."""
    return raw.execute(sql, params).fetchall()


def fetchone(raw: Raw, sql: str, params: Any = ()) -> Any:
    """Run a query that must return one row."""
    row = raw.execute(sql, params).fetchone()
    if row is None:
        raise OutboxCorrupt(f"query returned no row: {sql.split()[0:4]}")
    return row


def fetchone_or_none(raw: Raw, sql: str, params: Any = ()) -> Any:
    """Run a query and return its first row, or None."""
    return raw.execute(sql, params).fetchone()


def rollback(raw: Raw) -> None:
    """Roll back the open transaction, if any (best effort: the handle may be gone)."""
    try:
        if raw.in_transaction:
            raw.execute("ROLLBACK")
    except sqlite3.Error as err:
        log.debug("outbox: rollback failed: %s", err)


def is_full(err: sqlite3.Error) -> bool:
    """SQLITE_FULL: the disk, or ``max_page_count``, has no room (3.11+ names the code)."""
    return getattr(err, "sqlite_errorname", "") == "SQLITE_FULL"


def open_error(path: Path, err: sqlite3.Error) -> OutboxError:
    """Type an error met while opening: a damaged file, or a disk problem."""
    if getattr(err, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return OutboxCorrupt(f"{path} is not a readable outbox database: {err}")
    return OutboxUnavailable(f"cannot open {path}: {err}", hint=OPEN_HINT)


# At open nothing retries: the operator has to look (OutboxUnavailable's usual hint says the
# agent reopens the database, which is true only once it runs).
OPEN_HINT = ("check that outbox.path names a file in a directory the agent can write, on a"
             " working disk")
