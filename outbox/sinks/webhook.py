"""The generic webhook sink: one signed, idempotent POST per delivery (CONTRACT §6).

Body. The outbox payload for a webhook sink is a JSON object (the agent writes
``{"store_id", "kind", "data"}``). The sink splices the event's immutable fields in front of
it, byte for byte, without re-serialising anything::

    {"id":"<event id>","idempotency_key":"<key>","accepted_at":"<RFC 3339>", <payload members>}

Every input is fixed at append time (id, key and acceptance time are written with the
payload in one transaction), so every attempt, across restarts and upgrades, sends a
byte-identical body: a server that remembers the key can always match it.

Headers: ``Content-Type``, ``Idempotency-Key``, ``User-Agent``, ``Authorization: Bearer``
when a token is set, and ``Tillsync-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret,
"<t>.<body>")>`` when a signing secret is set. TLS is always verified, against the system's
CAs plus those of ``ca_bundle`` when one is set; redirects are not followed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
from yarl import URL

from outbox.classify import Answered, AttemptResult, NoAnswer, Unsendable
from outbox.errors import SinkSetupError
from outbox.models import Delivery
from outbox.sinks.base import SinkPolicy
from outbox.version import package_version

# Enough of an error body to explain a 4xx to an operator; the rest is not read.
BODY_EXCERPT_BYTES = 2048
DEFAULT_TIMEOUT_S = 10.0
# Connecting gets at most this long, so a connect timeout (nothing sent) is told apart
# from a timeout while waiting for the answer (maybe applied).
CONNECT_TIMEOUT_S = 5.0


USER_AGENT = f"tillsync/{package_version()}"


def tls_context(ca_bundle: str | None) -> ssl.SSLContext | bool:
    """Return what a sink's connector verifies TLS with: the system's CAs, plus the bundle's.

    Without a bundle this is ``True``: aiohttp's own verified default context, built once
    when aiohttp is imported; another would hold a second parsed copy of the system's CA
    store (0.7 MB, measured alone). Raises ``OSError`` or ``ssl.SSLError`` for a bundle that
    cannot be read or parsed.
    """
    if ca_bundle is None:
        return True
    # ssl.create_default_context(cafile=...) would trust the bundle *instead of* the system's
    # CAs; config documents it as extra CAs, so both are loaded.
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=ca_bundle)
    return context


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """Where and how to POST."""

    url: str
    token: str | None = None
    signing_secret: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    ca_bundle: str | None = None  # PEM file of CAs trusted besides the system's
    lookup_url: str | None = None  # e.g. "https://api.example.com/events/{idempotency_key}"


@functools.lru_cache(maxsize=1024)  # events appended in one group commit share their time
def accepted_at(created_at: float) -> str:
    """RFC 3339 UTC timestamp of acceptance, as it appears in the envelope."""
    stamp = datetime.fromtimestamp(created_at, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def envelope(delivery: Delivery) -> bytes:
    """Build the request body: immutable event fields spliced before the payload's members."""
    payload = delivery.payload.strip()
    if not payload.startswith(b"{") or not payload.endswith(b"}"):
        raise ValueError("payload is not a JSON object")
    head = b'{"id":"%d","idempotency_key":"%s","accepted_at":"%s"' % (
        delivery.event_id, delivery.idempotency_key.encode(),
        accepted_at(delivery.created_at).encode())
    members = payload[1:].lstrip()
    return head + b"}" if members == b"}" else head + b"," + members


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Compute the ``Tillsync-Signature`` header value for ``body`` at ``timestamp``."""
    mac = hmac.new(secret.encode(), b"%d." % timestamp + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class WebhookSink:
    """POSTs each delivery to one URL over one pooled, TLS-verifying aiohttp session."""

    def __init__(self, name: str, settings: WebhookSettings, policy: SinkPolicy | None = None,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.settings = settings
        self.policy = policy or SinkPolicy()
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        # Built once, not per request: the parsed URL and the headers every POST carries.
        self._url = URL(settings.url)
        self._headers = {"Content-Type": "application/json"}
        if settings.token:
            self._headers["Authorization"] = f"Bearer {settings.token}"

    async def start(self) -> None:
        """Open the pooled session (one per sink, at most ``concurrency`` connections)."""
        if self._session is not None:
            return
        try:
            verify = tls_context(self.settings.ca_bundle)
        except (OSError, ssl.SSLError) as err:
            reason = getattr(err, "strerror", None) or getattr(err, "reason", None) or err
            raise SinkSetupError(f"sink {self.name}: ca_bundle {self.settings.ca_bundle}"
                                 f" cannot be used as CA certificates ({reason})") from err
        connector = aiohttp.TCPConnector(limit=self.policy.concurrency, ssl=verify)
        # The connect timeout must fire before the total one: when both are equal the total
        # one wins, and a host that never answered a SYN was reported "maybe sent" (in
        # doubt, backing off) instead of unreachable (offline, one probe at a time).
        timeout = aiohttp.ClientTimeout(
            total=self.settings.timeout_s,
            connect=min(CONNECT_TIMEOUT_S, self.settings.timeout_s / 2))
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                              headers={"User-Agent": USER_AGENT})

    async def close(self) -> None:
        """Close the session; idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def deliver(self, delivery: Delivery) -> AttemptResult:
        """POST the delivery once and report what happened."""
        try:
            body = envelope(delivery)
        except ValueError as err:
            return Unsendable(str(err))
        headers = self._headers.copy()
        headers["Idempotency-Key"] = delivery.idempotency_key
        if self.settings.signing_secret:
            headers["Tillsync-Signature"] = signature(self.settings.signing_secret,
                                                      int(self._clock()), body)
        return await self._request("POST", self._url, data=body, headers=headers)

    async def lookup(self, delivery: Delivery) -> bool | None:
        """GET ``lookup_url`` for the key: 2xx → took effect, 404 → did not, else unknown."""
        if not self.settings.lookup_url:
            return None
        url = self.settings.lookup_url.format(idempotency_key=delivery.idempotency_key)
        headers = {}
        if self.settings.token:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        result = await self._request("GET", url, headers=headers)
        if isinstance(result, Answered):
            if 200 <= result.status < 300:
                return True
            if result.status == 404:
                return False
        return None

    async def _request(self, method: str, url: str | URL, *, data: bytes | None = None,
                       headers: dict[str, str]) -> AttemptResult:
        session = self._session or await self._open()
        try:
            async with session.request(method, url, data=data, headers=headers,
                                       allow_redirects=False) as resp:
                excerpt = await resp.content.read(BODY_EXCERPT_BYTES)
                # The response's own read-only header view: no copy per request.
                return Answered(resp.status, resp.headers, excerpt.decode("utf-8", "replace"))
        except Exception as err:
            return self._no_answer(err)

    async def _open(self) -> aiohttp.ClientSession:
        await self.start()
        assert self._session is not None
        return self._session

    def _no_answer(self, err: Exception) -> NoAnswer:
        """Report a request that got no HTTP answer; anything unexpected propagates."""
        if isinstance(err, aiohttp.ClientSSLError):
            return NoAnswer("tls", sent=False, detail=_describe(err))
        if isinstance(err, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return NoAnswer("connect", sent=False, detail=_describe(err))
        if isinstance(err, TimeoutError | aiohttp.SocketTimeoutError):
            return NoAnswer("timeout", sent=True,
                            detail=f"no answer within {self.settings.timeout_s:g} s"
                            if isinstance(err, TimeoutError) else _describe(err))
        if isinstance(err, aiohttp.ClientError | OSError | asyncio.IncompleteReadError):
            # The connection broke after the request went out: it may have been applied.
            return NoAnswer("reset", sent=True, detail=_describe(err))
        raise err


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return without_secrets(f"{type(err).__name__}: {text}")[:300]


# scheme://[user-info@]host/path[?query][#fragment]: group 1 the scheme, 2 host and path.
_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/\s@]*@)?([^\s?#'\"]*)(?:[?#][^\s'\"]*)?")


def without_secrets(text: str) -> str:
    """Cut the user-info, query and fragment from every URL in ``text``.

    A sink's URL may carry its credential (``?code=…``, ``user:pass@``), and aiohttp
    quotes the URL in some errors (a connect timeout); error texts reach logs and status.
    """
    return _URL.sub(r"\1\2", text)
