"""Each stream's head per sink, cached in memory by the writer.

A claim may only hand out a stream's *head*: its oldest owed delivery to that sink. Finding
the heads in SQLite is a skip-scan of the owed index, about 6-10 µs per stream; with 64
terminals that is most of a claim's cost, paid again on every claim. The writer is the only
thing that changes deliveries, so it can keep the heads itself:

- built lazily per sink from the skip-scan (``db.stream_heads``);
- an append adds a head for a stream that had none (a newer event never displaces one);
- a claim marks its heads in flight;
- a settle or release re-reads the heads of the streams it touched (one statement,
  one index seek per stream);
- anything rarer (requeue, reschedule, quarantine) or anything rolled back drops the cache,
  and the next use rebuilds it from the database.

A head read from the database also keeps what a claim needs of it (``db.HEAD_COLUMNS``:
the sealed payload, attempts, doubt), so a claim reads nothing more. That copy cannot go
stale: attempts and doubt change only when the head is settled or released, which re-reads
it; the event's columns never change while it is owed (purge and reclaim touch only events
delivered everywhere); everything else drops the cache. A head added by an append has no
copy and is read by the claim.

The database stays the truth; ``tests/outbox/test_model.py`` checks claims against a model
through reopen, rollback and every operation, which is what keeps this cache honest.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from outbox.db import HEAD_COLUMNS, OWED, Raw, fetchall, stream_heads

# Each stream's head among owed deliveries; the streams come as a JSON list (?2).
_REREAD = f"""
    SELECT s.value, {HEAD_COLUMNS}
    FROM json_each(?2) s
    JOIN deliveries d ON d.sink = ?1 AND d.event_id = (
        SELECT MIN(event_id) FROM deliveries WHERE sink = ?1 AND {OWED} AND stream = s.value)
    JOIN events e ON e.id = d.event_id"""

# (kind, idempotency_key, key_id, sealed, expires_at, attempts, doubt)
ClaimRow = tuple[str, str, int, bytes | None, float | None, int, int]


@dataclass(slots=True)
class Head:
    """A stream's oldest owed delivery to one sink (``row``: what a claim needs, if read)."""

    event_id: int
    state: str
    next_at: float
    created: float
    row: ClaimRow | None = None


def _head(row: tuple[Any, ...]) -> Head:
    """Build a head from a row of (stream, ``HEAD_COLUMNS``)."""
    return Head(row[1], row[2], row[3], row[4], row[5:])


class Heads:
    """The heads of every stream, per sink; only the writer's thread touches it."""

    def __init__(self) -> None:
        self._sinks: dict[str, dict[str, Head]] = {}
        self._streams: dict[str, dict[int, str]] = {}  # sink -> head event id -> stream

    def of(self, raw: Raw, sink: str) -> dict[str, Head]:
        """Return the heads of ``sink`` by stream, reading them from the database if needed."""
        heads = self._sinks.get(sink)
        if heads is None:
            heads = {row[0]: _head(row) for row in stream_heads(raw, sink)}
            self._sinks[sink] = heads
            self._streams[sink] = {h.event_id: s for s, h in heads.items()}
        return heads

    def appended(self, sink: str, stream: str, event_id: int, now: float) -> None:
        """Note a new pending delivery; it heads its stream only if the stream had none."""
        heads = self._sinks.get(sink)
        if heads is not None and stream not in heads:
            heads[stream] = Head(event_id, "pending", now, now)
            self._streams[sink][event_id] = stream

    def claimed(self, sink: str, event_ids: list[int]) -> None:
        """Mark these heads in flight."""
        heads, streams = self._sinks[sink], self._streams[sink]
        for event_id in event_ids:
            heads[streams[event_id]].state = "in_flight"

    def stream_of(self, sink: str, event_id: int) -> str | None:
        """Return the stream whose cached head is ``event_id`` (None if there is none)."""
        streams = self._streams.get(sink)
        return None if streams is None else streams.get(event_id)

    def reread(self, raw: Raw, sink: str, streams: Collection[str]) -> None:
        """Read these streams' heads again after their old heads changed state."""
        heads = self._sinks.get(sink)
        if heads is None or not streams:
            return
        by_id = self._streams[sink]
        for stream in streams:
            old = heads.pop(stream, None)
            if old is not None:
                del by_id[old.event_id]
        # One statement for every stream: a seek per stream on the owed index.
        for row in fetchall(raw, _REREAD, (sink, json.dumps(list(streams)))):
            heads[row[0]] = _head(row)
            by_id[row[1]] = row[0]

    def forget(self) -> None:
        """Drop everything; the next use reads the heads from the database again."""
        self._sinks.clear()
        self._streams.clear()
