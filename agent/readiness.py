"""Wait for an agent to answer ``/readyz``: used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp

POLL_S = 0.05


async def wait_until_ready(base_url: str, *, timeout_s: float = 30.0,
                           failed: Callable[[], str | None] | None = None) -> None:
    """Poll ``base_url/readyz`` until it answers 200.

    ``failed`` is asked between polls and returns why the agent can no longer come up (it
    exited), which is raised at once instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            reason = failed() if failed else None
            if reason:
                raise RuntimeError(reason)
            try:
                async with http.get(f"{base_url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(POLL_S)
    raise TimeoutError(f"the agent at {base_url} was not ready within {timeout_s:g} s")
