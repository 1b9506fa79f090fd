"""How long to wait: full-jitter backoff, Retry-After parsing, and a token bucket."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime


def full_jitter(attempt: int, *, base_s: float, cap_s: float,
                rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1 = first retry): uniform in [0, min(cap, base·2ⁿ)].

    Full jitter spreads the retries of many stores that lost the same cloud at the same
    moment, so they do not come back in lockstep (AWS Architecture Blog, "Exponential
    Backoff and Jitter").
    """
    ceiling = min(cap_s, base_s * 2.0 ** max(0, attempt - 1))
    return (rng or random).uniform(0.0, ceiling)


def retry_after_seconds(value: str | None, *, now: float, cap_s: float) -> float | None:
    """Seconds a ``Retry-After`` value asks us to wait, capped; None when absent or malformed.

    RFC 9110 §10.2.3 allows delta-seconds or an HTTP-date. A date in the past means "now".
    A malformed value is ignored (the normal backoff applies) rather than trusted.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # 1*DIGIT; str.isdigit alone accepts "²"
        return min(float(value), cap_s)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive parse means it said so
        return None
    return min(max(0.0, when.timestamp() - now), cap_s)


class TokenBucket:
    """At most ``rate`` acquisitions per second on average, bursts up to ``burst``.

    Kept as a theoretical arrival time (GCRA): each acquisition is given the slot
    ``1/rate`` after the previous one's slot, not after the moment its waiter woke up, so
    timer overshoot never lowers the long-run rate below ``rate`` (a classic bucket that
    refills from "now" loses every overshoot, a few percent at 50/s).
    """

    def __init__(self, rate: float, *, burst: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.burst = max(1.0, burst)
        self._clock = clock
        self._interval = 1.0 / rate
        self._tolerance = (self.burst - 1.0) * self._interval
        self._next_slot = clock()

    async def acquire(self) -> None:
        """Wait for this caller's slot (callers are served in the order they ask)."""
        now = self._clock()
        slot = max(self._next_slot, now)
        self._next_slot = slot + self._interval
        wait = slot - now - self._tolerance
        if wait > 0:
            await asyncio.sleep(wait)
