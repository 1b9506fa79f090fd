"""On-disk schema of the outbox and its migrations (``PRAGMA user_version``).

Each migration runs in the same transaction as the ``user_version`` bump, so a crash
mid-migration leaves the previous version intact. A database newer than ``LATEST`` is
refused, never guessed at.
"""

from __future__ import annotations

# States that still owe a delivery, and parked ones. Repeated verbatim in queries so SQLite
# can use the partial indexes below (its planner matches the predicate text, not its meaning).
ACTIVE = "('pending','in_flight','in_doubt')"
PARKED = "('dead','quarantined')"
OWED = f"state IN {ACTIVE}"


def _owed(row: str) -> str:
    # Triggers spell the test out: an IN-list there builds a temporary b-tree per row.
    return f"({row}.state = 'pending' OR {row}.state = 'in_flight' OR {row}.state = 'in_doubt')"


_V1 = f"""
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Data keys, wrapped by the key file's master key. Rows go once no record uses them.
CREATE TABLE data_keys (
    key_id     INTEGER PRIMARY KEY,
    wrapped    BLOB NOT NULL,
    created_at REAL NOT NULL,
    uses       INTEGER NOT NULL DEFAULT 0       -- encryptions so far (nonce budget)
);

-- AUTOINCREMENT: an id is never reused after a purge, because ids are bound into the
-- ciphertext's associated data and into what operators and sinks have seen.
CREATE TABLE events (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    stream          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    dedupe_key      TEXT UNIQUE,
    idempotency_key TEXT NOT NULL,
    fingerprint     BLOB NOT NULL,              -- keyed HMAC of (stream, kind, payload)
    sinks           TEXT NOT NULL,              -- JSON list, as appended
    key_id          INTEGER NOT NULL,
    sealed          BLOB,                       -- nonce || AES-GCM(payload); NULL once purged
    size            INTEGER NOT NULL,           -- bytes of sealed; 0 once purged
    created_at      REAL NOT NULL,
    expires_at      REAL,
    quarantined     INTEGER NOT NULL DEFAULT 0
);

-- One row per (event, sink). state: pending | in_flight | in_doubt | delivered | dead |
-- quarantined. doubt = 1 while an earlier attempt may have taken effect unseen.
CREATE TABLE deliveries (
    event_id        INTEGER NOT NULL,
    sink            TEXT NOT NULL,
    stream          TEXT NOT NULL,              -- copy of events.stream for the order index
    state           TEXT NOT NULL,
    doubt           INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    size            INTEGER NOT NULL,           -- copy of events.size for per-sink bytes
    last_error      BLOB,                       -- sealed like payloads: may echo a body
    error_key_id    INTEGER,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (event_id, sink)
) WITHOUT ROWID;

-- Per-stream heads for claims: MIN(event_id) per (sink, stream) among owed deliveries.
CREATE INDEX deliveries_owed ON deliveries (sink, stream, event_id) WHERE {OWED};
-- Restart recovery finds in-flight rows without a scan.
CREATE INDEX deliveries_in_flight ON deliveries (event_id) WHERE state = 'in_flight';
-- Operators list dead and quarantined rows without a scan.
CREATE INDEX deliveries_parked ON deliveries (sink, event_id) WHERE state IN {PARKED};
CREATE INDEX events_created ON events (created_at);

-- Counters kept in the same transaction as every change, so stats never scan the queue
-- and can never drift from it, even across crashes.
CREATE TABLE sink_stats (
    sink        TEXT PRIMARY KEY,
    pending     INTEGER NOT NULL DEFAULT 0,
    in_doubt    INTEGER NOT NULL DEFAULT 0,
    dead        INTEGER NOT NULL DEFAULT 0,
    quarantined INTEGER NOT NULL DEFAULT 0,
    bytes       INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE totals (
    one         INTEGER PRIMARY KEY CHECK (one = 1),
    events      INTEGER NOT NULL,
    bytes       INTEGER NOT NULL
);
INSERT INTO totals VALUES (1, 0, 0);

-- Appends add their counts in the same transaction (one statement per batch, not a trigger
-- per row); every later change is counted by these triggers.
CREATE TRIGGER events_upd AFTER UPDATE OF size ON events BEGIN
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size;
END;
CREATE TRIGGER events_del AFTER DELETE ON events BEGIN
    UPDATE totals SET events = events - 1, bytes = bytes - OLD.size;
END;

-- Claims (pending -> in_flight) and plain retries change no counter: skip them.
CREATE TRIGGER deliveries_upd AFTER UPDATE OF state, doubt ON deliveries
WHEN NOT ({_owed("OLD")} AND {_owed("NEW")} AND OLD.doubt = NEW.doubt) BEGIN
    UPDATE sink_stats SET
        pending     = pending     - ({_owed("OLD")} AND OLD.doubt = 0)
                                  + ({_owed("NEW")} AND NEW.doubt = 0),
        in_doubt    = in_doubt    - ({_owed("OLD")} AND OLD.doubt = 1)
                                  + ({_owed("NEW")} AND NEW.doubt = 1),
        dead        = dead        - (OLD.state = 'dead') + (NEW.state = 'dead'),
        quarantined = quarantined - (OLD.state = 'quarantined') + (NEW.state = 'quarantined'),
        bytes       = bytes - (CASE WHEN OLD.state = 'delivered' THEN 0 ELSE OLD.size END)
                            + (CASE WHEN NEW.state = 'delivered' THEN 0 ELSE NEW.size END)
    WHERE sink = NEW.sink;
END;
CREATE TRIGGER deliveries_del AFTER DELETE ON deliveries BEGIN
    UPDATE sink_stats SET
        pending     = pending     - ({_owed("OLD")} AND OLD.doubt = 0),
        in_doubt    = in_doubt    - ({_owed("OLD")} AND OLD.doubt = 1),
        dead        = dead        - (OLD.state = 'dead'),
        quarantined = quarantined - (OLD.state = 'quarantined'),
        bytes       = bytes - (CASE WHEN OLD.state = 'delivered' THEN 0 ELSE OLD.size END)
    WHERE sink = OLD.sink;
END;
"""

# Index i holds the script that takes a database from version i to i + 1.
MIGRATIONS: list[str] = [_V1]
LATEST = len(MIGRATIONS)
