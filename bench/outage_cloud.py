"""The stand-in cloud in its own process, with a control port to take it down and back up.

Run as ``python -m bench.outage_cloud``; it prints ``{"url": ..., "control": ...}`` once
listening on 127.0.0.1. The webhook is ``agent.standin.cloud.StandinCloud`` (idempotent, an
effect log), so a run that lost or doubled a delivery shows it. The control port, separate so
it keeps answering during an outage:

- ``POST /down``: the webhook's port refuses connections and kept-alive ones are cut, as when
  the shop's uplink fails;
- ``POST /up``: listening again on the same port;
- ``GET /stats``: effects committed, distinct idempotency keys, requests seen, and the commit
  times (wall clock, ``time.time()``) of every effect, for a delivered-per-second series.

It runs in its own process so the cloud's work never competes with the benchmark's client.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from agent.standin.cloud import StandinCloud
from bench.sink_server import serve_app


def build_control(cloud: StandinCloud) -> web.Application:
    """The control app: POST /down, POST /up, GET /stats."""
    async def down(request: web.Request) -> web.Response:
        await cloud.close_port()
        return web.json_response({"listening": cloud.listening})

    async def up(request: web.Request) -> web.Response:
        await cloud.open_port()
        return web.json_response({"listening": cloud.listening})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({
            "effects": len(cloud.effects), "keys": len({e.key for e in cloud.effects}),
            "requests": len(cloud.requests), "committed_at": [e.at for e in cloud.effects],
            "url": cloud.url})

    app = web.Application()
    app.router.add_post("/down", down)
    app.router.add_post("/up", up)
    app.router.add_get("/stats", stats)
    return app


async def serve() -> None:
    """Start the cloud; serve the control app (printing both addresses) until stdin closes."""
    async with StandinCloud() as cloud:
        app = build_control(cloud)

        # serve_app prints {"port": control port}; the cloud's URL goes first on its own line.
        print(f'{{"url": "{cloud.url}"}}', flush=True)
        await serve_app(app)


if __name__ == "__main__":
    asyncio.run(serve())
