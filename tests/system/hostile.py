"""Hostile clients for the system tests: raw sockets that misbehave the way attackers and
broken devices on a shop's LAN do, and readings of the agent process from ``/proc``.

* ``SlowLoris`` keeps many connections open that send a request's headers a line at a time,
  slowly, and never finish them (optionally reconnecting when the agent closes one, as an
  attacker would); ``slow_body`` sends complete headers and then trickles the body.
* ``stream_body`` sends a huge body as fast as the agent reads it and notes when the answer
  came and how much had been sent by then.
* ``rss_kib``, ``fd_count`` read the agent's resident memory and open descriptors.
* ``python -m tests.system.hostile …`` runs a reconnecting slowloris flood in a process of
  its own (``main``).
* ``LIMITED_AGENT`` runs ``python -m agent`` with the open-files limit systemd gives a
  service by default (soft 1024), so that file-descriptor exhaustion is as near as in
  production.

Everything here talks HTTP/1.1 by hand on purpose: a client library would finish requests
promptly, buffer bodies or refuse to send nonsense, which is exactly what these do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

# systemd's default for services (DefaultLimitNOFILE=1024:524288); the hard limit is left.
SERVICE_NOFILE_SOFT = 1024
LIMITED_AGENT = [
    sys.executable, "-c",
    "import resource, runpy, sys\n"
    "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({SERVICE_NOFILE_SOFT}, hard))\n"
    "sys.argv[0] = 'tillsync'\n"
    "runpy.run_module('agent', run_name='__main__', alter_sys=True)\n",
]


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` in KiB (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise ValueError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def nofile_soft(pid: int) -> int:
    """The soft open-files limit of ``pid``."""
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise ValueError(f"no open-files limit for {pid}")


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    """An HTTP/1.1 request line and headers, with the blank line that ends them."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_answer(reader: asyncio.StreamReader, timeout_s: float) -> tuple[int, bytes]:
    """Read one HTTP answer (status, body; Content-Length framed) from ``reader``."""
    async with asyncio.timeout(timeout_s):
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length) if length else b""
    return status, body


# -- slow clients ----------------------------------------------------------------------------


@dataclass
class SlowStats:
    """What the slow connections saw."""

    opened: int = 0
    connect_failures: int = 0
    closed_by_agent: int = 0  # the agent closed (or reset) the connection
    lifetimes_s: list[float] = field(default_factory=list)  # of those the agent closed
    answers: list[int] = field(default_factory=list)  # statuses the agent answered with
    open_now: int = 0


class SlowLoris:
    """``n`` connections trickling request headers, one short header line every
    ``interval_s``, never ending them.

    While ``reconnect`` is set, a connection the agent closes is opened again (after
    ``reconnect_delay_s``), so the attack keeps ``n`` connections going; ``stop_reconnecting``
    lets them die out, ``close`` ends the rest.
    """

    def __init__(self, host: str, port: int, n: int, *, interval_s: float = 1.0,
                 reconnect: bool = True, reconnect_delay_s: float = 0.05) -> None:
        self.host, self.port, self.n = host, port, n
        self.interval_s = interval_s
        self.reconnect = reconnect
        self.reconnect_delay_s = reconnect_delay_s
        self.stats = SlowStats()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = asyncio.Event()

    async def start(self, *, open_timeout_s: float = 20.0) -> None:
        """Open the ``n`` connections (the first of each) and keep them trickling."""
        opened = [asyncio.get_running_loop().create_future() for _ in range(self.n)]
        self._tasks = [asyncio.create_task(self._one(i, fut)) for i, fut in enumerate(opened)]
        async with asyncio.timeout(open_timeout_s):
            await asyncio.gather(*opened)

    def stop_reconnecting(self) -> None:
        """From now on a closed connection stays closed."""
        self.reconnect = False

    async def wait_all_closed(self, timeout_s: float) -> bool:
        """Wait until the agent has closed every connection; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(t.done() for t in self._tasks):
                return True
            await asyncio.sleep(0.1)
        return all(t.done() for t in self._tasks)

    async def close(self) -> None:
        """Close whatever is still open (the client going away)."""
        self._closing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _one(self, i: int, opened: asyncio.Future[None]) -> None:
        first = True
        while not self._closing.is_set():
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                self.stats.connect_failures += 1
                if first:
                    opened.set_result(None)
                    first = False
                if not self.reconnect:
                    return
                await asyncio.sleep(self.reconnect_delay_s)
                continue
            self.stats.opened += 1
            self.stats.open_now += 1
            if first:
                opened.set_result(None)
                first = False
            try:
                await self._trickle(i, reader, writer)
            finally:
                self.stats.open_now -= 1
                writer.close()
            if not self.reconnect:
                return
            await asyncio.sleep(self.reconnect_delay_s)

    async def _trickle(self, i: int, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        writer.write(f"POST /v1/transactions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Conn: {i}\r\n"
                     .encode())
        line = 0
        while True:
            try:
                data = await asyncio.wait_for(reader.read(4096), self.interval_s)
            except TimeoutError:
                line += 1
                try:
                    writer.write(f"X-Slow-{line}: {'a' * 20}\r\n".encode())
                except (ConnectionError, RuntimeError):
                    data = b""
                else:
                    continue
            except (ConnectionError, OSError):
                data = b""
            # Data or end of stream: the agent answered and/or closed the connection.
            if data[:5] == b"HTTP/":
                self.stats.answers.append(int(data.split(b" ", 2)[1]))
            self.stats.closed_by_agent += 1
            self.stats.lifetimes_s.append(time.monotonic() - started)
            return


@dataclass
class SlowBodyResult:
    """One slow-body connection's fate."""

    status: int | None = None  # the answer, if one came
    answered_after_s: float | None = None
    closed_after_s: float | None = None  # when the agent closed the connection
    body: bytes = b""


