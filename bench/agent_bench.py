"""Agent benchmark: HTTP ingest beside a bare aiohttp endpoint, latency, and idle cost.

- The agent runs as in production: ``python -m agent run --config agent.toml`` in its own
  process, durability "full", its outbox on a real disk under the scratch directory, four
  terminals with their own tokens, and one webhook sink pointing at ``bench.sink_server``
  (a separate process answering 200 at once), so the relay, the scheduler and the API all
  run while it is measured.
- The peer is ``bench.ingest_server``, in its own process: ``POST /v1/transactions`` parses
  the JSON and answers 202, storing nothing.
- Throughput: this process is the client, one aiohttp session limited to 32 keep-alive
  connections and 32 coroutines posting distinct valid sales over the four terminals (built
  beforehand, untimed; the same bodies and headers for both sides). Both sides get an untimed
  warm-up first; the bare endpoint is measured right before the agent. Every answer must be
  202, and the sink must receive each of the agent's sales exactly once.
- Latency: an open-loop schedule, sale ``i`` sent at ``t0 + i / 200`` whatever the earlier
  ones are doing (no connection limit), timed from its scheduled moment to the end of the
  202 answer, so a stall delays the count of every request queued behind it.
- Idle: once the relay has delivered everything, nothing is sent to the agent; its resident
  set is read from ``/proc/<pid>/status`` (VmRSS) and its CPU time (user + system, all
  threads) from ``/proc/<pid>/stat`` over the idle window.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agent.readiness import wait_until_ready
from bench.common import Row, at_least, at_most, child_server
from bench.relay_bench import sink_server
from outbox.crypto import create_key_file

TERMINALS = {f"T0{n}": f"bench-till-{n}-token-0123456789" for n in range(1, 5)}
STATUS_TOKEN = "bench-status-token-0123456789"
SINK_TOKEN = "bench-sink-token-0123456789"
SINK = "cloud"
CLIENTS = 32
RATIO_TARGET = 0.50
RATE = 200.0
P99_TARGET_MS = 15.0
RSS_TARGET_MB = 60.0
IDLE_CPU_TARGET_S = 0.3
IDLE_REFERENCE_S = 30.0
WARM_UP = 500
SETTLE_S = 2.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does."""

    sales: int  # per side, in the throughput run
    latency_s: float  # length of the open-loop run at RATE
    idle_s: float


FULL = Sizes(sales=20_000, latency_s=30.0, idle_s=30.0)
QUICK = Sizes(sales=2_000, latency_s=5.0, idle_s=5.0)


@dataclass(frozen=True)
class Burst:
    """One closed-loop throughput run against one server."""

    n: int
    seconds: float
    server_cpu: float  # the server process's CPU seconds during the run
    client_cpu: float  # this process's CPU seconds during the run

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.n / self.seconds

    @property
    def cpu_per_1000(self) -> float:
        """Server CPU seconds per 1,000 requests."""
        return self.server_cpu / self.n * 1000


@dataclass(frozen=True)
class Latency:
    """The open-loop run: times to 202 in ms, and how late the client sent."""

    n: int
    p50: float
    p99: float
    max: float
    lag_p99: float  # ms between a request's scheduled moment and its sending


@dataclass(frozen=True)
class Drain:
    """What the relay delivered to the sink while (and after) the agent ingested."""

    n: int
    seconds: float  # first to last arrival at the sink
    owed_at_end: int  # deliveries still pending when the last 202 came back

    @property
    def rate(self) -> float:
        """Deliveries per second."""
        return (self.n - 1) / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Idle:
    """The agent doing nothing: resident set and CPU time."""

    rss_fresh_mb: float  # right after start, before any sale
    rss_bare_mb: float  # the bare endpoint's, after its runs
    rss_mb: float  # after the load, at the end of the idle window
    cpu_s: float  # CPU seconds over the idle window
    seconds: float  # length of the idle window


def run(args: Any) -> list[Row]:
    """Run the agent benchmark in ``args.root``."""
    sizes = QUICK if args.quick else FULL
    root = Path(args.root)
    with sink_server() as sink, ingest_server() as (bare, bare_pid):
        config = write_config(root, f"{sink}/events")
        with agent_process(root, config) as (agent, agent_pid):
            return asyncio.run(measure(sizes, sink, bare, bare_pid, agent, agent_pid))


# -- the processes -----------------------------------------------------------------------------


