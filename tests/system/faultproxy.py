"""A fault-injecting TCP proxy on 127.0.0.1, for network faults a test cannot make for real.

The agent's sink URL points at the proxy; the proxy forwards each connection's bytes to the
upstream (the stand-in cloud) and back, and does to them what a test switches on, live:

``latency_s``
    Every chunk, in each direction, is delivered ``latency_s`` after it was read (one-way
    delay; a request/answer round trip gains twice that). Chunks are queued with their due
    times, so delay is pipelined and order is kept.
``stall_p`` / ``stall_s`` — what packet *loss* looks like to a TCP application
    A proxy sees a byte stream, not packets, so it cannot drop a packet: dropping a chunk
    would corrupt the stream, which TCP never does. What loss does to an application is
    delay: a lost segment is retransmitted after the retransmission timeout (at least
    200 ms on Linux, doubling on each further loss) and everything behind it waits
    (head-of-line blocking). So with probability ``stall_p`` a chunk is held for a time
    drawn from ``stall_s`` and the chunks behind it wait too. Not emulated: congestion
    window effects, lost SYNs (a connect to the proxy always succeeds at once), loss on
    connections the proxy does not carry.
``reset_p``
    With this probability per chunk the connection is reset (RST to both sides), as when
    retransmissions are exhausted or a middlebox loses the connection's state. A request
    may have reached the cloud before the reset: the client cannot know.
``blackhole()``
    New connections are accepted but nothing is forwarded or answered, and open ones go
    silent too: bytes are read and discarded (a route that swallows packets, except that
    the TCP handshake with the proxy succeeds). A connection that lost bytes stays silent
    after ``blackhole(False)``: real TCP would retransmit them, a proxy cannot, and
    forwarding what follows a gap would corrupt the stream. New connections work again.
``freeze()`` / ``thaw()``
    Bytes stop moving both ways and are held; on thaw they are delivered, in order. With
    ``refuse()`` this is the closest a proxy gets to a cut cable: open connections hang
    (TCP would retransmit and deliver after the repair), new ones fail.
``refuse()`` / ``listen()``
    Close the listening socket (connections are refused: ECONNREFUSED) and open it again
    on the same port. Open connections are untouched.
``cut()``
    Reset every open connection now.

``stats`` counts what was done, so a test can show a fault was actually applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections import Counter

CHUNK = 65536
# Linux's minimum retransmission timeout and a couple of doublings.
DEFAULT_STALL_S = (0.2, 0.8)


class _Conn:
    """One proxied connection: the client side and, once connected, the upstream side."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.swallowed = False  # bytes were black-holed: nothing more is forwarded

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]

    def reset(self) -> None:
        """Abort both sides with RST (SO_LINGER 0), not a polite FIN."""
        for writer in self.writers():
            sock = writer.get_extra_info("socket")
            with contextlib.suppress(OSError):
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    def close(self) -> None:
        for writer in self.writers():
            writer.transport.close()


class FaultProxy:
    """Forward ``host:port`` to ``upstream_host:upstream_port`` with switchable faults."""

    def __init__(self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1",
                 port: int = 0, rng: random.Random | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self._port = port
        self.rng = rng or random.Random()
        self.latency_s = 0.0
        self.stall_p = 0.0
        self.stall_s = DEFAULT_STALL_S
        self.reset_p = 0.0
        self.blackholed = False
        self.stats: Counter[str] = Counter()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    # -- lifecycle and switches ----------------------------------------------------------

    async def start(self) -> None:
        """Listen (on a free port if ``port`` was 0)."""
        await self.listen()

    async def stop(self) -> None:
        """Stop listening, reset every connection, wait for the handlers to end."""
        await self.refuse()
        self._flowing.set()  # a frozen pipe must not keep a handler alive
        self.cut()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def listen(self) -> None:
        """Accept connections again, on the same port as before."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._handle, self.host, self._port,
                                                  reuse_address=True)
        self._port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        """Close the listening socket: new connections are refused, open ones carry on."""
        server, self._server = self._server, None
        if server is not None:
            # Not wait_closed(): from 3.12 it also waits for open connections to finish.
            server.close()
            self.stats["refusing"] += 1

    def cut(self) -> int:
        """Reset every open connection; return how many there were."""
        conns = list(self._conns)
        for conn in conns:
            conn.reset()
        self.stats["cut_connections"] += len(conns)
        return len(conns)

    def freeze(self) -> None:
        """Hold every byte in both directions until ``thaw``."""
        if self._flowing.is_set():
            self.stats["freezes"] += 1
        self._flowing.clear()

    def thaw(self) -> None:
        """Deliver the held bytes, in order, and let traffic flow again."""
        self._flowing.set()

    def blackhole(self, on: bool = True) -> None:
        """Accept but never forward (and discard what open connections send)."""
        self.blackholed = on

    def calm(self) -> None:
        """Switch every fault off (listening state aside)."""
        self.latency_s = self.stall_p = self.reset_p = 0.0
        self.blackholed = False
        self.thaw()

    @property
    def port(self) -> int:
        """The proxy's port (kept across ``refuse``/``listen``)."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self._port}"

    @property
    def open_connections(self) -> int:
        """Connections currently proxied."""
        return len(self._conns)

    # -- forwarding ----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        conn = _Conn(writer)
        self._conns.add(conn)
        self.stats["connections"] += 1
        try:
            if self.blackholed:
                self.stats["blackholed_connections"] += 1
                while await reader.read(CHUNK):
                    self.stats["blackholed_chunks"] += 1
                return
            await self._flowing.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                # What a transparent middlebox does when the far side refuses.
                self.stats["upstream_unreachable"] += 1
                conn.reset()
                return
            conn.upstream = up_writer
            pipes = [asyncio.create_task(self._pipe(reader, up_writer, conn)),
                     asyncio.create_task(self._pipe(up_reader, writer, conn))]
            try:
                done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
                if any(t.exception() is not None for t in done):
                    conn.reset()  # a write failed one way: the connection is gone both ways
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except OSError:
            conn.reset()
        finally:
            conn.close()
            self._conns.discard(conn)
            self._handlers.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    conn: _Conn) -> None:
        """Copy one direction, chunk by chunk, through the faults; EOF is passed on."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        sender = asyncio.create_task(self._send(queue, writer))
        try:
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    conn.reset()  # a reset on one side reaches the other
                    return
                if not data:
                    queue.put_nowait((loop.time(), b""))
                    break
                self.stats["chunks"] += 1
                if self.blackholed or conn.swallowed:
                    # Once bytes of a stream have vanished, forwarding later ones would hand
                    # the peer a corrupt stream, which TCP never does: the connection stays
                    # silent until an end gives up.
                    conn.swallowed = True
                    self.stats["blackholed_chunks"] += 1
                    continue
                if self.reset_p and self.rng.random() < self.reset_p:
                    self.stats["resets"] += 1
                    conn.reset()
                    return
                delay = self.latency_s
                if self.stall_p and self.rng.random() < self.stall_p:
                    self.stats["stalls"] += 1
                    delay += self.rng.uniform(*self.stall_s)
                if delay:
                    self.stats["delayed_chunks"] += 1
                queue.put_nowait((loop.time() + delay, data))
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender

    async def _send(self, queue: asyncio.Queue[tuple[float, bytes]],
                    writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            await self._flowing.wait()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()  # frozen meanwhile: hold this chunk too
            if not data:
                if writer.can_write_eof() and not writer.is_closing():
                    writer.write_eof()
                return
            if writer.is_closing():
                return
            writer.write(data)
            await writer.drain()