async def slow_body(host: str, port: int, token: str, *, declared: int = 100_000,
                    interval_s: float = 0.5, give_up_s: float = 60.0) -> SlowBodyResult:
    """POST a transaction whose body trickles in one byte per ``interval_s``; return when
    the agent closes the connection (or after ``give_up_s``)."""
    result = SlowBodyResult()
    reader, writer = await asyncio.open_connection(host, port)
    started = time.monotonic()
    writer.write(request_head("POST", "/v1/transactions", {
        "Authorization": f"Bearer {token}", "Content-Type": "application/json",
        "Content-Length": str(declared)}))
    received = b""
    try:
        while time.monotonic() - started < give_up_s:
            try:
                data = await asyncio.wait_for(reader.read(65536), interval_s)
            except TimeoutError:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    writer.write(b" ")
                continue
            except (ConnectionError, OSError):
                data = b""
            if data and result.status is None:
                result.answered_after_s = time.monotonic() - started
            received += data
            if not data:
                result.closed_after_s = time.monotonic() - started
                break
    finally:
        writer.close()
    if received.startswith(b"HTTP/"):
        head, _, body = received.partition(b"\r\n\r\n")
        result.status = int(head.split(b" ", 2)[1])
        result.body = body
    return result


# -- huge bodies -----------------------------------------------------------------------------


@dataclass
class StreamResult:
    """How the agent answered a huge body."""

    status: int
    body: bytes
    answered_after_s: float
    sent_when_answered: int  # body bytes written to the socket when the answer arrived
    sent_total: int


async def stream_body(host: str, port: int, headers: dict[str, str], chunks: int,
                      chunk: bytes, *, path: str = "/v1/transactions",
                      chunked: bool = False, timeout_s: float = 20.0) -> StreamResult:
    """Send ``chunks`` × ``chunk`` as one request body, as fast as the socket takes it,
    while watching for the answer; stop sending once it arrived."""
    reader, writer = await asyncio.open_connection(host, port)
    head = dict(headers)
    if chunked:
        head["Transfer-Encoding"] = "chunked"
    else:
        head["Content-Length"] = str(chunks * len(chunk))
    started = time.monotonic()
    writer.write(request_head("POST", path, head))
    answer = asyncio.create_task(read_answer(reader, timeout_s))
    sent = 0
    sent_when_answered: int | None = None
    frame = (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") if chunked else chunk
    try:
        for _ in range(chunks):
            if answer.done():
                break
            writer.write(frame)
            sent += len(chunk)
            try:
                await asyncio.wait_for(writer.drain(), timeout_s)
            except (ConnectionError, TimeoutError):
                break  # the agent stopped reading (and closed): the answer is in
        else:
            if chunked:
                writer.write(b"0\r\n\r\n")
        status, body = await answer
        answered = time.monotonic() - started
        sent_when_answered = sent
    finally:
        answer.cancel()
        writer.close()
    return StreamResult(status, body, answered, sent_when_answered, sent)


# -- the flood, from its own process ---------------------------------------------------------


async def _flood_main(host: str, port: int, n: int, seconds: float,
                      reconnect_delay_s: float) -> None:
    loris = SlowLoris(host, port, n, interval_s=1.0, reconnect=True,
                      reconnect_delay_s=reconnect_delay_s)
    started = time.monotonic()
    await loris.start()
    print(json.dumps({"opened_in_s": round(time.monotonic() - started, 2)}), flush=True)
    await asyncio.sleep(seconds)
    await loris.close()
    stats = loris.stats
    print(json.dumps({"opened": stats.opened, "dropped_by_agent": stats.closed_by_agent,
                      "connect_failures": stats.connect_failures}), flush=True)


def main(argv: list[str]) -> None:
    """``python -m tests.system.hostile HOST PORT N SECONDS RECONNECT_DELAY_S``: run a
    reconnecting slowloris flood in this process (so that the test process measuring the
    agent meanwhile is not slowed by it); prints one JSON line when the connections are
    open and one with the figures at the end."""
    host, port, n, seconds, delay = argv
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_flood_main(host, int(port), int(n), float(seconds), float(delay)))


if __name__ == "__main__":
    main(sys.argv[1:])
