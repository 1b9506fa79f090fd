"""Waiting in tests for something that happens asynchronously: poll, bounded, then fail."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


async def until(check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 5.0, *,
                interval_s: float = 0.02, what: str = "condition") -> float:
    """Poll ``check`` (plain or async) until it returns true; return the seconds it took.

    Fails the test with an ``AssertionError`` naming ``what`` once ``timeout_s`` has passed
    and the check still does not hold: a bound, never a fixed sleep to wait out.
    """
    start = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start >= timeout_s:
            raise AssertionError(f"{what} not reached within {timeout_s:g} s")
        await asyncio.sleep(interval_s)
