"""A bare ingest endpoint for benchmarks: parses the JSON, answers 202, stores nothing.

Run as ``python -m bench.ingest_server``; it prints ``{"port": <n>}`` once listening on
127.0.0.1. ``POST /v1/transactions`` reads the body as JSON and answers 202 with
``{"status":"queued"}``: the least an aiohttp endpoint taking a sale can do, the peer the
agent's ingest is compared with. It runs in its own process, like the agent does, so it
never shares an interpreter with the client that loads it.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    """Parse the posted JSON and answer 202."""
    await request.json()
    return web.json_response({"status": "queued"}, status=202)


def build_app() -> web.Application:
    """The endpoint: POST /v1/transactions."""
    app = web.Application()
    app.router.add_post("/v1/transactions", accept)
    return app


async def serve() -> None:
    """Listen on an ephemeral port of 127.0.0.1 until stdin closes."""
    runner = web.AppRunner(build_app(), access_log=None)
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
