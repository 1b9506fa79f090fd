"""Each stream's head per sink, cached in memory by the writer.

A claim may only hand out a stream's *head*: its oldest owed delivery to that sink. Finding
the heads in SQLite is a skip-scan of the owed index, about 6-10 µs per stream; with 64
terminals that is most of a claim's cost, paid again on every claim. The writer is the only
thing that changes deliveries, so it can keep the heads itself:

- built lazily per sink from the skip-scan (``db.stream_heads``);
- an append adds a head for a stream that had none (a newer event never displaces one);
- a claim marks its heads in flight;
- a settle or release re-reads the head of each stream it touched (one index seek);
- anything rarer (requeue, reschedule, quarantine) or anything rolled back drops the cache,
  and the next use rebuilds it from the database.

The database stays the truth; ``tests/outbox/test_model.py`` checks claims against a model
through reopen, rollback and every operation, which is what keeps this cache honest.
"""

from __future__ import annotations

from dataclasses import dataclass

from outbox.db import OWED, Raw, fetchone_or_none, stream_heads


@dataclass(slots=True)
class Head:
    """A stream's oldest owed delivery to one sink."""

    event_id: int
    state: str
    next_at: float
    created: float


class Heads:
    """The heads of every stream, per sink; only the writer's thread touches it."""

    def __init__(self) -> None:
        self._sinks: dict[str, dict[str, Head]] = {}
        self._streams: dict[str, dict[int, str]] = {}  # sink -> head event id -> stream

    def of(self, raw: Raw, sink: str) -> dict[str, Head]:
        """Return the heads of ``sink`` by stream, reading them from the database if needed."""
        heads = self._sinks.get(sink)
        if heads is None:
            heads = {stream: Head(event_id, state, next_at, created)
                     for stream, event_id, state, next_at, created in stream_heads(raw, sink)}
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

    def reread(self, raw: Raw, sink: str, stream: str) -> None:
        """Read one stream's head again after its old head changed state."""
        heads = self._sinks.get(sink)
        if heads is None:
            return
        old = heads.pop(stream, None)
        if old is not None:
            del self._streams[sink][old.event_id]
        row = fetchone_or_none(
            raw, "SELECT d.event_id, d.state, d.next_attempt_at, e.created_at FROM deliveries d"
                 " JOIN events e ON e.id = d.event_id WHERE d.sink = ? AND d.stream = ? AND"
                 f" d.{OWED} ORDER BY d.event_id LIMIT 1", (sink, stream))
        if row is not None:
            heads[stream] = Head(*row)
            self._streams[sink][row[0]] = stream

    def forget(self) -> None:
        """Drop everything; the next use reads the heads from the database again."""
        self._sinks.clear()
        self._streams.clear()
