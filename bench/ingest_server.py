"""A bare ingest endpoint for benchmarks: parses the JSON, answers 202, stores nothing.

Run as ``python -m bench.ingest_server``; it prints ``{"port": <n>}`` once listening on
127.0.0.1. ``POST /v1/transactions`` reads the body as JSON and answers 202 with
``{"status":"queued"}``: the least an aiohttp endpoint taking a sale can do, the peer the
agent's ingest is compared with. It runs in its own process, like the agent does, so it
never shares an interpreter with the client that loads it.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from bench.sink_server import serve_app


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
    """Serve the endpoint until stdin closes."""
    await serve_app(build_app())


if __name__ == "__main__":
    asyncio.run(serve())
