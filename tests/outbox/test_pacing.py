"""Backoff, Retry-After parsing and the token bucket."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.pacing import TokenBucket, full_jitter, retry_after_seconds

NOW = 1_800_000_000.0


@given(attempt=st.integers(1, 60), base=st.floats(0.01, 10), cap=st.floats(0.1, 600),
       seed=st.integers(0, 2**32))
def test_full_jitter_stays_between_zero_and_the_capped_exponential(attempt, base, cap, seed):
    delay = full_jitter(attempt, base_s=base, cap_s=cap, rng=random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2 ** (attempt - 1))


def test_full_jitter_spreads_retries():
    rng = random.Random(1)
    delays = [full_jitter(5, base_s=1, cap_s=60, rng=rng) for _ in range(1000)]
    assert min(delays) < 2 and max(delays) > 14


@pytest.mark.parametrize(("value", "expected"), [
    ("7", 7.0), (" 120 ", 120.0), ("0", 0.0), ("99999", 3600.0),
    (format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True), 30.0),
    (format_datetime(datetime.fromtimestamp(NOW - 30, UTC), usegmt=True), 0.0),
    (None, None), ("soon", None), ("-5", None), ("1.5", None), ("", None),
])
def test_retry_after_accepts_seconds_and_http_dates_and_ignores_garbage(value, expected):
    assert retry_after_seconds(value, now=NOW, cap_s=3600) == expected


@given(st.text(max_size=40))
def test_retry_after_never_raises_and_never_exceeds_the_cap(value):
    result = retry_after_seconds(value, now=NOW, cap_s=100)
    assert result is None or 0.0 <= result <= 100


async def test_token_bucket_paces_acquisitions_to_the_rate():
    bucket = TokenBucket(100.0)
    started = time.monotonic()
    for _ in range(31):
        await bucket.acquire()
    elapsed = time.monotonic() - started
    assert 0.28 <= elapsed < 0.6  # 30 tokens after the first, at 100/s


async def test_token_bucket_serves_concurrent_callers_without_exceeding_the_rate():
    bucket = TokenBucket(200.0)
    stamps: list[float] = []

    async def take():
        await bucket.acquire()
        stamps.append(time.monotonic())

    await asyncio.gather(*(take() for _ in range(41)))
    assert stamps[-1] - stamps[0] >= 0.19


def test_token_bucket_refuses_a_non_positive_rate():
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0)


async def test_token_bucket_does_not_lose_rate_to_timer_overshoot():
    """GIVEN a bucket at 50/s and a clock that the sleeps overshoot by 30% of a slot WHEN
    100 acquisitions run back to back THEN the long-run rate is still 50/s, because slots
    are scheduled from the previous slot, not from the late wake-up."""
    now = [0.0]

    async def late_sleep(seconds: float) -> None:
        now[0] += seconds + 0.006  # every timer fires 6 ms late

    bucket = TokenBucket(50.0, clock=lambda: now[0])
    original = asyncio.sleep
    try:
        asyncio.sleep = late_sleep  # type: ignore[assignment]
        for _ in range(101):
            await bucket.acquire()
    finally:
        asyncio.sleep = original  # type: ignore[assignment]
    assert 100 / now[0] == pytest.approx(50.0, rel=0.02)


async def test_token_bucket_allows_a_burst_then_paces():
    now = [0.0]
    bucket = TokenBucket(10.0, burst=5, clock=lambda: now[0])
    for _ in range(5):
        await bucket.acquire()  # the burst: no waiting at all
    assert now[0] == 0.0
    slept: list[float] = []

    async def record(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    original = asyncio.sleep
    try:
        asyncio.sleep = record  # type: ignore[assignment]
        await bucket.acquire()
    finally:
        asyncio.sleep = original  # type: ignore[assignment]
    assert slept == [pytest.approx(0.1)]
