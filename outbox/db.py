"""SQLite plumbing for the outbox: connection setup, migrations, checks and queries.

Only ``outbox.store`` calls these, and only from its single writer (or, for the
quick_check at open, from a read-only connection).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import aiosqlite

from outbox import schema
from outbox.errors import OutboxCorrupt, OutboxError, OutboxUnavailable, SchemaTooNew

log = logging.getLogger("outbox.store")

Conn = aiosqlite.Connection
Durability = Literal["full", "normal"]
ACTIVE = schema.ACTIVE
# SQLite caps host parameters per statement; IN-lists are chunked below it.
IN_CHUNK = 500


async def connect(path: Path, durability: Durability, max_db_bytes: int | None) -> Conn:
    """Open the writer connection: WAL, the durability's synchronous, bounded WAL."""
    conn = await aiosqlite.connect(path, isolation_level=None)
    try:
        (mode,) = await fetchone(conn, "PRAGMA journal_mode = WAL")
        if mode != "wal":
            raise OutboxUnavailable(f"{path}: cannot switch to WAL (journal_mode is {mode})")
        await conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")
        await conn.execute("PRAGMA busy_timeout = 5000")
        # Bound the WAL left behind after a burst; this connection does every checkpoint.
        await conn.execute("PRAGMA journal_size_limit = 67108864")
        if max_db_bytes is not None:
            (page_size,) = await fetchone(conn, "PRAGMA page_size")
            await conn.execute(f"PRAGMA max_page_count = {max(1, max_db_bytes // page_size)}")
    except BaseException:
        await conn.close()
        raise
    return conn


async def quick_check(conn: Conn) -> list[str]:
    """Run ``PRAGMA quick_check``; return the problems found (empty when sound)."""
    try:
        rows = await fetchall(conn, "PRAGMA quick_check")
    except sqlite3.DatabaseError as err:
        return [str(err)]
    problems = [str(r[0]) for r in rows]
    return [] if problems == ["ok"] else problems


async def migrate(conn: Conn, path: Path) -> None:
    """Bring the schema to ``schema.LATEST``, one transaction per step."""
    (version,) = await fetchone(conn, "PRAGMA user_version")
    if version > schema.LATEST:
        raise SchemaTooNew(f"{path} has schema version {version}; this tillsync knows up to "
                           f"{schema.LATEST}")
    for target in range(version + 1, schema.LATEST + 1):
        # One transaction per step, version bump included: a crash leaves the old version.
        script = schema.MIGRATIONS[target - 1]
        try:
            await conn.executescript(
                f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;")
        except sqlite3.Error:
            await rollback(conn)
            raise
        if version:
            log.info("outbox: migrated %s to schema version %d", path, target)


async def stream_heads(conn: Conn, sink: str) -> list[tuple[int, str, float, float]]:
    """Each stream's oldest owed delivery for ``sink``: (event_id, state, next_at, created)."""
    # A skip-scan over the partial index: O(streams × log n), not a scan of the backlog.
    return [tuple(r) for r in await fetchall(
        conn,
        f"""WITH RECURSIVE s(stream) AS (
              SELECT MIN(stream) FROM deliveries WHERE sink = :sink AND state IN {ACTIVE}
              UNION ALL
              SELECT (SELECT MIN(stream) FROM deliveries
                      WHERE sink = :sink AND state IN {ACTIVE} AND stream > s.stream)
              FROM s WHERE s.stream IS NOT NULL)
            SELECT d.event_id, d.state, d.next_attempt_at, e.created_at
            FROM s
            JOIN deliveries d ON d.sink = :sink AND d.event_id = (
                SELECT MIN(event_id) FROM deliveries
                WHERE sink = :sink AND state IN {ACTIVE} AND stream = s.stream)
            JOIN events e ON e.id = d.event_id
            WHERE s.stream IS NOT NULL""",
        {"sink": sink})]


async def release(conn: Conn, ids: Sequence[tuple[int] | Sequence[Any]]) -> int:
    """Drop the payloads and delivery rows of these events; return bytes freed."""
    if not ids:
        return 0
    flat = [r[0] for r in ids]
    freed = 0
    for i in range(0, len(flat), IN_CHUNK):
        chunk = flat[i:i + IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        (size,) = await fetchone(conn, f"SELECT TOTAL(size) FROM events WHERE id IN ({marks})",
                                  chunk)
        freed += int(size)
        await conn.execute(f"UPDATE events SET sealed = NULL, size = 0 WHERE id IN ({marks})",
                           chunk)
        await conn.execute(f"DELETE FROM deliveries WHERE event_id IN ({marks})", chunk)
    return freed


async def fetchall(conn: Conn, sql: str, params: Any = ()) -> list[Any]:
    """Run a query and return every row."""
    async with conn.execute(sql, params) as cur:
        return list(await cur.fetchall())


async def fetchone(conn: Conn, sql: str, params: Any = ()) -> Any:
    """Run a query that must return one row."""
    row = await fetchone_or_none(conn, sql, params)
    if row is None:
        raise OutboxCorrupt(f"query returned no row: {sql.split()[0:4]}")
    return row


async def fetchone_or_none(conn: Conn, sql: str, params: Any = ()) -> Any:
    """Run a query and return its first row, or None."""
    async with conn.execute(sql, params) as cur:
        return await cur.fetchone()


async def rollback(conn: Conn) -> None:
    """Roll back the open transaction, if any (best effort: the handle may be gone)."""
    try:
        if conn.in_transaction:
            await conn.execute("ROLLBACK")
    except sqlite3.Error as err:
        log.debug("outbox: rollback failed: %s", err)


def open_error(path: Path, err: sqlite3.Error) -> OutboxError:
    """Type an error met while opening: a damaged file, or a disk problem."""
    if getattr(err, "sqlite_errorname", "") in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        return OutboxCorrupt(f"{path} is not a readable outbox database: {err}")
    return OutboxUnavailable(f"cannot open {path}: {err}")