@contextmanager
def ingest_server() -> Iterator[tuple[str, int]]:
    """Start ``bench.ingest_server`` in a child process; yield its base URL and pid."""
    with child_server("bench.ingest_server") as (child, read):
        yield f"http://127.0.0.1:{read()['port']}", child.pid


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(root: Path, sink_url: str) -> Path:
    """Write agent.toml and a new outbox key under ``root``; return the config's path."""
    key = root / "outbox.key"
    create_key_file(key)
    terminals = "".join(f'[[api.terminals]]\nid = "{t}"\ntoken = "{tok}"\n\n'
                        for t, tok in TERMINALS.items())
    text = (f'[store]\nid = "store-042"\n\n'
            f'[api]\nlisten = "127.0.0.1:{free_port()}"\nstatus_token = "{STATUS_TOKEN}"\n\n'
            f"{terminals}"
            f'[outbox]\npath = "{root / "outbox.db"}"\nkey_file = "{key}"\n'
            f'durability = "full"\n\n'
            f'[[sinks]]\nname = "{SINK}"\ntype = "webhook"\nurl = "{sink_url}"\n'
            f'token = "{SINK_TOKEN}"\n')
    path = root / "agent.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


@contextmanager
def agent_process(root: Path, config: Path) -> Iterator[tuple[str, int]]:
    """Run ``python -m agent run``; yield its base URL and pid once /readyz answers 200."""
    listen = next(line.split('"')[1] for line in config.read_text().splitlines()
                  if line.startswith("listen ="))
    base = f"http://{listen}"
    log_path = root / "agent.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)],
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        try:
            asyncio.run(until_ready(base, child))
            yield base, child.pid
        except BaseException:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            print("bench: the agent's log ends with:\n  " + "\n  ".join(tail), file=sys.stderr)
            raise
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


