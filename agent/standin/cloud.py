"""A stand-in cloud: an idempotent commerce API on 127.0.0.1 with injectable faults.

The relay's tests, the system tests and ``tillsync demo`` deliver to this server instead of a
real cloud. It receives the webhook request of CONTRACT.md §6 and behaves like the APIs it
imitates, so that the oracle "effects per key ≤ 1, nothing lost" is checked against realistic
server behaviour rather than a mock that accepts anything.

What it imitates
================

* **Stripe idempotency** (docs.stripe.com/idempotency): the first request with a key *executes*
  (commits an effect) and its response is saved; a later request with the same key and the
  same parameters gets the saved response back with ``Idempotent-Replayed: true`` and executes
  nothing; the same key with different parameters is an ``idempotency_error``. Validation
  failures (400, 401) happen before execution and are not saved. Keys may be pruned after a
  retention time (Stripe: at least 24 h); a key reused after pruning executes again. That is a
  real duplicate, which is what the TTL exists to let tests provoke.
* **IETF draft-ietf-httpapi-idempotency-key-header**: ``400`` when the key is missing, ``422``
  when a key is reused with a different payload (the fingerprint here is the raw body bytes,
  because CONTRACT.md §6 promises byte-identical resends), ``409`` while the first request
  with that key is still being processed.
* **Rate limiting / unavailability** (RFC 9110 §10.2.3, RFC 6585 §4): 429 and 503 with
  ``Retry-After`` as delta-seconds or an HTTP-date. A watchdog records every request that
  arrives before the latest ``Retry-After`` it handed out (the contract says no request to a
  sink before then, whatever the key).

Request handling, in order
==========================
``POST <path>`` (default ``/events``):

1. Arrival is logged in ``requests`` and checked by the Retry-After watchdog.
2. Sticky modes: ``latency_s`` sleeps; ``down_status`` answers every request with that status.
3. The next queued ``Fault`` (``faults``), if any, is taken. Status faults are answered "at the
   edge", before the idempotency layer: nothing is committed or saved, like a load balancer's
   502 or a rate limiter's 429.
4. Authentication: ``auth_failing`` → 401; a configured bearer ``token`` that does not match
   → 401.
5. ``Idempotency-Key`` missing, empty or longer than 255 characters → 400.
6. With a ``signing_secret``, ``Tillsync-Signature: t=<unix>,v1=<hex>`` must carry an
   HMAC-SHA256 of ``"<t>.<raw body>"`` and ``t`` within 5 minutes of the server clock. Any
   failure is 401, not 400: a bad signature means a wrong secret or clock, a credential
   problem, and in the contract's outcome table 401 pauses the sink while 400 would
   dead-letter every event one by one.
7. The body must be a JSON object → else 400.
8. Idempotency layer: key in progress → 409; key saved with identical body → replay of the
   saved response; key saved with another body → 422 (recorded in ``body_mismatches``); new
   key → commit an ``Effect`` and answer 201.

``GET <path>/{idempotency_key}`` settles an in-doubt delivery by lookup: 200 with the effect
committed under that key, 409 while that key is in progress, 404 if nothing was committed.
It searches the effect log, not the idempotency cache, so it still answers after the key's
retention time: it is the "check" of check-then-create. It is subject to the sticky modes
and authentication, and takes faults from ``lookup_faults``, not from ``faults``.

Faults
======
``Fault.status(code, retry_after=None)``
    Answer ``code`` without committing (error body ``{"error": {...}}``).
``Fault.drop_before_commit()``
    Read the request, then close the connection without an answer. Nothing is committed; the
    client sees a disconnect and cannot know that.
``Fault.commit_then_drop()``
    Commit the effect and save its 201, then close the connection without writing a byte.
    The client sees ``ServerDisconnectedError``; a retry with the same key gets the replay.
``Fault.commit_then_status(code)``
    Commit and save the 201, but answer ``code`` (a proxy failing after the origin
    succeeded). A retry gets the saved 201 as a replay.
``Fault.slow(seconds)``
    Hold the key as "in progress" for ``seconds``, then commit. A client that times out
    meanwhile leaves a request that *still commits later*: that is what a real server does,
    and it is why a timeout is "in doubt", not "failed". Retries during the window get 409.

Stopping the server (``stop``) abandons requests still sleeping after ``shutdown_timeout_s``;
those commit nothing. ``close_port`` stops listening *and* closes open connections (the
network went away), but handlers already running carry on, like a server behind a cut cable.

Time
====
Every timestamp (arrival, key age, signature skew, Retry-After deadlines) comes from the
``clock`` given to the constructor (``time.time`` by default), so a test can fake a 72-hour
outage against a 24-hour key TTL without waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate, parsedate_to_datetime
from types import TracebackType
from typing import Any, Literal, Self

from aiohttp import web

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Envelope = dict[str, Any]
IdentityFn = Callable[[Envelope], str | None]
StreamFn = Callable[[Envelope], str | None]
FaultKind = Literal[
    "status", "drop_before_commit", "commit_then_drop", "commit_then_status", "slow"
]
Outcome = Literal[
    "pending",
    "committed",
    "replayed",
    "in_progress",
    "key_reused",
    "missing_key",
    "bad_request",
    "unauthorized",
    "bad_signature",
    "fault",
    "down",
    "dropped",
    "committed_dropped",
    "committed_fault",
    "found",
    "not_found",
    "abandoned",
]

IDEMPOTENCY_KEY = "Idempotency-Key"
SIGNATURE_HEADER = "Tillsync-Signature"
REPLAYED_HEADER = "Idempotent-Replayed"
# Stripe's limit; a longer key is a client bug worth failing loudly on.
MAX_KEY_LENGTH = 255
# Stripe's webhook tolerance: enough for sloppy NTP, too little for a useful replay attack.
DEFAULT_SIGNATURE_TOLERANCE_S = 300.0
# asyncio timers may fire up to the clock resolution early and an HTTP-date has whole
# seconds; a few milliseconds of slack keeps an honest client from being flagged.
DEFAULT_RETRY_AFTER_SLACK_S = 0.01


@dataclass(frozen=True)
class Fault:
    """One injected misbehaviour, consumed by one request (see the module docstring)."""

    kind: FaultKind
    code: int = 0
    retry_after: str | None = None
    seconds: float = 0.0

    @classmethod
    def status(cls, code: int, *, retry_after: str | float | None = None) -> Fault:
        """Answer ``code`` (optionally with ``Retry-After``) without committing."""
        return cls("status", code=code, retry_after=_retry_after_text(retry_after))

    @classmethod
    def drop_before_commit(cls) -> Fault:
        """Close the connection without an answer and without committing."""
        return cls("drop_before_commit")

    @classmethod
    def commit_then_drop(cls) -> Fault:
        """Commit the effect, then close the connection without an answer."""
        return cls("commit_then_drop")

    @classmethod
    def commit_then_status(cls, code: int, *, retry_after: str | float | None = None) -> Fault:
        """Commit and save a 201, but answer ``code`` to this request."""
        return cls("commit_then_status", code=code, retry_after=_retry_after_text(retry_after))

    @classmethod
    def slow(cls, seconds: float) -> Fault:
        """Hold the key in progress for ``seconds`` before committing."""
        return cls("slow", seconds=seconds)


@dataclass(frozen=True)
class Effect:
    """A committed effect: what the business system would have recorded."""

    seq: int
    key: str
    body: bytes
    envelope: Envelope
    at: float  # when it was committed (later than arrival under Fault.slow)
    arrived_at: float  # when the request that committed it arrived

    @property
    def id(self) -> str:
        """The server's id for the effect (like a Stripe object id)."""
        return f"eff_{self.seq:06d}"

    @property
    def event_id(self) -> str | None:
        """The agent's event id from the envelope, if it sent one."""
        value = self.envelope.get("id")
        return None if value is None else str(value)


