"""Guards on the local API's listening socket against hostile or broken clients on the LAN.

See docs/security.md and tests/system/test_hostile_input.py. A connection must finish each
request's headers within ``IDLE_TIMEOUT_S`` (aiohttp's default keeps a half-sent request for
an hour), and ``ConnectionGuard`` keeps at most ``MAX_CONNECTIONS`` open, closing the oldest
one that has no request in progress to admit a new one, so that slow or idle connections
can neither starve the tills nor use up the process's file descriptors. ``ClientFaultLog``
turns aiohttp's traceback for each malformed request into one rate-limited line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("agent")

# Hostile input (docs/security.md). aiohttp has no header-read timeout: its keep-alive timer
# (default 3630 s) is what closes a connection that never completes a request, so it is set
# to a bound a till on the LAN never comes near, which also closes idle keep-alive
# connections after it. A slowloris client then holds a connection for at most this long.
IDLE_TIMEOUT_S = 15.0
# After an early answer (413, 408, 401 …) aiohttp reads and drops the rest of the body this
# long, so the client can read the answer, then closes (default 10 s).
LINGER_S = 2.0
# Open API connections at most. systemd gives services a soft limit of 1024 open files and
# the agent needs some for its database, devices and sink connections: without a cap ~1000
# half-open connections made accept() fail with EMFILE and /healthz went unanswered.
MAX_CONNECTIONS = 512
# A connection this old with no request in a handler is idle or slow, not a till that just
# connected (its request follows within milliseconds), and may be closed to admit another.
# Newcomers are refused only while more than MAX_CONNECTIONS arrived within this time (over
# 10 000 a second). Longer would refuse tills in the waves of a reconnecting flood.
EVICT_AFTER_S = 0.05
# The listen backlog stays aiohttp's 128: asyncio accepts up to that many connections at
# each wake-up before ConnectionGuard sees any, so a larger one (1024 was tried) lets a
# burst past the limit into EMFILE. A till whose SYN a full queue drops retries in 1 s.
# The "connections at the limit" warning and the malformed-request line repeat at most this
# often: each says how many it left out.
REPORT_INTERVAL_S = 60.0


def connection_limit() -> int:
    """``MAX_CONNECTIONS``, or half the soft open-files limit when that is lower."""
    try:
        import resource
    except ImportError:  # Windows: no such limit on sockets
        return MAX_CONNECTIONS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 2))


class ConnectionGuard:
    """Cap the API's open connections; to admit one more, close the oldest idle one.

    "Idle" is a connection open for at least ``EVICT_AFTER_S`` with no request in its
    handler: still sending a request's headers, or kept alive between requests. A till's
    request is in a handler milliseconds after it connects, so a flood of slow or idle
    connections never locks tills out, and never holds more than ``limit`` descriptors.
    When no connection is idle (event streams, requests waiting for a commit, or a burst of
    brand-new connections), the newcomer is refused instead.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.closed = 0  # connections closed or refused to stay under the limit
        # Open connections, oldest first, with when they opened; and the ones with a
        # request in progress (RequestHandler takes no weak references: connection_lost
        # and the middleware's ``finally`` remove what was added).
        self._opened: dict[RequestHandler, float] = {}
        self._busy: set[RequestHandler] = set()
        self._warned_at = -REPORT_INTERVAL_S

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Any) -> web.StreamResponse:
        """Mark the request's connection busy while its handler runs."""
        protocol = request.protocol
        self._busy.add(protocol)
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            self._busy.discard(protocol)

    def attach(self, server: web.Server) -> None:
        """Check every new connection of ``server`` (after ``AppRunner.setup``)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self._admit(handler)

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None,
                            ) -> None:
            self._opened.pop(handler, None)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _admit(self, new: RequestHandler) -> None:
        now = time.monotonic()
        self._opened[new] = now
        if len(self._opened) <= self.limit:
            return
        live = [h for h in self._opened
                if h.transport is not None and not h.transport.is_closing()]
        if len(live) <= self.limit:
            return
        victim = next((h for h in live if h is not new and h not in self._busy
                       and now - self._opened[h] >= EVICT_AFTER_S), new)
        victim.force_close()
        self.closed += 1
        if now - self._warned_at >= REPORT_INTERVAL_S:
            self._warned_at = now
            log.warning("api: %d connections open (the limit); %s. Slow or idle clients on"
                        " the network? %d closed so far", self.limit,
                        "refusing a new one" if victim is new
                        else "closing the oldest idle one", self.closed)


class ClientFaultLog(logging.Filter):
    """A filter for the ``aiohttp.server`` logger: client faults in one line, rate-limited.

    aiohttp logs every request it cannot parse or decode (bad HTTP, TLS on the plain port,
    a broken gzip body) at ERROR with a traceback, some 15 lines each, so any device on the
    LAN could flood the journal, whose rate limit then drops the agent's own messages.
    Such a record becomes one WARNING line, at most one per ``interval_s``, which counts
    the ones left out. Anything else aiohttp logs passes unchanged.
    """

    def __init__(self, interval_s: float = REPORT_INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.left_out = 0
        self._last = -interval_s

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep, rewrite or drop ``record``."""
        fault = _client_fault(record.exc_info[1] if record.exc_info else None)
        if fault is None:
            return True
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self.left_out += 1
            return False
        reason = " ".join(str(fault).split())[:200]
        record.msg = "api: refused a malformed request: %s (%d more since the last such line)"
        record.args = (reason, self.left_out)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        self._last, self.left_out = now, 0
        return True


def _client_fault(exc: BaseException | None) -> BaseException | None:
    """Find the client's protocol error behind ``exc`` (or its causes); None if none."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, HttpProcessingError | web.RequestPayloadError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
