"""The tillsync outbox: a durable, encrypted store-and-forward queue on SQLite.

Design
======

The outbox moves opaque bytes. It knows nothing of sales or devices: an *event* is a payload
with a ``stream`` (for ordering, e.g. a terminal id), a ``kind`` (for routing, e.g.
"transaction"), an ``idempotency_key`` (fixed at append, sent on every attempt), an optional
``dedupe_key`` and the names of the *sinks* it must reach. Each (event, sink) pair is a
*delivery* with its own state, so one sink down never holds back another.

Promises
--------
1. ``append`` returns only after the transaction holding the event is durable: with
   ``durability="full"`` (the default: WAL, ``synchronous=FULL``) that survives power loss on
   honest storage; with ``"normal"`` it survives a process crash but the last commits may roll
   back on power loss.
2. Nothing appended is lost, changed, or replayed under another key. The payload and key are
   written once and never rewritten; every attempt reads the same bytes.
3. Nothing owed is dropped to make room. A full outbox refuses *new* events with
   ``OutboxFull``; the only thing ever released early is the payload of an event already
   delivered to every sink.
4. Per sink, the events of one stream are handed out in append order, one at a time.

Delivery states and transitions
-------------------------------
::

    append ─► pending ──claim──► in_flight ──settle──► delivered
                 ▲                   │   ├──settle(RETRY at T)─────► pending  (due at T)
                 │                   │   ├──settle(IN_DOUBT at T)──► in_doubt (due at T)
                 │                   │   └──settle(DEAD)───────────► dead
                 │                   ├──restart (crash)───────────► in_doubt
                 │                   └──release (never sent)──► pending, or in_doubt if doubted
                 └────── operator requeue ◄── dead   (back to in_doubt if it was doubted)
    a record that fails authentication, at any read ──► quarantined

``in_doubt`` means an attempt may have reached the server without an answer: a timeout, a
reset after the request was written, or the process killed or stopped while it waited (a
restart cannot tell a claim that was sent from one that was not, so it doubts them all).
It is retried with the same key and byte-identical body, or settled by the sink's lookup;
a later RETRY keeps the doubt until the delivery is delivered or dead. ``pending`` in stats
counts in-flight deliveries too (they are owed).

Ordering rule
-------------
A delivery is claimable when it is its stream's *head* for that sink (the lowest event id
among that sink's ``pending``, ``in_flight`` and ``in_doubt`` deliveries of the stream), is
not in flight, and is due. So a later event is never claimed while an earlier one for the
same sink is pending, in flight or in doubt. ``dead`` and ``quarantined`` deliveries do *not*
block their stream: one poison event must not stall a till forever; an operator sees it,
and a requeue makes it the head again. Streams are meant to be few (terminals, printers):
finding heads is a skip-scan costing O(streams × log n).

Retry rule
----------
The store does not decide outcomes: the relay classifies each attempt once (delivered /
retry at T / in doubt at T / dead) and ``settle`` records it. The store never drops an event
for age or attempt count.

A relay works in *rounds*: ``settle_and_claim`` records the verdicts reached since its last
round, gives back claims it did not attempt, then claims the next due heads, all in one
transaction. A stream whose head was just settled hands out its next event in that same
commit, and one fsync serves every delivery of the round.

Writer and group commit
-----------------------
One connection, owned by one writer task, does every write and every checkpoint. (SQLite up
to 3.51.2, including Debian 12's 3.40.1, can lose commits when several connections write or
checkpoint concurrently: the WAL-reset bug.) Callers queue operations; the writer takes all
that are waiting, runs them in one ``BEGIN IMMEDIATE`` transaction and answers each caller
only after the single ``COMMIT`` (one fsync) returns. The transaction bodies are plain
functions (``outbox.transactions``). A batch of appends and relay rounds runs its statements
on the event loop's thread and only the COMMIT on the connection's thread: statements run
from a second thread had to win the GIL back from the busy loop after every SQLite step,
and those waits, not the fsync, set the pace of ingest and delivery. Work that may touch
many rows (purge, requeue, listings) runs whole on the connection's thread, one round trip
per batch. Either way one batch at a time touches the handle. An I/O error is fatal for the
handle:
the batch fails with ``OutboxUnavailable``, the connection is dropped and the next batch
reopens from disk (never "retry the fsync"). ``SQLITE_FULL`` fails the appends of the batch
with ``OutboxFull`` and retries the rest. Those need write room too (WAL frames), so when it
is the disk that filled, the store first deletes its disk reserve (``outbox.reserve``, a
ballast file beside the database) and refuses appends until twice the reserve is free
again: a full disk stops intake, never delivery.

On-disk schema (``outbox.schema``, versioned by ``PRAGMA user_version``)
------------------------------------------------------------------------
- ``events(id AUTOINCREMENT, stream, kind, dedupe_key UNIQUE, idempotency_key, fingerprint,
  sinks, key_id, sealed, size, created_at, expires_at, quarantined)``
- ``deliveries(event_id, sink, stream, state, doubt, attempts, next_attempt_at, size,
  last_error, error_key_id, updated_at)`` keyed by (event_id, sink), with partial indexes
  on owed, in-flight and parked rows;
- ``data_keys(key_id, wrapped, created_at, uses)``;
- ``sink_stats`` and ``totals``: counters kept in the same transaction as every change (by
  the append batch for new rows, by triggers for every later change), so stats never scan
  the queue and never drift;
- ``meta(name, value)``: per sink, the last Retry-After deadline and the time of the last
  delivery, so a restarted relay still honours the one and reports the other.

Migrations run one transaction per version step; a newer schema than known is refused.
``PRAGMA quick_check`` runs on every open of an existing database, on a separate read-only
connection beside the writer (it reads the whole file: about 1 s per 700 MB, so waiting for
it would break the "ready within a second with a million events queued" promise). Until it
finishes ``integrity`` is ``"checking"``; if it finds damage the store refuses every further
write with ``OutboxCorrupt`` and reports ``"corrupt"``, and an operator decides.

Crypto envelope
---------------
The key file holds a 32-byte master key (base64, mode 0600, refused when group or other can
read it). HKDF-SHA256 derives a *wrapping key* and a *MAC key* from it. Records are sealed
with AES-256-GCM under a *data key*; data keys are stored wrapped (AES-GCM under the
wrapping key) in ``data_keys``. A sealed field is ``nonce(12, fresh random) || ciphertext ||
tag(16)``; the associated data of a payload is
``"tillsync/v1" 0 "event" 0 id 0 kind 0 key_id 0 stream 0 idempotency_key``, so a ciphertext
moved to another row, or a row whose key or id was edited, fails authentication. Error texts
are sealed the same way (``"error" 0 event_id 0 sink 0 key_id``). Dedupe compares an
HMAC-SHA256 fingerprint of (stream, kind, payload) under the MAC key, which reveals nothing
of the payload. Rotation adds a data key that seals new records; old keys stay while any
record needs them and are deleted by ``purge`` after that. A data key is also rotated
automatically after 2**24 encryptions, far below GCM's 2**32 random-nonce limit. A record
that fails authentication is quarantined (visible in stats), never sent, never crashes the
store. The database never holds a payload, customer datum or error body in plaintext.
"""

from outbox.errors import (
    CapacityFull,
    DedupeConflict,
    KeyFileError,
    KeyFileInvalid,
    KeyFileMissing,
    KeyFilePermissions,
    KeyMismatch,
    OutboxClosed,
    OutboxCorrupt,
    OutboxError,
    OutboxFull,
    OutboxUnavailable,
    SchemaTooNew,
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
from outbox.store import Outbox

__all__ = [
    "Appended",
    "CapacityFull",
    "DedupeConflict",
    "Delivery",
    "DeliveryInfo",
    "DeliveryState",
    "EventRecord",
    "KeyFileError",
    "KeyFileInvalid",
    "KeyFileMissing",
    "KeyFilePermissions",
    "KeyMismatch",
    "NewEvent",
    "Outbox",
    "OutboxClosed",
    "OutboxCorrupt",
    "OutboxError",
    "OutboxFull",
    "OutboxStats",
    "OutboxUnavailable",
    "PurgeResult",
    "SchemaTooNew",
    "Settlement",
    "SinkStats",
    "Verdict",
]