@dataclass
class RequestRecord:
    """One request as the server saw it; ``status`` is None when no answer was written."""

    at: float
    method: str
    path: str
    key: str | None
    status: int | None = None
    outcome: Outcome = "pending"


@dataclass(frozen=True)
class RetryAfterAnswer:
    """A 429/503 that carried a Retry-After: when its request arrived, when the answer left.

    A checker needs the arrival too: an answer to a client that died in between was never
    heard by anyone.
    """

    asked_at: float
    at: float
    deadline: float


@dataclass(frozen=True)
class BodyMismatch:
    """A key reused with different bytes: a client bug (the contract promises identical bytes)."""

    at: float
    key: str
    original_body: bytes
    new_body: bytes


@dataclass(frozen=True)
class RetryAfterViolation:
    """A request that arrived before the latest ``Retry-After`` deadline had passed."""

    at: float
    not_before: float
    method: str
    path: str
    key: str | None

    @property
    def early_by_s(self) -> float:
        """How many seconds too early the request came."""
        return self.not_before - self.at


@dataclass
class _Saved:
    body: bytes
    status: int
    response_body: bytes
    at: float


def sign(secret: str, body: bytes, t: int) -> str:
    """Return a ``Tillsync-Signature`` value for ``body`` signed at unix time ``t``."""
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256)
    return f"t={t},v1={mac.hexdigest()}"


