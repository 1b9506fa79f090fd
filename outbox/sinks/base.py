"""The sink protocol and the per-sink delivery policy the relay applies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from outbox.classify import AttemptResult, OnConflict
from outbox.models import Delivery

# Backoff is capped so that, after the network returns, the next probe comes within the
# contract's 15 s with default settings (cap + one attempt's connect time).
DEFAULT_BACKOFF_BASE_S = 1.0
DEFAULT_BACKOFF_CAP_S = 10.0
DEFAULT_MAX_RETRY_AFTER_S = 3600.0
DEFAULT_PAUSE_RECHECK_S = 60.0
DEFAULT_CONCURRENCY = 4


@dataclass(frozen=True, slots=True)
class SinkPolicy:
    """How the relay paces one sink; the defaults are the contract's."""

    concurrency: int = DEFAULT_CONCURRENCY
    rate_limit_per_s: float | None = None
    backoff_base_s: float = DEFAULT_BACKOFF_BASE_S
    backoff_cap_s: float = DEFAULT_BACKOFF_CAP_S
    max_retry_after_s: float = DEFAULT_MAX_RETRY_AFTER_S
    pause_recheck_s: float = DEFAULT_PAUSE_RECHECK_S
    on_conflict: OnConflict = "retry"

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {self.concurrency}")
        if self.rate_limit_per_s is not None and self.rate_limit_per_s <= 0:
            raise ValueError(f"rate_limit_per_s must be positive, not {self.rate_limit_per_s}")


class Sink(Protocol):
    """A destination. ``deliver`` reports what happened; it never decides the outcome."""

    name: str
    policy: SinkPolicy

    async def start(self) -> None:
        """Acquire long-lived resources (e.g. the pooled HTTP session)."""

    async def close(self) -> None:
        """Release them; idempotent."""

    async def deliver(self, delivery: Delivery) -> AttemptResult:
        """Make one attempt; report transport failures as ``NoAnswer``, never raise them."""

    async def lookup(self, delivery: Delivery) -> bool | None:
        """Whether an in-doubt delivery already took effect: True, False, or None (unknown)."""
