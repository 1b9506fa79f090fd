"""The local HTTP API (CONTRACT §4): terminals post events, head office reads status.

Every request passes two gates before its handler: the ``Host`` check (a page on some web
site must not reach the agent through DNS rebinding) and, except for ``/healthz`` and
``/readyz``, a bearer token compared in constant time. Every error leaves as
``{"error": {"code", "message", "details"}}``; the codes are listed in ``openapi.json``.

An event is answered ``202`` only after the outbox has committed it durably; the same event
again gets ``200`` with the same body; a different event under the same ids gets ``409``.
"The same" is ``canonical.same_content``: an optional field sent as ``null`` or left out is
the same event (see ``_append_event``).

Any valid token (a terminal's or the status token) gets the router's ``404`` for an unknown
path and ``405`` with ``Allow`` for a method the path does not take; a request without a
valid token gets ``401`` on every path but the open probes, known or not (``auth_middleware``).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web

from agent import canonical
from agent.canonical import Accepted, InvalidEvent
from agent.devices import MAX_WEIGHT_WAIT_S, DeviceRequestError, open_drawer, read_weight
from agent.printing import PrintRequestError
from agent.status import device_json
from agent.stream import register as register_stream
from outbox import (
    Appended,
    DedupeConflict,
    DeliveryState,
    NewEvent,
    OutboxError,
    OutboxFull,
)

if TYPE_CHECKING:
    from agent.config import TerminalConfig
    from agent.runtime import Agent

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024
# The whole body must arrive within this (docs/security.md): a till on the LAN sends 256 KiB
# in well under a second, while a client trickling a body byte by byte would otherwise hold
# its connection and handler for ever (aiohttp has no body-read timeout).
BODY_TIMEOUT_S = 15.0
AGENT: web.AppKey[Agent] = web.AppKey("agent")
TERMINAL: web.RequestKey[TerminalConfig | None] = web.RequestKey("terminal")
Role = Literal["terminal", "status", "any"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class ApiError(Exception):
    """An error answer: HTTP status, snake_case code, message, optional details."""

    def __init__(self, status: int, code: str, message: str,
                 details: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers or {}
        # The body was not (all) read: the connection cannot carry another request, so the
        # answer says "Connection: close" rather than invite the client to reuse it.
        self.close = close

    def response(self) -> web.Response:
        """Render as the contract's error body."""
        body = {"error": {"code": self.code, "message": self.message, "details": self.details}}
        response = web.json_response(body, status=self.status, headers=self.headers)
        if self.close:
            response.force_close()
        return response


# -- the application ---------------------------------------------------------------------


def build_app(agent: Agent) -> web.Application:
    """Build the aiohttp application with every route and both gates."""
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[errors_middleware, host_middleware, auth_middleware])
    app[AGENT] = agent
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_post("/v1/transactions", post_transaction)
    app.router.add_post("/v1/inventory-adjustments", post_adjustment)
    app.router.add_post("/v1/print", post_print)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/devices", devices)
    app.router.add_post("/v1/devices/{name}/drawer", device_drawer)
    app.router.add_get("/v1/devices/{name}/weight", device_weight)
    app.router.add_get("/v1/outbox", outbox_list)
    app.router.add_post("/v1/outbox/retry-dead", outbox_retry_dead)
    # Event ids are digits: without the pattern, "GET /v1/outbox/retry-dead" was routed to
    # outbox_show as event "retry-dead" (404) instead of 405 with "Allow: POST".
    app.router.add_get("/v1/outbox/{event_id:[0-9]+}", outbox_show)
    app.router.add_post("/v1/outbox/{event_id:[0-9]+}/retry", outbox_retry)
    app.router.add_post("/v1/keys/rotate", keys_rotate)
    register_stream(app)
    return app


# Who may call what, by route (paths with {placeholders} as routed); anything unlisted needs
# the status token.
ROLES: dict[tuple[str, str], Role] = {
    ("POST", "/v1/transactions"): "terminal",
    ("POST", "/v1/inventory-adjustments"): "terminal",
    ("POST", "/v1/print"): "terminal",
    ("GET", "/v1/events/stream"): "terminal",
    ("GET", "/v1/devices"): "any",
    ("POST", "/v1/devices/{name}/drawer"): "terminal",
    ("GET", "/v1/devices/{name}/weight"): "terminal",
    ("GET", "/openapi.json"): "any",
}