def http_date(ts: float) -> str:
    """Format a unix time as an HTTP-date (for ``Retry-After``)."""
    return formatdate(ts, usegmt=True)


def default_identity(envelope: Envelope) -> str | None:
    """Return a sale's business identity, ``terminal_id/transaction_id``, if both are present."""
    data = envelope.get("data")
    if isinstance(data, Mapping):
        terminal, txn = data.get("terminal_id"), data.get("transaction_id")
        if terminal is not None and txn is not None:
            return f"{terminal}/{txn}"
    return None


def default_stream(envelope: Envelope) -> str | None:
    """Return the ordering stream of an event: its ``data.terminal_id``."""
    data = envelope.get("data")
    if isinstance(data, Mapping) and data.get("terminal_id") is not None:
        return str(data["terminal_id"])
    return None


def _retry_after_text(value: str | float | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(int(value))


def _retry_after_deadline(value: str, now: float) -> float | None:
    """Turn a Retry-After value into an absolute time; None when malformed (not enforceable)."""
    text = value.strip()
    if text.isascii() and text.isdigit():
        return now + int(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _error(type_: str, code: str, message: str) -> bytes:
    return json.dumps({"error": {"type": type_, "code": code, "message": message}}).encode()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class StandinCloud:
    """An idempotent webhook API on 127.0.0.1 with injectable faults and an effect log."""

    def __init__(
        self,
        *,
        path: str = "/events",
        token: str | None = None,
        signing_secret: str | None = None,
        key_ttl_s: float | None = None,
        signature_tolerance_s: float = DEFAULT_SIGNATURE_TOLERANCE_S,
        identity: IdentityFn = default_identity,
        clock: Clock | None = None,
        retry_after_slack_s: float = DEFAULT_RETRY_AFTER_SLACK_S,
        shutdown_timeout_s: float = 1.0,
    ) -> None:
        if not path.startswith("/") or path.endswith("/"):
            raise ValueError(f"path must start with '/' and not end with it: {path!r}")
        self.path = path
        # Credentials and modes are plain attributes so a test can rotate or break them live.
        self.token = token
        self.signing_secret = signing_secret
        self.key_ttl_s = key_ttl_s
        self.signature_tolerance_s = signature_tolerance_s
        self.identity = identity
        self.retry_after_slack_s = retry_after_slack_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self._clock: Clock = clock or time.time

        self.faults: deque[Fault] = deque()
        self.lookup_faults: deque[Fault] = deque()
        self.down_status: int | None = None
        self.down_retry_after: str | None = None
        self.auth_failing = False
        self.latency_s = 0.0

        self.effects: list[Effect] = []
        self.requests: list[RequestRecord] = []
        self.body_mismatches: list[BodyMismatch] = []
        self.retry_after_violations: list[RetryAfterViolation] = []
        # Every 429/503 that carried a Retry-After: a checker that allows for requests
        # already in flight when the answer left, or for a client killed meanwhile, reads
        # these.
        self.retry_after_given: list[RetryAfterAnswer] = []

        self._saved: dict[str, _Saved] = {}
        self._in_progress: set[str] = set()
        self._effect_by_key: dict[str, Effect] = {}
        self._not_before: float | None = None
        # Replaced on every change; a waiter holds the one it saw, so no wake-up is lost.
        self._changed = asyncio.Event()

        self._host = "127.0.0.1"
        self._port: int | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (0 picks a free port; read it from ``port`` or ``url``)."""
        if self._runner is not None:
            raise RuntimeError("StandinCloud is already started")
        app = web.Application()
        app.router.add_post(self.path, self._handle_post)
        app.router.add_get(self.path + "/{key}", self._handle_lookup)
        # access_log=None: every request is already in ``requests`` and our own log line.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.shutdown_timeout_s)
        await runner.setup()
        self._runner = runner
        self._host = host
        try:
            await self._listen(port)
        except BaseException:
            self._runner = None
            await runner.cleanup()
            raise

    async def stop(self) -> None:
        """Stop listening and close every connection; safe to call twice."""
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

    async def close_port(self) -> None:
        """Refuse connections (and cut open ones) until ``open_port``; the port is kept."""
        if self._runner is None:
            raise RuntimeError("StandinCloud is not started")
        site, self._site = self._site, None
        if site is not None:
            await site.stop()
        # A network outage also kills kept-alive connections; without this a pooled client
        # connection would keep working through the "outage".
        server = self._runner.server
        if server is not None:
            for conn in server.connections:
                conn.force_close()

    async def open_port(self) -> None:
        """Listen again on the same port after ``close_port``."""
        if self._runner is None or self._port is None:
            raise RuntimeError("StandinCloud is not started")
        if self._site is None:
            await self._listen(self._port)

    async def _listen(self, port: int) -> None:
        assert self._runner is not None
        # reuse_address: rebinding the same port right after close_port must not fail on
        # connections still in TIME_WAIT.
        site = web.TCPSite(self._runner, self._host, port, reuse_address=True)
        await site.start()
        self._site = site
        self._port = site.port

    async def __aenter__(self) -> Self:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def listening(self) -> bool:
        """Whether the port currently accepts connections."""
        return self._site is not None

    @property
    def port(self) -> int:
        """The bound TCP port (stays the same across ``close_port``/``open_port``)."""
        if self._port is None:
            raise RuntimeError("StandinCloud is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port`` without the path."""
        return f"http://{self._host}:{self.port}"

    @property
    def url(self) -> str:
        """The webhook URL to configure as a sink, e.g. ``http://127.0.0.1:PORT/events``."""
        return self.base_url + self.path

    def lookup_url(self, key: str) -> str:
        """Return the lookup URL for one idempotency key."""
        return f"{self.url}/{key}"

    # -- observations ----------------------------------------------------------------------

    @property
    def effects_by_key(self) -> dict[str, int]:
        """Committed effects per idempotency key (more than 1 only after the key TTL)."""
        return dict(Counter(effect.key for effect in self.effects))

    @property
    def replays(self) -> list[RequestRecord]:
        """Requests answered from the saved response instead of committing."""
        return [r for r in self.requests if r.outcome == "replayed"]

    @property
    def retry_after_not_before(self) -> float | None:
        """The latest Retry-After deadline handed out, as a clock time."""
        return self._not_before

    def identity_of(self, effect: Effect) -> str:
        """Return the business identity of an effect (``identity``, else its key)."""
        return self.identity(effect.envelope) or effect.key

    def duplicates(self) -> dict[str, int]:
        """Return business identities committed more than once, with their effect counts."""
        counts = Counter(self.identity_of(effect) for effect in self.effects)
        return {identity: n for identity, n in counts.items() if n > 1}

    def order_by_stream(self, stream_fn: StreamFn = default_stream) -> dict[str, list[str]]:
        """Return event ids per stream in first-effect order (a None stream is "")."""
        order: dict[str, list[str]] = {}
        seen: set[str] = set()
        for effect in self.effects:
            event_id = effect.event_id or effect.key
            if event_id in seen:
                continue
            seen.add(event_id)
            order.setdefault(stream_fn(effect.envelope) or "", []).append(event_id)
        return order

    def expire_keys(self) -> None:
        """Forget every saved idempotency key now, as if the retention time had passed."""
        self._saved.clear()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        """Wait until ``predicate()`` is true, re-checked after every request; TimeoutError."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    changed = self._changed
                    if predicate():
                        return
                    await changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"condition not met in {timeout_s}s: {len(self.effects)} effects, "
                f"{len(self.requests)} requests"
            ) from None

    async def wait_for_effects(self, n: int, timeout_s: float = 5.0) -> list[Effect]:
        """Wait until at least ``n`` effects are committed; return the effect log."""
        await self.wait_for(lambda: len(self.effects) >= n, timeout_s)
        return list(self.effects)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- request handling ------------------------------------------------------------------

    def _arrive(self, request: web.Request, key: str | None) -> RequestRecord:
        now = self._clock()
        record = RequestRecord(at=now, method=request.method, path=request.path, key=key)
        self.requests.append(record)
        if self._not_before is not None and now + self.retry_after_slack_s < self._not_before:
            violation = RetryAfterViolation(
                now, self._not_before, request.method, request.path, key
            )
            self.retry_after_violations.append(violation)
            log.warning("request %.3fs before Retry-After", violation.early_by_s)
        return record

    def _answer(
        self,
        record: RequestRecord,
        status: int,
        outcome: Outcome,
        body: bytes,
        *,
        retry_after: str | None = None,
        replayed: bool = False,
    ) -> web.Response:
        record.status, record.outcome = status, outcome
        headers = {"Content-Type": "application/json"}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
            if status in (429, 503):
                deadline = _retry_after_deadline(retry_after, self._clock())
                if deadline is not None:
                    self._not_before = max(deadline, self._not_before or deadline)
                    self.retry_after_given.append(
                        RetryAfterAnswer(record.at, self._clock(), deadline))
        if replayed:
            headers[REPLAYED_HEADER] = "true"
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        log.debug("%s %s key=%s -> %s %s", record.method, record.path, record.key, status, outcome)
        return web.Response(status=status, body=body, headers=headers)

    def _drop(self, request: web.Request, record: RequestRecord, outcome: Outcome) -> web.Response:
        record.status, record.outcome = None, outcome
        log.debug("%s %s key=%s -> dropped (%s)", record.method, record.path, record.key, outcome)
        transport = request.transport
        if transport is not None:
            transport.close()
        # aiohttp then fails to write this response to the closed transport, treats it as a
        # client disconnect and writes nothing: the client sees the connection close.
        return web.Response(status=204)

    def _fault_answer(self, record: RequestRecord, fault: Fault) -> web.Response:
        message = f"injected fault: HTTP {fault.code}"
        body = _error("injected_fault", str(fault.code), message)
        return self._answer(record, fault.code, "fault", body, retry_after=fault.retry_after)

    async def _gate(self, record: RequestRecord) -> web.Response | None:
        """Apply sticky modes; return an answer if the request stops here."""
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        if self.down_status is not None:
            body = _error("api_error", "down", f"stand-in is down: HTTP {self.down_status}")
            return self._answer(
                record, self.down_status, "down", body, retry_after=self.down_retry_after
            )
        return None

    def _authenticate(self, request: web.Request, record: RequestRecord) -> web.Response | None:
        expected = None if self.token is None else f"Bearer {self.token}"
        presented = request.headers.get("Authorization", "")
        if self.auth_failing or (
            expected is not None and not hmac.compare_digest(presented.encode(), expected.encode())
        ):
            body = _error("authentication_error", "invalid_token", "missing or invalid token")
            return self._answer(record, 401, "unauthorized", body)
        return None

    def _signature_problem(self, header: str | None, body: bytes) -> str | None:
        """Why the signature is unacceptable, or None if it verifies."""
        assert self.signing_secret is not None
        if not header:
            return f"missing {SIGNATURE_HEADER}"
        parts: dict[str, list[str]] = {}
        for item in header.split(","):
            name, sep, value = item.strip().partition("=")
            if sep:
                parts.setdefault(name, []).append(value)
        try:
            t = int(parts["t"][0])
        except (KeyError, ValueError):
            return "malformed signature header"
        if abs(self._clock() - t) > self.signature_tolerance_s:
            return "signature timestamp outside tolerance"
        expected = sign(self.signing_secret, body, t).partition(",v1=")[2]
        # Several v1 values are allowed, as Stripe does, so a secret can be rotated.
        if not any(hmac.compare_digest(expected, v) for v in parts.get("v1", [])):
            return "signature mismatch"
        return None

    async def _handle_post(self, request: web.Request) -> web.Response:
        key = request.headers.get(IDEMPOTENCY_KEY)
        record = self._arrive(request, key)
        return await self._tracked(record, self._post(request, record, key))

    async def _tracked(self, record: RequestRecord,
                       handling: Coroutine[Any, Any, web.Response]) -> web.Response:
        """Await a handler; a request cut off by shutdown is recorded as abandoned."""
        try:
            return await handling
        except asyncio.CancelledError:
            record.outcome = "abandoned"
            raise
        finally:
            self._notify()

    async def _post(
        self, request: web.Request, record: RequestRecord, key: str | None
    ) -> web.Response:
        body = await request.read()
        gated = await self._gate(record)
        if gated is not None:
            return gated

        fault = self.faults.popleft() if self.faults else None
        if fault is not None and fault.kind == "status":
            return self._fault_answer(record, fault)
        if fault is not None and fault.kind == "drop_before_commit":
            return self._drop(request, record, "dropped")

        refused = self._authenticate(request, record)
        if refused is not None:
            return refused
        if not key or len(key) > MAX_KEY_LENGTH:
            what = "missing" if not key else f"longer than {MAX_KEY_LENGTH} characters"
            error = _error(
                "invalid_request_error", "idempotency_key_missing", f"{IDEMPOTENCY_KEY} is {what}"
            )
            return self._answer(record, 400, "missing_key", error)
        if self.signing_secret is not None:
            problem = self._signature_problem(request.headers.get(SIGNATURE_HEADER), body)
            if problem is not None:
                error = _error("authentication_error", "invalid_signature", problem)
                return self._answer(record, 401, "bad_signature", error)
        try:
            envelope = json.loads(body)
        except ValueError:
            envelope = None
        if not isinstance(envelope, dict):
            error = _error("invalid_request_error", "invalid_json", "body is not a JSON object")
            return self._answer(record, 400, "bad_request", error)

        delay = fault.seconds if fault is not None and fault.kind == "slow" else 0.0
        self._prune()
        if delay and (key in self._in_progress or key in self._saved):
            await asyncio.sleep(delay)
            delay = 0.0
            self._prune()
        if key in self._in_progress:
            error = _error(
                "idempotency_error",
                "request_in_progress",
                "a request with this key is still being processed",
            )
            return self._answer(record, 409, "in_progress", error)
        saved = self._saved.get(key)
        if saved is not None:
            if saved.body == body:
                return self._answer(
                    record, saved.status, "replayed", saved.response_body, replayed=True
                )
            self.body_mismatches.append(BodyMismatch(self._clock(), key, saved.body, body))
            log.warning("key %s reused with a different body", key)
            error = _error(
                "idempotency_error",
                "idempotency_key_reused",
                "keys can only be reused with the same request body",
            )
            return self._answer(record, 422, "key_reused", error)

        self._in_progress.add(key)
        try:
            if delay:
                await asyncio.sleep(delay)
            response_body = self._commit(key, body, envelope, record.at)
        finally:
            self._in_progress.discard(key)

        if fault is not None and fault.kind == "commit_then_drop":
            return self._drop(request, record, "committed_dropped")
        if fault is not None and fault.kind == "commit_then_status":
            error = _error("api_error", str(fault.code), "injected fault after commit")
            return self._answer(
                record, fault.code, "committed_fault", error, retry_after=fault.retry_after
            )
        return self._answer(record, 201, "committed", response_body)

    def _commit(self, key: str, body: bytes, envelope: Envelope, arrived_at: float) -> bytes:
        """Append the effect and save the response a replay will return."""
        now = self._clock()
        seq = len(self.effects) + 1
        effect = Effect(seq, key, body, envelope, at=now, arrived_at=arrived_at)
        self.effects.append(effect)
        # The resource is the first effect; a duplicate after the TTL does not replace it.
        self._effect_by_key.setdefault(key, effect)
        response_body = json.dumps(self._effect_json(effect, include_envelope=False)).encode()
        self._saved[key] = _Saved(body=body, status=201, response_body=response_body, at=now)
        log.info("committed %s key=%s event=%s", effect.id, key, effect.event_id)
        return response_body

    def _prune(self) -> None:
        """Forget keys older than the TTL (oldest first: the dict is in commit order)."""
        if self.key_ttl_s is None:
            return
        horizon = self._clock() - self.key_ttl_s
        while self._saved:
            oldest = next(iter(self._saved))
            if self._saved[oldest].at > horizon:
                break
            del self._saved[oldest]

    @staticmethod
    def _effect_json(effect: Effect, *, include_envelope: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "object": "event",
            "id": effect.id,
            "idempotency_key": effect.key,
            "event_id": effect.event_id,
            "created_at": _iso(effect.at),
            "body_sha256": hashlib.sha256(effect.body).hexdigest(),
        }
        if include_envelope:
            doc["envelope"] = effect.envelope
        return doc

    async def _handle_lookup(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        record = self._arrive(request, key)
        return await self._tracked(record, self._lookup(request, record, key))

    async def _lookup(self, request: web.Request, record: RequestRecord, key: str) -> web.Response:
        gated = await self._gate(record)
        if gated is not None:
            return gated
        fault = self.lookup_faults.popleft() if self.lookup_faults else None
        if fault is not None:
            if fault.kind in ("status", "commit_then_status"):
                return self._fault_answer(record, fault)
            if fault.kind in ("drop_before_commit", "commit_then_drop"):
                return self._drop(request, record, "dropped")
            await asyncio.sleep(fault.seconds)
        refused = self._authenticate(request, record)
        if refused is not None:
            return refused
        if key in self._in_progress:
            error = _error(
                "idempotency_error",
                "request_in_progress",
                "a request with this key is still being processed",
            )
            return self._answer(record, 409, "in_progress", error)
        effect = self._effect_by_key.get(key)
        if effect is None:
            error = _error("invalid_request_error", "resource_missing", "no effect for this key")
            return self._answer(record, 404, "not_found", error)
        doc = json.dumps(self._effect_json(effect, include_envelope=True)).encode()
        return self._answer(record, 200, "found", doc)


# -- standalone ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agent.standin.cloud",
        description=(
            "Run the tillsync stand-in cloud: an idempotent webhook API (Stripe / IETF "
            "Idempotency-Key semantics) that logs every committed effect. POST events to the "
            "printed URL; GET <url>/<idempotency-key> looks one up. Ctrl-C stops it."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8080, help="TCP port, 0 for any free one (default: %(default)s)"
    )
    parser.add_argument("--path", default="/events", help="webhook path (default: %(default)s)")
    parser.add_argument("--token", help="require 'Authorization: Bearer TOKEN'")
    parser.add_argument("--secret", help="require a valid Tillsync-Signature made with SECRET")
    parser.add_argument(
        "--key-ttl",
        type=float,
        metavar="SECONDS",
        help="forget idempotency keys after SECONDS (Stripe: 86400)",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="delay every answer by SECONDS (default: %(default)s)",
    )
    parser.add_argument(
        "--report",
        metavar="FILE",
        help=(
            "on SIGTERM/SIGINT, write what happened as JSON to FILE: every committed effect "
            "(key, identity, envelope), every request (arrival time, outcome), body mismatches "
            "and Retry-After answers, so a run can be judged after the process is gone"
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    return parser


def report_document(cloud: StandinCloud) -> dict[str, Any]:
    """Everything a checker needs to judge a run, as plain JSON (times are unix seconds).

    A cloud running as a subprocess, e.g. inside a network namespace, cannot be inspected
    live; this is the same view the object gives (``effects``, ``identity_of``,
    ``requests``, ``body_mismatches``, ``retry_after_given``), written once at exit.
    """
    return {
        "effects": [
            {
                "seq": e.seq,
                "key": e.key,
                "identity": cloud.identity_of(e),
                "event_id": e.event_id,
                "envelope": e.envelope,
                "body_sha256": hashlib.sha256(e.body).hexdigest(),
                "at": e.at,
                "arrived_at": e.arrived_at,
            }
            for e in cloud.effects
        ],
        "requests": [
            {
                "at": r.at,
                "method": r.method,
                "path": r.path,
                "key": r.key,
                "status": r.status,
                "outcome": r.outcome,
            }
            for r in cloud.requests
        ],
        "body_mismatches": [
            {
                "at": m.at,
                "key": m.key,
                "original_sha256": hashlib.sha256(m.original_body).hexdigest(),
                "new_sha256": hashlib.sha256(m.new_body).hexdigest(),
            }
            for m in cloud.body_mismatches
        ],
        "retry_after_given": [
            {"asked_at": g.asked_at, "at": g.at, "deadline": g.deadline}
            for g in cloud.retry_after_given
        ],
        "retry_after_violations": [
            {"at": v.at, "not_before": v.not_before, "method": v.method, "path": v.path,
             "key": v.key}
            for v in cloud.retry_after_violations
        ],
        "retry_after_slack_s": cloud.retry_after_slack_s,
    }


def _write_report(path: str, cloud: StandinCloud) -> None:
    # Written to a temporary name and renamed: a reader never sees half a document.
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(report_document(cloud), out)
    os.replace(tmp, path)


async def _serve(args: argparse.Namespace) -> None:
    cloud = StandinCloud(
        path=args.path, token=args.token, signing_secret=args.secret, key_ttl_s=args.key_ttl
    )
    cloud.latency_s = args.latency
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Not available on Windows' proactor loop; there Ctrl-C arrives as KeyboardInterrupt.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    await cloud.start(args.host, args.port)
    try:
        print(cloud.url, flush=True)  # the one line a script or a human waits for
        await stop.wait()
    finally:
        await cloud.stop()
        log.info("stopped after %d effects, %d requests", len(cloud.effects), len(cloud.requests))
        if args.report:
            # After stop: requests cut off by the shutdown are recorded as abandoned.
            _write_report(args.report, cloud)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in cloud until Ctrl-C or SIGTERM."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
