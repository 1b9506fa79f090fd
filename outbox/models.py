"""Plain data passed in and out of the outbox store."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class DeliveryState(enum.StrEnum):
    """Where one (event, sink) delivery stands; see the transitions in ``outbox``."""

    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    IN_DOUBT = "in_doubt"
    DELIVERED = "delivered"
    DEAD = "dead"
    QUARANTINED = "quarantined"


class Verdict(enum.StrEnum):
    """What the relay decided about one attempt; the store records it."""

    DELIVERED = "delivered"
    RETRY = "retry"  # definitely not applied; try again at next_attempt_at
    IN_DOUBT = "in_doubt"  # may have been applied; retry with the same key, or look it up
    DEAD = "dead"  # permanently refused; kept for an operator


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: opaque payload bytes plus what routes and orders it."""

    stream: str
    kind: str
    payload: bytes
    sinks: tuple[str, ...]
    idempotency_key: str
    dedupe_key: str | None = None
    expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class Appended:
    """Result of an append: ``created`` is False when the dedupe key returned the original."""

    event_id: int
    idempotency_key: str
    sinks: tuple[str, ...]
    accepted_at: float
    created: bool


@dataclass(frozen=True, slots=True)
class Delivery:
    """A claimed delivery, in flight until settled; carries the decrypted payload."""

    event_id: int
    sink: str
    stream: str
    kind: str
    idempotency_key: str
    payload: bytes
    attempts: int  # attempts completed before this one
    in_doubt: bool  # an earlier attempt may already have taken effect
    created_at: float
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class Settlement:
    """The relay's verdict on one attempt of one delivery."""

    event_id: int
    sink: str
    verdict: Verdict
    next_attempt_at: float | None = None  # for RETRY and IN_DOUBT
    error: str | None = None  # short reason; stored encrypted


@dataclass(frozen=True, slots=True)
class DeliveryInfo:
    """An operator's view of one delivery (no payload)."""

    event_id: int
    sink: str
    stream: str
    kind: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    updated_at: float
    created_at: float
    idempotency_key: str
    dedupe_key: str | None


@dataclass(frozen=True, slots=True)
class EventRecord:
    """An operator's view of one event; ``payload`` is None once purged or quarantined."""

    event_id: int
    stream: str
    kind: str
    idempotency_key: str
    dedupe_key: str | None
    created_at: float
    expires_at: float | None
    size: int
    quarantined: bool
    purged: bool
    payload: bytes | None
    deliveries: list[DeliveryInfo] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What a purge released: payloads of delivered events, forgotten events, data keys."""

    payloads_released: int
    events_forgotten: int
    keys_retired: int


@dataclass(frozen=True, slots=True)
class SinkStats:
    """Counters for one sink; ``pending`` includes deliveries in flight."""

    sink: str
    pending: int
    in_doubt: int
    dead: int
    quarantined: int
    bytes: int
    oldest_pending_age_s: float | None


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Counters for the whole store."""

    events: int
    bytes: int
    capacity_bytes: int | None
    sinks: dict[str, SinkStats]

    @property
    def quarantined(self) -> int:
        """Deliveries whose record failed authentication, over all sinks."""
        return sum(s.quarantined for s in self.sinks.values())

    @property
    def pending(self) -> int:
        """Deliveries still owed, over all sinks (in doubt excluded)."""
        return sum(s.pending for s in self.sinks.values())

    @property
    def in_doubt(self) -> int:
        """Deliveries that may have taken effect, over all sinks."""
        return sum(s.in_doubt for s in self.sinks.values())

    @property
    def dead(self) -> int:
        """Dead-lettered deliveries, over all sinks."""
        return sum(s.dead for s in self.sinks.values())

    @property
    def oldest_pending_age_s(self) -> float | None:
        """Age of the oldest undelivered event over all sinks."""
        ages = [s.oldest_pending_age_s for s in self.sinks.values()
                if s.oldest_pending_age_s is not None]
        return max(ages) if ages else None