# -- gates --------------------------------------------------------------------------------


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into the contract's JSON error body."""
    try:
        return await handler(request)
    except ApiError as err:
        _count_rejection(request, err.code)
        return err.response()
    except web.HTTPRequestEntityTooLarge:
        _count_rejection(request, "too_large")
        return ApiError(413, "too_large", f"the body is over the limit of {MAX_BODY_BYTES} bytes",
                        close=True).response()
    except web.HTTPMethodNotAllowed as err:
        allowed = ", ".join(sorted(err.allowed_methods))
        return ApiError(405, "method_not_allowed",
                        f"{request.method} is not allowed here; allowed: {allowed}",
                        headers=_allow_header(err)).response()
    except web.HTTPNotFound:
        return ApiError(404, "not_found",
                        "no such endpoint; /openapi.json lists them").response()
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return ApiError(err.status, "http_error", err.reason,
                        headers=_allow_header(err)).response()
    except Exception:
        log.exception("api: unexpected error in %s %s", request.method, request.path)
        return ApiError(500, "internal_error", "internal error; see the agent's log").response()


def _allow_header(err: web.HTTPException) -> dict[str, str]:
    allow = err.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def _count_rejection(request: web.Request, code: str) -> None:
    agent = request.app[AGENT]
    if request.method == "POST" and request.path in ("/v1/transactions",
                                                     "/v1/inventory-adjustments"):
        agent.metrics.event_rejected(code)


@web.middleware
async def host_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a Host that is not this agent's (DNS rebinding from a browser)."""
    if not host_allowed(request):
        raise ApiError(421, "host_not_allowed",
                       f"requests for host {request.host!r} are refused; use the agent's own"
                       " address or add the name to api.allowed_hosts")
    return await handler(request)


def host_allowed(request: web.Request) -> bool:
    """Tell whether the Host header names the listen address, localhost or this machine."""
    host = _strip_port(request.headers.get("Host", ""))
    if not host:
        return False
    agent = request.app[AGENT]
    if host in agent.allowed_hosts:
        return True
    transport = request.transport
    sockname: Any = transport.get_extra_info("sockname") if transport is not None else None
    # The address the client connected to is this machine's by definition.
    return isinstance(sockname, tuple) and _same_address(host, str(sockname[0]))