async def until_ready(base: str, child: subprocess.Popen[bytes]) -> None:
    """Poll /readyz until it answers 200 (at most 30 s)."""
    await wait_until_ready(base, timeout_s=30, failed=lambda: None if child.poll() is None
                           else f"the agent exited with status {child.returncode}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid``, all its threads."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def rss_mb(pid: int) -> float:
    """Resident set of process ``pid`` in MB (10^6 bytes), from VmRSS."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for process {pid}")


# -- the sales ---------------------------------------------------------------------------------

Request = tuple[bytes, dict[str, str]]


class Sales:
    """Distinct valid sales over the four terminals, as request bodies and headers."""

    def __init__(self) -> None:
        self.seq = 0

    def take(self, n: int) -> list[Request]:
        """The next ``n`` sales, round-robin over the terminals."""
        out = []
        names = list(TERMINALS)
        for _ in range(n):
            self.seq += 1
            terminal = names[self.seq % len(names)]
            body = json.dumps(sale(terminal, self.seq), separators=(",", ":")).encode()
            out.append((body, {"Authorization": f"Bearer {TERMINALS[terminal]}",
                               "Content-Type": "application/json"}))
        return out


def sale(terminal: str, seq: int) -> dict[str, Any]:
    """A valid sale (CONTRACT §5) of two pens at 1.99, paid in cash."""
    return {
        "transaction_id": f"{terminal}-20261122-{seq:07d}", "terminal_id": terminal,
        "type": "sale", "occurred_at": "2026-11-22T10:15:00+01:00", "currency": "EUR",
        "lines": [{"sku": "4006381333931", "description": "Ballpoint pen", "quantity": "2",
                   "unit_price": "1.99", "discount": "0.00", "tax_rate": "19"}],
        "tenders": [{"method": "cash", "amount": "5.00", "change": "1.02"}],
        "total": "3.98",
    }


# -- the runs ----------------------------------------------------------------------------------


async def burst(base: str, pid: int, requests: list[Request]) -> Burst:
    """POST ``requests`` through 32 keep-alive connections; every answer must be 202."""
    todo = iter(requests)
    url = f"{base}/v1/transactions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:

        async def client() -> None:
            for body, headers in todo:
                async with session.post(url, data=body, headers=headers) as resp:
                    answer = await resp.read()
                    if resp.status != 202:
                        raise RuntimeError(f"{base} answered {resp.status}: {answer[:200]!r}")

        cpu, mine, start = cpu_seconds(pid), time.process_time(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(CLIENTS)))
        seconds = time.perf_counter() - start
        cpu, mine = cpu_seconds(pid) - cpu, time.process_time() - mine
    return Burst(len(requests), seconds, cpu, mine)


async def open_loop(base: str, requests: list[Request]) -> Latency:
    """Send request ``i`` at ``t0 + i / RATE``; time each from that moment to its 202."""
    url = f"{base}/v1/transactions"
    times: list[float] = []
    lags: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(request: Request, due: float) -> None:
            lags.append(time.perf_counter() - due)
            body, headers = request
            async with session.post(url, data=body, headers=headers) as resp:
                answer = await resp.read()
            times.append(time.perf_counter() - due)
            if resp.status != 202:
                raise RuntimeError(f"the agent answered {resp.status}: {answer[:200]!r}")

        await send_on_schedule(requests, RATE, one)
    times.sort()
    lags.sort()
    return Latency(len(times), 1000 * quantile(times, 0.50), 1000 * quantile(times, 0.99),
                   1000 * times[-1], 1000 * quantile(lags, 0.99))


async def accepted(session: aiohttp.ClientSession, url: str, request: Request) -> bool:
    """POST one sale; whether it was answered 202 (a refused or broken connection is not)."""
    body, headers = request
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status == 202
    except (aiohttp.ClientError, OSError):
        return False


async def send_on_schedule(requests: list[Request], rate: float,
                           one: Callable[[Request, float], Coroutine[Any, Any, None]],
                           ) -> float:
    """Start ``one(request, due)`` for request ``i`` at ``due = t0 + i / rate``, whatever
    the earlier ones are doing (open loop); wait for all; return ``t0``."""
    tasks = []
    t0 = time.perf_counter() + 0.05
    for i, request in enumerate(requests):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(request, due)))
    await asyncio.gather(*tasks)
    return t0


def quantile(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of an ascending list."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def get_json(session: aiohttp.ClientSession, method: str, url: str,
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One request; the parsed JSON answer."""
    async with session.request(method, url, headers=headers) as resp:
        resp.raise_for_status()
        answer: dict[str, Any] = await resp.json()
        return answer


async def owed(session: aiohttp.ClientSession, agent: str) -> int:
    """Deliveries the agent still owes the sink (pending or in doubt), from /v1/status."""
    status = await get_json(session, "GET", f"{agent}/v1/status",
                            {"Authorization": f"Bearer {STATUS_TOKEN}"})
    doc = next(s for s in status["sinks"] if s["name"] == SINK)
    if doc["dead"]:
        raise RuntimeError(f"deliveries died during the benchmark: {doc}")
    return int(doc["pending"]) + int(doc["in_doubt"])


async def until_drained(session: aiohttp.ClientSession, agent: str) -> None:
    """Return once the relay has delivered everything (polled every 100 ms, at most 120 s)."""
    deadline = time.monotonic() + 120
    while await owed(session, agent):
        if time.monotonic() > deadline:
            raise TimeoutError("the relay did not drain within 120 s")
        await asyncio.sleep(0.1)


def check_exactly_once(label: str, n: int, seen: dict[str, Any]) -> None:
    """A run that lost or duplicated a delivery measured the wrong thing."""
    if seen["posts"] != n or seen["keys"] != n:
        raise RuntimeError(f"{label}: the sink saw {seen['posts']} posts with {seen['keys']}"
                           f" distinct keys, expected {n} of each")


async def measure(sizes: Sizes, sink: str, bare: str, bare_pid: int, agent: str,
                  agent_pid: int) -> list[Row]:
    """Fresh RSS, warm-ups, bare then agent bursts, the open-loop run, then idle."""
    sales = Sales()
    await asyncio.sleep(SETTLE_S)
    rss_fresh = rss_mb(agent_pid)
    async with aiohttp.ClientSession() as control:
        warm_up = sales.take(WARM_UP)  # neither side should pay for its first requests
        await burst(bare, bare_pid, warm_up)
        await burst(agent, agent_pid, warm_up)
        await until_drained(control, agent)

        requests = sales.take(sizes.sales)  # the same bodies and headers for both sides
        bare_run = await burst(bare, bare_pid, requests)
        await get_json(control, "POST", f"{sink}/reset")
        agent_run = await burst(agent, agent_pid, requests)
        owed_at_end = await owed(control, agent)
        await until_drained(control, agent)
        seen = await get_json(control, "GET", f"{sink}/stats")
        check_exactly_once("ingest", sizes.sales, seen)
        drain = Drain(seen["posts"], seen["last"] - seen["first"], owed_at_end)

        await get_json(control, "POST", f"{sink}/reset")
        latency = await open_loop(agent, sales.take(round(sizes.latency_s * RATE)))
        await until_drained(control, agent)
        check_exactly_once("latency", latency.n, await get_json(control, "GET", f"{sink}/stats"))

    await asyncio.sleep(SETTLE_S)
    cpu, start = cpu_seconds(agent_pid), time.perf_counter()
    await asyncio.sleep(sizes.idle_s)
    idle = Idle(rss_fresh, rss_mb(bare_pid), rss_mb(agent_pid), cpu_seconds(agent_pid) - cpu,
                time.perf_counter() - start)
    return build_rows(sizes, bare_run, agent_run, drain, latency, idle)


def build_rows(sizes: Sizes, bare: Burst, agent: Burst, drain: Drain, latency: Latency,
               idle: Idle) -> list[Row]:
    """The table: ingest rate against the bare endpoint, latency, idle RSS and CPU."""
    ratio = agent.rate / bare.rate
    quick = " (--quick size)" if sizes is QUICK else ""
    idle_cpu = idle.cpu_s * IDLE_REFERENCE_S / idle.seconds
    scaled = (f"; measured over {idle.seconds:.0f} s and scaled to 30 s"
              if sizes.idle_s != IDLE_REFERENCE_S else "")
    open_loop_note = (f"{latency.n:,} sales over {latency.n / RATE:.0f} s, open loop, timed"
                      f" from each one's scheduled send to the end of its 202 answer; client"
                      f" send lag p99 {latency.lag_p99:.2f} ms{quick}")
    return [
        Row(f"HTTP ingest, durability full, {CLIENTS} keep-alive clients, 4 terminals,"
            f" {agent.n:,} sales", agent.rate, "requests/s",
            "bare aiohttp endpoint (parse JSON, 202), same client and bodies", bare.rate, ratio,
            f"≥ {RATIO_TARGET:g}×", at_least(ratio, RATIO_TARGET),
            f"every answer 202; each 202 after the sale's group commit (fsync); the relay"
            f" delivered to the sink meanwhile; {agent.seconds:.1f} s against"
            f" {bare.seconds:.1f} s; the client (this process) used"
            f" {agent.client_cpu / agent.seconds:.0%} of a core against the agent,"
            f" {bare.client_cpu / bare.seconds:.0%} against the bare endpoint{quick}"),
        Row("server CPU per 1,000 sales", agent.cpu_per_1000, "CPU s",
            "bare aiohttp endpoint", bare.cpu_per_1000, agent.cpu_per_1000 / bare.cpu_per_1000,
            note="server process CPU (all threads) during the timed run; the agent's includes"
                 " its relay delivering the same sales"),
        Row("relay delivery during and after the ingest run", drain.rate, "events/s",
            note=f"{drain.n:,} deliveries, sink arrivals first to last over"
                 f" {drain.seconds:.1f} s; {drain.owed_at_end:,} still owed at the last 202"),
        Row(f"time to 202 at a steady {RATE:g} sales/s, p50", latency.p50, "ms",
            note=open_loop_note),
        Row(f"time to 202 at a steady {RATE:g} sales/s, p99", latency.p99, "ms",
            target=f"≤ {P99_TARGET_MS:g} ms", passed=at_most(latency.p99, P99_TARGET_MS)),
        Row(f"time to 202 at a steady {RATE:g} sales/s, max", latency.max, "ms"),
        Row("RSS at idle, right after start", idle.rss_fresh_mb, "MB",
            target=f"≤ {RSS_TARGET_MB:g} MB", passed=at_most(idle.rss_fresh_mb, RSS_TARGET_MB),
            note="VmRSS of the agent process, /readyz answered 200, relay and scheduler"
                 " running, nothing posted yet"),
        Row("RSS at idle, after the runs above", idle.rss_mb, "MB",
            "bare aiohttp endpoint, after its runs", idle.rss_bare_mb,
            idle.rss_mb / idle.rss_bare_mb,
            target=f"≤ {RSS_TARGET_MB:g} MB", passed=at_most(idle.rss_mb, RSS_TARGET_MB),
            note="VmRSS at the end of the idle window, everything delivered"),
        Row("CPU used in 30 s idle", idle_cpu, "CPU s",
            target=f"≤ {IDLE_CPU_TARGET_S:g} s", passed=at_most(idle_cpu, IDLE_CPU_TARGET_S),
            note=f"utime + stime of the agent process (all threads) from /proc/<pid>/stat,"
                 f" nothing posted, relay idle, scheduler running{scaled}; resolution one"
                 f" clock tick ({1000 / CLOCK_TICKS:.0f} ms)"),
    ]
