"""A local sink for benchmarks: answers every POST with 200 at once, in its own process.

Run as ``python -m bench.sink_server``; it prints ``port <n>`` once listening on 127.0.0.1.
``GET /stats`` returns how many POSTs arrived, how many distinct ``Idempotency-Key`` values
they carried, and the monotonic times (system-wide on Linux) of the first and last one;
``POST /reset`` zeroes them. It runs in a separate process so its work never competes with
the client under test for one interpreter.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiohttp import web


class Counter:
    """What arrived since the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything counted."""
        self.posts = 0
        self.keys: set[str] = set()
        self.bytes = 0
        self.first: float | None = None
        self.last: float | None = None


def build_app(counter: Counter) -> web.Application:
    """The sink: POST /events, GET /stats, POST /reset."""
    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        counter.posts += 1
        counter.bytes += len(body)
        counter.keys.add(request.headers.get("Idempotency-Key", ""))
        counter.first = now if counter.first is None else counter.first
        counter.last = now
        return web.Response(text='{"ok":true}', content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"posts": counter.posts, "keys": len(counter.keys),
                                  "bytes": counter.bytes, "first": counter.first,
                                  "last": counter.last})

    async def reset(request: web.Request) -> web.Response:
        counter.reset()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/events", receive)
    app.router.add_get("/stats", stats)
    app.router.add_post("/reset", reset)
    return app


async def serve() -> None:
    """Serve the sink until stdin closes."""
    await serve_app(build_app(Counter()))


async def serve_app(app: web.Application) -> None:
    """Listen on an ephemeral port of 127.0.0.1, print it as JSON, serve until stdin closes."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None and server.sockets  # type: ignore[attr-defined]
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    print(json.dumps({"port": port}), flush=True)
    # The parent closes our stdin to stop us (or dies, which closes it too).
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve())