def _strip_port(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _same_address(host: str, local: str) -> bool:
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(local.split("%")[0])
    except ValueError:
        return False


def own_host_names(listen_host: str, extra: list[str]) -> frozenset[str]:
    """Names and addresses a legitimate request may carry in its Host header."""
    names = {"localhost", "127.0.0.1", "::1", listen_host.lower(), *(h.lower() for h in extra)}
    hostname = socket.gethostname().lower()
    names |= {hostname, f"{hostname}.local"}
    try:
        names |= {str(info[4][0]).lower() for info in socket.getaddrinfo(hostname, None)}
    except OSError:
        pass  # no resolvable name: the connected-to address still counts
    names.discard("0.0.0.0")  # noqa: S104  (a wildcard bind is not a name anyone uses)
    names.discard("::")
    return frozenset(names)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require a bearer token for everything but the open probes.

    The token is checked before the route: a caller without a valid token gets 401 on every
    path, known or not, so it cannot map the API (the list of routes, /openapi.json, itself
    needs a token). A valid token of either kind then gets the router's answer for a path
    or method that does not exist (404, or 405 with ``Allow``), as a caller of an HTTP API
    expects; it reveals nothing that /openapi.json does not already show that token. Only
    an existing route the token may not call is 403.
    """
    if request.path in OPEN_PATHS:
        return await handler(request)
    token = _bearer(request)
    agent = request.app[AGENT]
    terminal = agent.terminal_for(token) if token else None
    is_status = token is not None and hmac.compare_digest(
        token.encode(), agent.status_token.encode())
    if token is None:
        raise ApiError(401, "unauthorized", "missing bearer token",
                       headers={"WWW-Authenticate": 'Bearer realm="tillsync"'})
    if terminal is None and not is_status:
        raise ApiError(401, "unauthorized", "unknown token",
                       headers={"WWW-Authenticate": 'Bearer realm="tillsync"'})
    resource = request.match_info.route.resource
    # No resource: the router found no route for this path and method; its handler raises
    # the 404 or 405 that errors_middleware renders.
    role: Role = ("any" if resource is None
                  else ROLES.get((request.method, resource.canonical), "status"))
    allowed = (role == "any" or (role == "terminal" and terminal is not None)
               or (role == "status" and is_status))
    if not allowed:
        needed = "a terminal token" if role == "terminal" else "the status token"
        raise ApiError(403, "forbidden", f"this endpoint needs {needed}")
    request[TERMINAL] = terminal
    return await handler(request)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


# -- probes and documents ------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """Answer while the process serves."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the outbox is open and writable."""
    reasons = await request.app[AGENT].not_ready_reasons()
    if reasons:
        return web.json_response({"status": "not_ready", "reasons": reasons}, status=503)
    return web.json_response({"status": "ready"})


async def openapi(request: web.Request) -> web.Response:
    """Serve the OpenAPI document kept in the repository."""
    return web.Response(body=openapi_document(), content_type="application/json")


def openapi_document() -> bytes:
    """Return the bytes of ``agent/openapi.json``."""
    return resources.files("agent").joinpath("openapi.json").read_bytes()


async def status(request: web.Request) -> web.Response:
    """CONTRACT §7 status."""
    return web.json_response(await request.app[AGENT].status())


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    agent = request.app[AGENT]
    agent.metrics.update(await agent.status())
    body, content_type = agent.metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def devices(request: web.Request) -> web.Response:
    """List configured devices with their state."""
    # Devices only: tills may poll this, and the full status also reads the outbox's counters.
    devices = request.app[AGENT].device_statuses()
    return web.json_response({"devices": [device_json(d) for d in devices]})


def _device_error(err: DeviceRequestError) -> ApiError:
    headers = {"Retry-After": "2"} if err.status == 503 else None
    return ApiError(err.status, err.code, err.message, err.details, headers=headers)


async def device_drawer(request: web.Request) -> web.Response:
    """Open a printer's cash drawer now, or fail with the printer's state; never queued."""
    agent = request.app[AGENT]
    name = request.match_info["name"]
    terminal = request[TERMINAL]
    who = terminal.id if terminal is not None else "?"

    def till_waiting() -> bool:
        # The till hung up (its own timeout): a drawer opening now would surprise everyone.
        transport = request.transport
        return transport is not None and not transport.is_closing()

    try:
        await open_drawer(agent.devices, name, wanted=till_waiting)
    except DeviceRequestError as err:
        log.info("drawer of %s not opened for terminal %s: %s", name, who, err.message)
        raise _device_error(err) from None
    log.info("drawer of %s opened for terminal %s", name, who)
    return web.json_response({"status": "opened"})


async def device_weight(request: web.Request) -> web.Response:
    """Return a stable weight from a scale, waiting up to ``wait_s`` for it to settle."""
    raw = request.query.get("wait_s", "0")
    try:
        wait_s = float(raw)
    except ValueError:
        wait_s = -1.0
    if not 0 <= wait_s <= MAX_WEIGHT_WAIT_S:  # also refuses nan
        raise ApiError(422, "validation_failed", "bad wait_s",
                       [{"field": "wait_s", "code": "out_of_range",
                         "message": f"must be a number of seconds from 0 to "
                                    f"{MAX_WEIGHT_WAIT_S:g}"}])
    try:
        weight = await read_weight(request.app[AGENT].devices, request.match_info["name"],
                                   wait_s=wait_s)
    except DeviceRequestError as err:
        raise _device_error(err) from None
    return web.json_response(weight.to_json())


# -- events --------------------------------------------------------------------------------


async def post_transaction(request: web.Request) -> web.Response:
    """Accept a sale, refund or void."""
    return await _ingest(request, canonical.parse_transaction)


async def post_adjustment(request: web.Request) -> web.Response:
    """Accept an inventory adjustment."""
    return await _ingest(request, canonical.parse_adjustment)


async def _ingest(request: web.Request, parse: Callable[[bytes], Accepted]) -> web.Response:
    agent = request.app[AGENT]
    terminal = request[TERMINAL]
    assert terminal is not None  # the auth gate admits only terminal tokens here
    body = await read_body(request)
    try:
        accepted = parse(body)
    except InvalidEvent as err:
        raise ApiError(422, err.code, err.message,
                       [{"field": p.field, "code": p.code, "message": p.message}
                        for p in err.problems]) from None
    if accepted.terminal_id != terminal.id:
        message, details = canonical.terminal_mismatch(terminal.id, accepted.terminal_id)
        raise ApiError(403, "terminal_mismatch", message, details)
    store_id = agent.config.store.id
    event = NewEvent(
        stream=accepted.terminal_id, kind=accepted.kind,
        payload=canonical.outbox_payload(store_id, accepted),
        sinks=tuple(agent.config.sinks_for(accepted.kind)),
        idempotency_key=canonical.idempotency_key(store_id, accepted.kind,
                                                  accepted.terminal_id, accepted.object_id),
        dedupe_key=canonical.dedupe_key(accepted.kind, accepted.terminal_id,
                                        accepted.object_id))
    try:
        appended = await _append_event(agent, event)
    except DedupeConflict as err:
        what, correction = CONFLICT_WORDING[accepted.kind]
        raise ApiError(409, "conflict",
                       f"{what} {accepted.object_id} of terminal {accepted.terminal_id} was"
                       f" already accepted (event {err.event_id}) with different content;"
                       f" {correction}") from None
    except OutboxError as err:
        raise _outbox_refusal(agent, err, "events") from None
    agent.note_accepted()
    if appended.created:
        agent.metrics.event_received(accepted.kind)
    answer = {"event_id": str(appended.event_id), "idempotency_key": appended.idempotency_key,
              "status": "queued", "sinks": list(appended.sinks)}
    return web.json_response(answer, status=202 if appended.created else 200)


# What a 409 calls the event, and how to correct one: a sale is voided and posted anew, a
# stock change is corrected by another adjustment.
CONFLICT_WORDING = {
    "transaction": ("transaction", "a correction needs a new transaction_id (void this one"
                                   " and post the corrected transaction)"),
    "inventory_adjustment": ("inventory adjustment", "a correction needs a new adjustment_id"
                                                     " (post another adjustment for the"
                                                     " difference)"),
}


async def _append_event(agent: Agent, event: NewEvent) -> Appended:
    """Append an event; a resend that differs only in null-vs-absent fields is the original.

    The outbox dedupes on a keyed fingerprint of the payload bytes, so it takes a body that
    leaves out ``"original_transaction_id": null`` for different content. On its
    ``DedupeConflict`` the stored payload is read back (decrypted) and compared with
    ``canonical.same_content``; if it is the same event, the stored bytes are appended again,
    which the fingerprint matches, so the outbox answers with the original event exactly as
    for a byte-identical resend (``created`` False, same id, key and sinks). The stored
    payload stays what the terminal first sent (CONTRACT §6), and the fingerprints in the
    database are untouched, so events accepted by earlier versions dedupe the same way.
    Once the payload has been released (``outbox.retention_days`` after delivery) or
    quarantined only the fingerprint is left: such a resend must then match byte for byte
    (in canonical form), and a null-vs-absent difference is a 409 again.
    """
    try:
        return await agent.store.append(event)
    except DedupeConflict as conflict:
        record = await agent.store.read(conflict.event_id)
        if (record is None or record.payload is None or record.dedupe_key != event.dedupe_key
                or not canonical.same_content(record.payload, event.payload)):
            raise
        # Should the event be forgotten by the purge in between, this appends the first
        # send's bytes as a new event: the same content, as the terminal's resend is.
        return await agent.store.append(replace(event, payload=record.payload))


async def read_body(request: web.Request) -> bytes:
    """Read the body (at most ``MAX_BODY_BYTES``); 408 if it is not in within BODY_TIMEOUT_S."""
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            return await request.read()
    except TimeoutError:
        raise ApiError(408, "request_timeout",
                       f"the body did not arrive within {BODY_TIMEOUT_S:g} s", close=True) from None
    except web.RequestPayloadError as err:
        # A body that cannot be decoded (a broken gzip or deflate stream, a bad chunk) was
        # answered 500 "internal error" before; it is the client's body that is bad.
        reason = " ".join(str(err).split())
        raise ApiError(422, "invalid_json", f"body: cannot be read: {reason}",
                       [{"field": "", "code": "unreadable_body",
                         "message": f"cannot be read: {reason}"}], close=True) from None


def _outbox_refusal(agent: Agent, err: OutboxError, what: str) -> ApiError:
    """Turn an append the outbox refused into 507 (full) or 503 (cannot write now)."""
    if isinstance(err, OutboxFull):
        agent.note_full(err)
        return ApiError(507, "outbox_full",
                        "the outbox is full; nothing accepted was dropped. Retry later.",
                        headers={"Retry-After": "30"})
    return ApiError(503, "outbox_unavailable", f"the outbox cannot accept {what}: {err}",
                    headers={"Retry-After": "5"})


async def post_print(request: web.Request) -> web.Response:
    """Queue a print job on a named printer (agent.printing); 202 once durably queued."""
    agent = request.app[AGENT]
    terminal = request[TERMINAL]
    assert terminal is not None  # the auth gate admits only terminal tokens here
    try:
        job_id, appended = await agent.queue_print(terminal.id, await read_body(request))
    except PrintRequestError as err:
        raise ApiError(err.status, err.code, err.message, err.details) from None
    except OutboxError as err:
        raise _outbox_refusal(agent, err, "jobs") from None
    agent.note_accepted()
    answer = {"job_id": job_id, "status": "queued", "event_id": str(appended.event_id)}
    return web.json_response(answer, status=202 if appended.created else 200)


# -- admin ---------------------------------------------------------------------------------

LIST_STATES = [s.value for s in DeliveryState]


async def outbox_list(request: web.Request) -> web.Response:
    """Deliveries in event order, filtered by state and sink, paged by event id."""
    query = request.query
    state = query.get("state")
    if state is not None and state not in LIST_STATES:
        raise ApiError(422, "validation_failed", "unknown state",
                       [{"field": "state", "code": "invalid_choice",
                         "message": f"must be one of {', '.join(LIST_STATES)}"}])
    after = _int_param(query, "after", 0, 0, 2**62)
    limit = _int_param(query, "limit", 100, 1, 1000)
    rows = await request.app[AGENT].store.list_deliveries(
        state=DeliveryState(state) if state else None, sink=query.get("sink"),
        after_event_id=after, limit=limit)
    items = [_delivery_json(asdict(r)) for r in rows]
    next_after = rows[-1].event_id if len(rows) == limit else None
    return web.json_response({"deliveries": items, "next_after": next_after})


def _int_param(query: Any, name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(422, "validation_failed", f"bad {name}",
                       [{"field": name, "code": "out_of_range",
                         "message": f"must be an integer from {low} to {high}"}])
    return value


def _delivery_json(row: dict[str, Any]) -> dict[str, Any]:
    row["event_id"] = str(row["event_id"])
    row["state"] = str(row["state"])
    return row


async def outbox_show(request: web.Request) -> web.Response:
    """One event, its payload decrypted (only here), and its deliveries."""
    event_id = _event_id(request)
    record = await request.app[AGENT].store.read(event_id)
    if record is None:
        raise ApiError(404, "not_found", f"no event {event_id}")
    body = asdict(record)
    payload = body.pop("payload")
    body["event_id"] = str(body.pop("event_id"))
    body["payload"] = _decode_payload(payload)
    body["deliveries"] = [_delivery_json(d) for d in body["deliveries"]]
    return web.json_response(body)


def _decode_payload(payload: bytes | None) -> Any:
    if payload is None:
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return {"undecodable": payload.hex()}


def _event_id(request: web.Request) -> int:
    raw = request.match_info["event_id"]
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:  # "¹" is a digit to str
        raise ApiError(404, "not_found", f"no event {raw!r}")
    return int(raw)


async def outbox_retry(request: web.Request) -> web.Response:
    """Requeue one event's dead deliveries and re-check paused sinks."""
    event_id = _event_id(request)
    agent = request.app[AGENT]
    if await agent.store.read(event_id) is None:
        raise ApiError(404, "not_found", f"no event {event_id}")
    count = await agent.store.requeue_dead(event_id=event_id)
    await agent.recheck_sinks()
    return web.json_response({"requeued": count})


async def outbox_retry_dead(request: web.Request) -> web.Response:
    """Requeue every dead delivery and re-check paused sinks."""
    agent = request.app[AGENT]
    count = await agent.store.requeue_dead()
    await agent.recheck_sinks()
    return web.json_response({"requeued": count})


async def keys_rotate(request: web.Request) -> web.Response:
    """Seal new records with a new data key; old keys stay while any record needs them."""
    try:
        key_id = await request.app[AGENT].store.rotate_key()
    except OutboxError as err:
        raise ApiError(503, "outbox_unavailable", f"cannot rotate the data key: {err}",
                       headers={"Retry-After": "5"}) from None
    return web.json_response({"key_id": key_id})
