"""The system-test harness: a real ``tillsync run`` process, tills that behave like tills, a
flapping stand-in cloud, and a checker in the style of Jepsen's queue checker.

Only the external contract is used (CONTRACT.md): the agent is started as a subprocess on a
config file, fed over HTTP, killed with SIGKILL, and judged by what the stand-in cloud
committed. Nothing here reaches into the agent's memory.

* ``AgentProcess`` starts ``python -m agent run --config`` (or another command line, for the
  control run), waits for ``/readyz``, SIGKILLs it, starts it again. Its stderr goes to a
  log file that a failure message points at.
* ``Till`` is one POS terminal: it posts its sales one after another at a set pace and, like
  a real till, posts the *same* sale again until it gets an answer (202 or 200): a refused
  connection, a timeout, a 503 or a 507 all mean "try again". What got an answer is
  *acknowledged*: the agent promised it would not be lost.
* ``CloudFlapper`` cycles the cloud through healthy, down, 500s, 429 + Retry-After,
  commit-then-drop and slow phases.
* ``check`` counts, per business identity (terminal/transaction), the effects the cloud
  committed against what the tills were told, and returns a ``Report`` whose every figure
  but ``acknowledged`` must be zero.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import json
import os
import random
import signal
import socket
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

from agent.standin.cloud import Fault, RetryAfterAnswer, StandinCloud
from outbox.crypto import create_key_file

REPO = Path(__file__).resolve().parents[2]
STATUS_TOKEN = "system-status-token-0123456789"
DAY = "20261123"
# A request the agent had already sent when a Retry-After answer left the cloud cannot have
# honoured it; on loopback such requests arrive within milliseconds. Anything later is a
# request the agent chose to send while it knew it had to wait.
RETRY_AFTER_GRACE_S = 0.1
# A Retry-After is durable once the relay round holding its verdict commits: milliseconds,
# more on a loaded machine. A SIGKILL inside this time may forget it, and so does one before
# the answer leaves (the asker is dead); that is reported apart
# (``Report.retry_after_forgotten``) rather than as a violation.
RETRY_AFTER_RECORD_S = 0.25


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def terminal_ids(n: int) -> list[str]:
    """``T01`` … ``Tnn``."""
    return [f"T{i:02d}" for i in range(1, n + 1)]


def token_for(terminal: str) -> str:
    """The bearer token the config gives ``terminal``."""
    return f"system-till-{terminal}-token-0123456789"


def write_agent_config(root: Path, *, sink_url: str | None, terminals: Sequence[str],
                       outbox_path: Path | None = None, sink_extra: str = "",
                       outbox_extra: str = "", extra: str = "") -> Path:
    """Write ``root/agent.toml`` (and its key) for a system test; returns its path.

    The sink retries fast (50 ms backoff base, 0.5 s cap) so that a test's healing phase
    drains in seconds, and honours Retry-After up to 5 s.
    """
    root.mkdir(parents=True, exist_ok=True)
    key = root / "outbox.key"
    if not key.exists():
        create_key_file(key)
    outbox = outbox_path or root / "outbox.db"
    tills = "".join(f'[[api.terminals]]\nid = "{t}"\ntoken = "{token_for(t)}"\n\n'
                    for t in terminals)
    sink = (f'[[sinks]]\nname = "cloud"\ntype = "webhook"\nurl = "{sink_url}"\n'
            "timeout_s = 2\nbackoff_base_s = 0.05\nbackoff_cap_s = 0.5\n"
            f"max_retry_after_s = 5\npause_recheck_s = 1\n{sink_extra}\n"
            if sink_url else "")
    text = (f'[store]\nid = "store-system"\n{extra}\n'
            f'[api]\nlisten = "127.0.0.1:{free_port()}"\nstatus_token = "{STATUS_TOKEN}"\n\n'
            f"{tills}"
            f'[outbox]\npath = "{outbox}"\nkey_file = "{key}"\n{outbox_extra}\n'
            f"{sink}")
    path = root / "agent.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


def api_port(config: Path) -> int:
    """The API port written in ``config`` (read back without importing the agent's loader)."""
    for line in config.read_text().splitlines():
        if line.startswith("listen = "):
            return int(line.rsplit(":", 1)[1].rstrip('"'))
    raise ValueError(f"no api.listen in {config}")


def sale(terminal: str, seq: int) -> dict[str, Any]:
    """A valid sale (CONTRACT §5) whose quantity, and so total, varies with ``seq``."""
    quantity = 1 + seq % 5
    unit = Decimal("1.99")
    total = unit * quantity
    return {
        "transaction_id": f"{terminal}-{DAY}-{seq:06d}", "terminal_id": terminal,
        "type": "sale", "occurred_at": "2026-11-23T10:15:00+01:00", "currency": "EUR",
        "lines": [{"sku": "4006381333931", "description": "Ballpoint pen",
                   "quantity": str(quantity), "unit_price": str(unit), "discount": "0.00",
                   "tax_rate": "19"}],
        "tenders": [{"method": "card", "amount": str(total), "change": "0.00"}],
        "total": str(total),
    }


# -- the agent process ---------------------------------------------------------------------


class AgentProcess:
    """``tillsync run`` as a subprocess that can be SIGKILLed and started again."""

    def __init__(self, config: Path, *, log_path: Path,
                 command: Sequence[str] | None = None, env: dict[str, str] | None = None,
                 ) -> None:
        self.config = config
        self.log_path = log_path
        self.command = list(command or [sys.executable, "-m", "agent"])
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.base = f"http://127.0.0.1:{api_port(config)}"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.kills = 0
        self.ready_at: list[float] = []  # wall-clock times each start answered /readyz
        self._started_at: list[float] = []
        self.killed_at: list[float] = []  # wall-clock times of each SIGKILL

    @property
    def pid(self) -> int | None:
        """The running process's pid, if any."""
        return None if self.proc is None or self.proc.returncode is not None else self.proc.pid

    async def start(self, *, ready_timeout_s: float = 30.0, until: str = "/readyz") -> None:
        """Start the process and wait until ``until`` answers 200 (``/healthz`` for an agent
        that is alive but rightly not ready, e.g. on a full disk)."""
        assert self.pid is None, "already running"
        self._started_at.append(time.time())
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.starts + 1} at {self._started_at[-1]:.3f}\n".encode())
            self.proc = await asyncio.create_subprocess_exec(
                *self.command, "run", "--config", str(self.config), cwd=REPO, env=self.env,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
        self.starts += 1
        await self.wait_ready(ready_timeout_s, until)

    async def wait_ready(self, timeout_s: float, until: str = "/readyz") -> None:
        """Poll ``until``; raise with the log's tail if the process exits or times out."""
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.returncode is not None:
                    raise RuntimeError(f"agent exited with {self.proc.returncode}:\n"
                                       f"{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"{self.base}{until}") as resp:
                        if resp.status == 200:
                            self.ready_at.append(time.time())
                            return
                await asyncio.sleep(0.02)
        raise TimeoutError(f"agent not ready in {timeout_s} s:\n{self.log_tail()}")

    async def kill(self) -> None:
        """SIGKILL the process (no shutdown code runs) and reap it."""
        if self.pid is None:
            return
        assert self.proc is not None
        self.killed_at.append(time.time())
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self.kills += 1

    async def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait for a clean exit; return the exit code."""
        if self.pid is None:
            return 0 if self.proc is None else int(self.proc.returncode or 0)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout_s)
        except TimeoutError:
            await self.kill()
            raise

    def mean_restart_s(self) -> float:
        """Mean time from a start to ``/readyz`` answering, over every start so far."""
        starts = self._started_at[: len(self.ready_at)]
        if not starts:
            return 0.0
        return sum(r - s for s, r in zip(starts, self.ready_at, strict=True)) / len(starts)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the agent's log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def status(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """``GET /v1/status``."""
        async with http.get(f"{self.base}/v1/status",
                            headers={"Authorization": f"Bearer {STATUS_TOKEN}"}) as resp:
            assert resp.status == 200, await resp.text()
            return dict(await resp.json())


async def kill_loop(agent: AgentProcess, *, kills: int, uptime_s: tuple[float, float],
                    rng: random.Random) -> None:
    """SIGKILL ``agent`` ``kills`` times, each a random ``uptime_s`` after it became ready,
    and start it again each time (the last start is left running)."""
    for _ in range(kills):
        await asyncio.sleep(rng.uniform(*uptime_s))
        await agent.kill()
        await agent.start()


@contextlib.contextmanager
def young_gc_only() -> Iterator[None]:
    """Collect only the young generations of *this* (the test) process while inside.

    The stand-in cloud's request and effect logs and the tills' posted sales grow to about
    two million objects in a 30-minute run; a full collection then stalls the event loop that
    serves the cloud and the tills for up to 0.7 s (measured: ``loop_lag_ms``). The
    checker's Retry-After judgement allows 0.1 s between the cloud answering 429 and a
    request the agent had already sent, timed by that loop, so such a stall can turn a
    request that was on the wire into a "violation". Young generations, where aiohttp's
    reference cycles die, are still collected; the agent under test is untouched.
    """
    thresholds = gc.get_threshold()
    gc.set_threshold(thresholds[0], thresholds[1], 2**30)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)


# -- the tills -----------------------------------------------------------------------------


@dataclass
class Till:
    """One POS terminal posting sales in order and re-posting each until it is answered."""

    terminal: str
    base: str
    rate_per_s: float
    timeout_s: float = 2.0
    posted: dict[str, dict[str, Any]] = field(default_factory=dict)  # identity -> body
    acked: list[str] = field(default_factory=list)  # identities, in the order answered
    # Acknowledged only on a re-post (200, "already accepted") after an attempt that got no
    # answer: the agent had committed it when it died. Jepsen's "recovered".
    recovered: list[str] = field(default_factory=list)
    answers: Counter[int] = field(default_factory=Counter)
    no_answer: int = 0  # attempts that got no HTTP answer (refused, reset, timed out)
    refusals: list[tuple[int, str]] = field(default_factory=list)  # unexpected 4xx
    next_seq: int = 1

    async def run(self, stop: asyncio.Event, http: aiohttp.ClientSession) -> None:
        """Post sales until ``stop`` is set; the sale in hand is always finished first."""
        interval = 1.0 / self.rate_per_s
        headers = {"Authorization": f"Bearer {token_for(self.terminal)}",
                   "Content-Type": "application/json"}
        next_at = time.monotonic()
        while not stop.is_set():
            body = sale(self.terminal, self.next_seq)
            identity = f"{self.terminal}/{body['transaction_id']}"
            self.posted[identity] = body
            await self._post_until_answered(http, json.dumps(body).encode(), headers, identity)
            self.next_seq += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = time.monotonic()  # behind after an outage: no burst to catch up

    async def _post_until_answered(self, http: aiohttp.ClientSession, data: bytes,
                                   headers: dict[str, str], identity: str) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        unanswered = False
        while True:
            try:
                async with http.post(f"{self.base}/v1/transactions", data=data,
                                     headers=headers, timeout=timeout) as resp:
                    status = resp.status
                    text = await resp.text()
            except (aiohttp.ClientError, OSError, TimeoutError):
                self.no_answer += 1
                unanswered = True
                await asyncio.sleep(0.05)
                continue
            self.answers[status] += 1
            if status in (200, 202):
                self.acked.append(identity)
                if status == 200 and unanswered:
                    self.recovered.append(identity)
                return
            if status in (503, 507):
                await asyncio.sleep(0.1)  # the agent is starting or full: try again later
                continue
            # Anything else is a refusal a real till would show its operator; the harness
            # records it (the checker reports it) and moves on rather than spin.
            self.refusals.append((status, text[:300]))
            return


# -- the cloud's moods ---------------------------------------------------------------------


PHASES = ("healthy", "down", "http500", "throttled", "commit_then_drop", "slow")


class CloudFlapper:
    """Cycle the stand-in cloud through failure phases of ``phase_s`` seconds each."""

    def __init__(self, cloud: StandinCloud, rng: random.Random,
                 phase_s: tuple[float, float] = (0.5, 1.5)) -> None:
        self.cloud = cloud
        self.rng = rng
        self.phase_s = phase_s
        self.seen: Counter[str] = Counter()

    async def run(self, stop: asyncio.Event) -> None:
        """Flap until ``stop`` is set, then leave the cloud healthy."""
        try:
            while not stop.is_set():
                phase = self.rng.choice(PHASES)
                self.seen[phase] += 1
                await self._enter(phase)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.rng.uniform(*self.phase_s))
        finally:
            await self.heal()

    async def _enter(self, phase: str) -> None:
        await self.heal()
        cloud = self.cloud
        if phase == "down":
            await cloud.close_port()
        elif phase == "http500":
            cloud.down_status = 500
        elif phase == "throttled":
            cloud.down_status, cloud.down_retry_after = 429, "1"
        elif phase == "commit_then_drop":
            cloud.faults.extend(Fault.commit_then_drop() if i % 3 == 0 else Fault.slow(0.0)
                                for i in range(60))
        elif phase == "slow":
            cloud.latency_s = 0.3

    async def heal(self) -> None:
        """Back to a healthy cloud: listening, no sticky faults, no queued faults."""
        cloud = self.cloud
        cloud.down_status, cloud.down_retry_after, cloud.latency_s = None, None, 0.0
        cloud.faults.clear()
        await cloud.open_port()


# -- the checker ---------------------------------------------------------------------------


@dataclass
class Report:
    """What a run did to the tills' sales, in Jepsen's queue-checker categories plus ours.

    Jepsen's: *lost* (acknowledged, never committed by the cloud), *duplicated* (committed
    more than once), *unexpected* (committed, never posted), *recovered* (an attempt went
    unanswered, the sale was committed anyway: allowed). Ours: body mismatches (an effect
    whose content differs from what the till posted, or a key resent with other bytes),
    Retry-After violations, per-terminal order violations, and refusals (a 4xx to a valid
    sale). Every figure but ``acknowledged``, ``recovered`` and ``retry_after_forgotten``
    (a Retry-After the agent was killed on receiving; see ``early_requests``) must
    be 0.
    """

    acknowledged: int = 0
    recovered: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    body_mismatches: list[str] = field(default_factory=list)
    retry_after_violations: int = 0
    retry_after_forgotten: int = 0  # inside a Retry-After its asker was killed before recording
    order_violations: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Whether nothing went wrong."""
        return not (self.lost or self.duplicated or self.unexpected or self.body_mismatches
                    or self.retry_after_violations or self.order_violations or self.refusals)

    def figures(self) -> dict[str, int]:
        """The counts, for a table."""
        return {"acknowledged": self.acknowledged, "recovered": self.recovered,
                "lost": len(self.lost),
                "duplicated": sum(n - 1 for n in self.duplicated.values()),
                "unexpected": len(self.unexpected),
                "body_mismatches": len(self.body_mismatches),
                "retry_after_violations": self.retry_after_violations,
                "retry_after_forgotten": self.retry_after_forgotten,
                "order_violations": len(self.order_violations),
                "refusals": len(self.refusals)}

    def __str__(self) -> str:
        text = ", ".join(f"{k}={v}" for k, v in self.figures().items())
        for name in ("lost", "unexpected", "body_mismatches", "order_violations", "refusals"):
            items = getattr(self, name)
            if items:
                text += f"\n  {name}: {items[:5]}"
        if self.duplicated:
            text += f"\n  duplicated: {list(self.duplicated.items())[:5]}"
        return text


def _seq(identity: str) -> int:
    return int(identity.rsplit("-", 1)[1])


@dataclass(frozen=True)
class EarlyRequest:
    """A request that arrived while a Retry-After was in force (see ``early_requests``)."""

    at: float
    after_answer_s: float  # since the latest Retry-After answer before it (grace included)
    before_deadline_s: float  # until the window it fell in ends
    forgotten: bool  # only windows the agent was killed on receiving cover it


def early_requests(cloud: StandinCloud, kills: Sequence[float] = (),
                   grace_s: float = RETRY_AFTER_GRACE_S) -> list[EarlyRequest]:
    """Requests that arrived while a Retry-After was in force, with their timing.

    A window opens ``grace_s`` after the answer left (requests already on the wire then could
    not have known). An answer that no living agent could have made durable is *forgotten*,
    not ignored: one whose asker was SIGKILLed before the answer left (the cloud was still
    working on a dead process's request, e.g. in a slow phase) or within
    ``RETRY_AFTER_RECORD_S`` after (the answer is recorded with the verdict's commit). A
    request inside only such windows is marked ``forgotten`` rather than counted as a
    violation.
    """
    kill_times = sorted(kills)

    def unheard(answer: RetryAfterAnswer) -> bool:
        i = bisect.bisect_left(kill_times, answer.asked_at)
        return (i < len(kill_times)
                and kill_times[i] <= answer.at + RETRY_AFTER_RECORD_S)

    def merged(given: Sequence[RetryAfterAnswer]) -> tuple[list[float], list[float]]:
        """Disjoint windows as (starts, ends), ascending."""
        starts: list[float] = []
        ends: list[float] = []
        for start, end in sorted((g.at + grace_s, g.deadline - cloud.retry_after_slack_s)
                                 for g in given):
            if start >= end:
                continue
            if ends and start <= ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        return starts, ends

    def window_end(windows: tuple[list[float], list[float]], at: float) -> float | None:
        starts, ends = windows
        i = bisect.bisect_right(starts, at) - 1
        return ends[i] if i >= 0 and at < ends[i] else None

    kept = merged([g for g in cloud.retry_after_given if not unheard(g)])
    lost = merged([g for g in cloud.retry_after_given if unheard(g)])
    answered = sorted(g.at for g in cloud.retry_after_given)
    found = []
    for record in cloud.requests:
        end, forgotten = window_end(kept, record.at), False
        if end is None:
            end, forgotten = window_end(lost, record.at), True
        if end is not None:
            latest = answered[bisect.bisect_right(answered, record.at - grace_s) - 1]
            found.append(EarlyRequest(record.at, record.at - latest, end - record.at,
                                      forgotten))
    return found


def check(tills: Sequence[Till], cloud: StandinCloud, kills: Sequence[float] = ()) -> Report:
    """Compare what the tills were told with what the cloud committed (``kills``: when the
    agent was SIGKILLed, wall clock)."""
    posted: dict[str, dict[str, Any]] = {}
    report = Report()
    for till in tills:
        posted.update(till.posted)
        report.acknowledged += len(till.acked)
        report.recovered += len(till.recovered)
        report.refusals += [f"{till.terminal}: {status} {text}" for status, text in till.refusals]
    effects: dict[str, list[dict[str, Any]]] = defaultdict(list)
    first_order: dict[str, list[str]] = defaultdict(list)
    for effect in cloud.effects:
        identity = cloud.identity_of(effect)
        if identity not in effects:
            first_order[identity.split("/", 1)[0]].append(identity)
        effects[identity].append(effect.envelope.get("data") or {})
    for till in tills:
        for identity in till.acked:
            if not effects.get(identity):
                report.lost.append(identity)
    for identity, datas in effects.items():
        if identity not in posted:
            report.unexpected.append(identity)
            continue
        if len(datas) > 1:
            report.duplicated[identity] = len(datas)
        body = posted[identity]
        for data in datas:
            if (data.get("total") != body["total"]
                    or data.get("lines", [{}])[0].get("quantity")
                    != body["lines"][0]["quantity"]):
                report.body_mismatches.append(identity)
    report.body_mismatches += [f"key {m.key}" for m in cloud.body_mismatches]
    for identities in first_order.values():
        highest = 0
        for identity in identities:
            seq = _seq(identity)
            if seq < highest:
                report.order_violations.append(f"{identity} after seq {highest}")
            highest = max(highest, seq)
    early = early_requests(cloud, kills)
    report.retry_after_forgotten = sum(e.forgotten for e in early)
    report.retry_after_violations = len(early) - report.retry_after_forgotten
    return report


def integrity_check(db: Path) -> str:
    """``PRAGMA integrity_check`` of the outbox file (metadata is plain; payloads are
    encrypted, which the agent's own open verifies); "ok" when sound."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))


async def wait_drained(agent: AgentProcess, cloud: StandinCloud, timeout_s: float) -> None:
    """Wait until the agent's outbox owes nothing and the cloud has been quiet for a moment.

    It does not wait for particular sales: a sale the agent lost never arrives, and saying
    so is the checker's job, not a timeout's.
    """
    deadline = time.monotonic() + timeout_s
    last_effects, quiet_since = -1, time.monotonic()
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            outbox = (await agent.status(http))["outbox"]
            if len(cloud.effects) != last_effects:
                last_effects, quiet_since = len(cloud.effects), time.monotonic()
            if (outbox["pending"] == 0 and outbox["in_doubt"] == 0
                    and time.monotonic() - quiet_since >= 0.5):
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"the outbox did not drain in {timeout_s} s\n{agent.log_tail()}")
