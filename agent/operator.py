"""Operator commands: ``tillsync status``, ``tillsync outbox …`` and ``tillsync keys rotate``.

Each command works through the running agent's local API (the status token), and the outbox
and key commands can instead work on the database directly with ``--config``. The outbox has
a single writer, so the direct path first takes the agent's exclusive lock on
``<outbox.path>.lock`` and refuses while the agent holds it. Both paths print the same
tables and the same JSON, so a script does not care which one ran.

Every command returns its exit status; a failure is an ``OperatorError`` whose message is
one line (what, why, what to do), which the CLI prints before exiting 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table
from rich.text import Text

from agent.config import load_config
from agent.lockfile import LockHeld, exclusive, lock_path
from outbox import DeliveryState, Outbox
from outbox.models import DeliveryInfo, EventRecord, OutboxStats

REQUEST_TIMEOUT_S = 15.0
# The table of `outbox list` stops here; --json carries ``next_after`` to page on.
LIST_LIMIT = 1000
PAGE_SIZE = 500  # the API answers at most 1000 per request
ACTIONS = ("list", "show", "retry", "stats")

STATUS_STYLE = {"ok": "bold green", "degraded": "bold yellow", "failing": "bold red"}
STATE_STYLE = {
    "online": "green", "backing_off": "yellow", "offline": "red", "paused": "red",
    "connected": "green", "disconnected": "red", "error": "red", "disabled": "dim",
    "pending": "cyan", "in_flight": "cyan", "in_doubt": "yellow", "delivered": "green",
    "dead": "red", "quarantined": "magenta",
}
NONE = "–"


class OperatorError(Exception):
    """A command failed; the message is one line: what, why, what to do."""


# -- tillsync status ----------------------------------------------------------------------


async def status_command(url: str, token: str, *, as_json: bool, console: Console) -> int:
    """Show a running agent's ``/v1/status``; 0 whenever the agent answered."""
    async with AgentClient(url, token) as client:
        doc = require_status(await client.get("/v1/status"), client.url)
    if as_json:
        _print_json(console, doc)
    else:
        render_status(doc, console)
    return 0


# The blocks every tillsync status has (CONTRACT §7) and their JSON types.
STATUS_SHAPE: dict[str, type] = {"status": str, "outbox": dict, "sinks": list}


def require_status(doc: Any, url: str) -> dict[str, Any]:
    """Return ``doc`` if it is a tillsync status document, else fail naming the URL.

    Another service answering 200 with JSON must not pass for an agent with nothing to
    report (a table of dashes, exit 0).
    """
    missing = [key for key, kind in STATUS_SHAPE.items()
               if not isinstance(doc, dict) or not isinstance(doc.get(key), kind)]
    if missing:
        raise OperatorError(f"{url}/v1/status answered, but not with a tillsync status (no"
                            f" {', '.join(repr(key) for key in missing)} in it) — check that"
                            " --url points at the tillsync agent")
    return dict(doc)


def render_status(doc: Mapping[str, Any], console: Console, *, now: float | None = None) -> None:
    """Print the status document as tables."""
    now = time.time() if now is None else now
    verdict = str(doc.get("status", "unknown"))
    outbox = doc.get("outbox") or {}
    disk = doc.get("disk") or {}

    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("status", Text(verdict, style=STATUS_STYLE.get(verdict, "bold")))
    summary.add_row("store", _text(doc.get("store_id")))
    summary.add_row("version", _text(doc.get("version")))
    summary.add_row("uptime", Text(humanize_seconds(doc.get("uptime_s"))))
    summary.add_row("outbox", Text(
        f"pending {_count(outbox.get('pending'))} · in doubt {_count(outbox.get('in_doubt'))}"
        f" · dead {_count(outbox.get('dead'))}"
        + (f" · quarantined {outbox['quarantined']}" if outbox.get("quarantined") else "")))
    summary.add_row("oldest pending", Text(humanize_seconds(outbox.get("oldest_pending_age_s"))))
    summary.add_row("outbox size", Text(_size_of(outbox.get("bytes"),
                                                 outbox.get("capacity_bytes"))))
    summary.add_row("disk free", Text(humanize_bytes(disk.get("free_bytes"))))
    console.print(summary)

    reasons = doc.get("reasons") or []
    if verdict != "ok" and reasons:
        console.print()
        console.print(Text("why not ok:", style=STATUS_STYLE.get(verdict, "bold")))
        for reason in reasons:
            console.print(Text(f"  • {reason}"))

    sinks = doc.get("sinks") or []
    if sinks:
        table = Table(title="sinks", title_justify="left", expand=False)
        for column in ("sink", "state", "pending", "dead", "last success", "last error",
                       "next attempt", "drain ETA"):
            table.add_column(column, justify="right" if column in ("pending", "dead") else "left",
                             overflow="fold")
        for sink in sinks:
            table.add_row(_text(sink.get("name")), _state(sink.get("state")),
                          _count(sink.get("pending")), _count(sink.get("dead")),
                          Text(ago(sink.get("last_success_at"), now)),
                          _text(sink.get("last_error")),
                          Text(until(sink.get("next_attempt_at"), now)),
                          Text(_eta(sink)))
        console.print()
        console.print(table)

    devices = doc.get("devices") or []
    if devices:
        table = Table(title="devices", title_justify="left")
        for column in ("device", "kind", "state", "detail", "since"):
            table.add_column(column, overflow="fold")
        for device in devices:
            table.add_row(_text(device.get("name")), _text(device.get("kind")),
                          _state(device.get("state")), _text(device.get("detail")),
                          Text(ago(device.get("since"), now)))
        console.print()
        console.print(table)


def _eta(sink: Mapping[str, Any]) -> str:
    eta = sink.get("drain_eta_s")
    if eta == 0:
        return "drained"
    if eta is None:
        owed = (sink.get("pending") or 0) + (sink.get("in_doubt") or 0)
        return "unknown" if owed else NONE
    return humanize_seconds(eta)


def _size_of(used: int | None, capacity: int | None) -> str:
    if capacity:
        return f"{humanize_bytes(used)} of {humanize_bytes(capacity)}"
    return humanize_bytes(used)


# -- tillsync outbox ----------------------------------------------------------------------


async def outbox_command(action: str, *, url: str | None, token: str | None,
                         config_path: Path | None, state: str | None, event_id: int | None,
                         all_dead: bool, as_json: bool, console: Console,
                         limit: int = LIST_LIMIT) -> int:
    """Run ``outbox list|show|retry|stats`` through the agent's API or on the database."""
    if action not in ACTIONS:
        raise OperatorError(f"unknown outbox action {action!r}: use one of {', '.join(ACTIONS)}")
    if state is not None and state not in {s.value for s in DeliveryState}:
        raise OperatorError(f"unknown state {state!r}: use one of "
                            f"{', '.join(s.value for s in DeliveryState)}")
    if action == "show" and event_id is None:
        raise OperatorError("outbox show needs an event id: tillsync outbox show ID")
    if action == "retry" and (event_id is None) == (not all_dead):
        raise OperatorError("outbox retry needs either an event id or --all-dead:"
                            " tillsync outbox retry ID | --all-dead")
    if config_path is not None:
        backend: Backend = await DirectBackend.open(config_path)
    else:
        backend = ApiBackend(*_require_remote(url, token))
    try:
        return await _run_outbox(backend, action, state=state, event_id=event_id,
                                 as_json=as_json, console=console, limit=limit)
    finally:
        await backend.close()


async def _run_outbox(backend: Backend, action: str, *, state: str | None,
                      event_id: int | None, as_json: bool, console: Console,
                      limit: int) -> int:
    if action == "list":
        listing = await backend.list(state=state, limit=limit)
        if as_json:
            _print_json(console, listing)
        else:
            render_deliveries(listing, console, state=state)
            if state == "pending" and not listing.get("deliveries"):
                await _hint_in_doubt(backend, console)
    elif action == "show":
        assert event_id is not None
        event = await backend.show(event_id)
        if as_json:
            _print_json(console, event)
        else:
            render_event(event, console)
    elif action == "retry":
        requeued = await backend.retry(event_id)
        if as_json:
            _print_json(console, {"requeued": requeued})
        else:
            what = f"of event {event_id}" if event_id is not None else "in the outbox"
            noun, them = ("delivery", "it") if requeued == 1 else ("deliveries", "them")
            when = "now" if isinstance(backend, ApiBackend) else "when it starts"
            console.print(Text(f"requeued {requeued} dead {noun} {what}"
                               + (f"; the agent sends {them} again {when}" if requeued else "")),
                          soft_wrap=True)
    else:
        stats = await backend.stats()
        if as_json:
            _print_json(console, stats)
        else:
            render_stats(stats, console)
    return 0


async def _hint_in_doubt(backend: Backend, console: Console) -> None:
    # "No pending" must not read as "nothing owed": in-doubt deliveries are owed too.
    in_doubt = ((await backend.stats()).get("outbox") or {}).get("in_doubt")
    if in_doubt:
        console.print(Text(f"{in_doubt} in doubt, owed as well (an attempt may have reached"
                           " the sink unanswered): tillsync outbox list --state in_doubt"),
                      soft_wrap=True)


def render_deliveries(listing: Mapping[str, Any], console: Console, *,
                      state: str | None = None) -> None:
    """Print deliveries as a table (event id, sink, state, stream, kind, …)."""
    rows = listing.get("deliveries") or []
    if not rows:
        console.print(Text(f"no {state} deliveries" if state else "no deliveries"))
        return
    table = Table()
    for column in ("event", "sink", "state", "stream", "kind", "attempts", "created",
                   "last error"):
        table.add_column(column, justify="right" if column in ("event", "attempts") else "left",
                         overflow="fold")
    for row in rows:
        table.add_row(_text(row.get("event_id")), _text(row.get("sink")),
                      _state(row.get("state")), _text(row.get("stream")),
                      _text(row.get("kind")), _text(row.get("attempts")),
                      Text(local_time(row.get("created_at"))), _text(row.get("last_error")))
    console.print(table)
    if listing.get("next_after") is not None:
        after = listing["next_after"]
        console.print(Text(f"first {len(rows)} shown, more after event {after}: narrow with"
                           f" --state, or page with GET /v1/outbox?after={after}"),
                      soft_wrap=True)


def render_event(event: Mapping[str, Any], console: Console) -> None:
    """Print one event: its header, its decrypted payload as JSON, its deliveries."""
    header = Table(show_header=False, box=None, pad_edge=False)
    header.add_column(style="bold")
    header.add_column(overflow="fold")
    header.add_row("event", _text(event.get("event_id")))
    header.add_row("stream", _text(event.get("stream")))
    header.add_row("kind", _text(event.get("kind")))
    header.add_row("idempotency key", _text(event.get("idempotency_key")))
    header.add_row("created", Text(local_time(event.get("created_at"))))
    if event.get("expires_at") is not None:
        header.add_row("expires", Text(local_time(event["expires_at"])))
    header.add_row("size", Text(humanize_bytes(event.get("size"))))
    console.print(header)
    console.print()
    if event.get("quarantined"):
        console.print(Text("payload: quarantined (its record failed authentication; it is"
                           " never sent)", style="magenta"))
    elif event.get("purged") or event.get("payload") is None:
        console.print(Text("payload: released (delivered everywhere and past the retention)",
                           style="dim"))
    else:
        console.print(Text("payload:", style="bold"))
        console.print_json(json.dumps(event["payload"], ensure_ascii=False))
    deliveries = event.get("deliveries") or []
    if deliveries:
        table = Table(title="deliveries", title_justify="left")
        for column in ("sink", "state", "attempts", "next attempt", "updated", "last error"):
            table.add_column(column, overflow="fold")
        now = time.time()
        for row in deliveries:
            state = row.get("state")
            due = row.get("next_attempt_at") if state in ("pending", "in_doubt") else None
            table.add_row(_text(row.get("sink")), _state(state), _text(row.get("attempts")),
                          Text(until(due, now)), Text(local_time(row.get("updated_at"))),
                          _text(row.get("last_error")))
        console.print()
        console.print(table)


def render_stats(stats: Mapping[str, Any], console: Console) -> None:
    """Print the outbox totals and one row per sink."""
    outbox = stats.get("outbox") or {}
    totals = (f"outbox: pending {_count(outbox.get('pending'))} · in doubt"
              f" {_count(outbox.get('in_doubt'))} · dead {_count(outbox.get('dead'))} ·"
              f" quarantined {_count(outbox.get('quarantined'))} · oldest pending"
              f" {humanize_seconds(outbox.get('oldest_pending_age_s'))} · size"
              f" {_size_of(outbox.get('bytes'), outbox.get('capacity_bytes'))}")
    console.print(Text(totals), soft_wrap=True)
    sinks = stats.get("sinks") or []
    if not sinks:
        return
    table = Table()
    for column in ("sink", "state", "pending", "in doubt", "dead", "oldest pending",
                   "drain ETA"):
        table.add_column(column, justify="right" if column in ("pending", "in doubt", "dead")
                         else "left")
    for sink in sinks:
        table.add_row(_text(sink.get("name")), _state(sink.get("state")),
                      _count(sink.get("pending")), _count(sink.get("in_doubt")),
                      _count(sink.get("dead")),
                      Text(humanize_seconds(sink.get("oldest_pending_age_s"))),
                      Text(_eta(sink) if "drain_eta_s" in sink else NONE))
    console.print(table)


# -- tillsync keys rotate -----------------------------------------------------------------


async def keys_rotate_command(*, url: str | None, token: str | None, config_path: Path | None,
                              console: Console) -> int:
    """Start sealing new records with a new data key; prints its id."""
    if config_path is not None:
        backend: Backend = await DirectBackend.open(config_path)
    else:
        backend = ApiBackend(*_require_remote(url, token))
    try:
        key_id = await backend.rotate_key()
    finally:
        await backend.close()
    console.print(Text(f"data key {key_id} now seals new records; older keys stay until no"
                       " record needs them"), soft_wrap=True)
    return 0


# -- the two ways in ----------------------------------------------------------------------


class Backend:
    """What the outbox and key commands need, through the API or on the database."""

    async def list(self, *, state: str | None, limit: int) -> dict[str, Any]:
        """Deliveries in event order: ``{"deliveries": [...], "next_after": id | None}``."""
        raise NotImplementedError

    async def show(self, event_id: int) -> dict[str, Any]:
        """One event with its decrypted payload and deliveries."""
        raise NotImplementedError

    async def retry(self, event_id: int | None) -> int:
        """Requeue the dead deliveries of one event (or all); returns how many."""
        raise NotImplementedError

    async def stats(self) -> dict[str, Any]:
        """``{"outbox": {...}, "sinks": [...]}``."""
        raise NotImplementedError

    async def rotate_key(self) -> int:
        """Rotate the data key; returns the new key id."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release what the backend holds."""


class ApiBackend(Backend):
    """Through the running agent's admin API."""

    def __init__(self, url: str, token: str) -> None:
        self.client = AgentClient(url, token)

    async def list(self, *, state: str | None, limit: int) -> dict[str, Any]:
        """Page through ``GET /v1/outbox`` up to ``limit`` rows."""
        rows: list[dict[str, Any]] = []
        after = 0
        while len(rows) < limit:
            params = {"after": str(after), "limit": str(min(PAGE_SIZE, limit - len(rows)))}
            if state:
                params["state"] = state
            page = await self.client.get("/v1/outbox", params=params)
            rows.extend(page.get("deliveries") or [])
            if page.get("next_after") is None:
                return {"deliveries": rows, "next_after": None}
            after = int(page["next_after"])
        return {"deliveries": rows, "next_after": after}

    async def show(self, event_id: int) -> dict[str, Any]:
        """``GET /v1/outbox/{id}``."""
        event: dict[str, Any] = await self.client.get(f"/v1/outbox/{event_id}")
        return event

    async def retry(self, event_id: int | None) -> int:
        """``POST /v1/outbox/{id}/retry`` or ``/v1/outbox/retry-dead``."""
        path = "/v1/outbox/retry-dead" if event_id is None else f"/v1/outbox/{event_id}/retry"
        return int((await self.client.post(path))["requeued"])

    async def stats(self) -> dict[str, Any]:
        """Return the outbox and sinks blocks of ``/v1/status``."""
        doc = require_status(await self.client.get("/v1/status"), self.client.url)
        return {"outbox": doc.get("outbox"), "sinks": doc.get("sinks")}

    async def rotate_key(self) -> int:
        """``POST /v1/keys/rotate``."""
        return int((await self.client.post("/v1/keys/rotate"))["key_id"])

    async def close(self) -> None:
        """Close the HTTP session."""
        await self.client.close()


class DirectBackend(Backend):
    """On the database, holding the outbox lock so the agent cannot start meanwhile."""

    def __init__(self, store: Outbox, sinks: list[str], lock: contextlib.ExitStack) -> None:
        self.store = store
        self.sinks = sinks
        self._lock = lock

    @classmethod
    async def open(cls, config_path: Path) -> DirectBackend:
        """Load the config, take the outbox lock and open the store (refused while running)."""
        config = load_config(config_path)
        cfg = config.outbox
        db = Path(cfg.path)
        if not _database_present(db):
            raise OperatorError(f"no outbox database at {db}: the agent creates it on its first"
                                f" start — check outbox.path in {config_path}")
        lock = contextlib.ExitStack()
        try:
            lock.enter_context(exclusive(db))
        except LockHeld:
            raise OperatorError(f"the agent is running (it holds {lock_path(db)}); drop"
                                " --config to go through its API") from None
        except PermissionError as err:
            raise OperatorError(f"cannot take the outbox lock {lock_path(db)}: {err.strerror}"
                                " — run as the agent's service user") from None
        from agent.printing import tracks_sends  # its recovery must match the agent's

        try:
            store = await Outbox.open(db, cfg.key_file, durability=cfg.durability,
                                      capacity_bytes=cfg.capacity_bytes,
                                      tracks_sends=tracks_sends)
        except BaseException:
            lock.close()
            raise
        return cls(store, [s.name for s in config.sinks], lock)

    async def close(self) -> None:
        """Close the store, then let go of the lock (in that order: one writer at a time)."""
        try:
            await self.store.close()
        finally:
            self._lock.close()

    async def list(self, *, state: str | None, limit: int) -> dict[str, Any]:
        """Read deliveries from the store, ``limit`` at most."""
        rows = await self.store.list_deliveries(
            state=DeliveryState(state) if state else None, limit=limit)
        full = len(rows) == limit
        # Peek one further: a full page says "more" only if there is more.
        if full and not await self.store.list_deliveries(
                state=DeliveryState(state) if state else None,
                after_event_id=rows[-1].event_id, limit=1):
            full = False
        return {"deliveries": [delivery_json(r) for r in rows],
                "next_after": rows[-1].event_id if full else None}

    async def show(self, event_id: int) -> dict[str, Any]:
        """Read one event, decrypted."""
        record = await self.store.read(event_id)
        if record is None:
            raise OperatorError(f"no event {event_id} in the outbox: list them with"
                                " `tillsync outbox list`")
        return event_json(record)

    async def retry(self, event_id: int | None) -> int:
        """Requeue dead deliveries in the store."""
        if event_id is not None and await self.store.read(event_id) is None:
            raise OperatorError(f"no event {event_id} in the outbox: list them with"
                                " `tillsync outbox list`")
        return await self.store.requeue_dead(event_id=event_id)

    async def stats(self) -> dict[str, Any]:
        """Counters from the store; sink states are only known to a running agent."""
        return stats_json(await self.store.stats(), self.sinks)

    async def rotate_key(self) -> int:
        """Rotate in the store."""
        return await self.store.rotate_key()


def _database_present(db: Path) -> bool:
    # An empty file is what a crash during the first open leaves; Outbox.open treats it as new.
    try:
        return db.stat().st_size > 0
    except OSError:
        return False


def _require_remote(url: str | None, token: str | None) -> tuple[str, str]:
    if not url:
        raise OperatorError("no agent URL: pass --url (e.g. http://127.0.0.1:8765), or"
                            " --config to work on the database directly")
    if not token:
        raise OperatorError("no status token: pass --token or set $TILLSYNC_STATUS_TOKEN"
                            " (api.status_token in agent.toml)")
    return url, token


# -- the JSON both paths print ------------------------------------------------------------


def delivery_json(info: DeliveryInfo) -> dict[str, Any]:
    """Render a delivery as the admin API does (event id as a string)."""
    row = asdict(info)
    row["event_id"] = str(info.event_id)
    row["state"] = str(info.state)
    return row


def event_json(record: EventRecord) -> dict[str, Any]:
    """Render an event as ``GET /v1/outbox/{id}`` does: payload decoded, deliveries listed."""
    body = asdict(record)
    payload = body.pop("payload")
    body["event_id"] = str(body.pop("event_id"))
    try:
        body["payload"] = None if payload is None else json.loads(payload)
    except ValueError:
        body["payload"] = {"undecodable": payload.hex()}
    body["deliveries"] = [delivery_json(d) for d in record.deliveries]
    return body


def stats_json(stats: OutboxStats, configured: Iterable[str]) -> dict[str, Any]:
    """Build the ``outbox`` and ``sinks`` blocks of status from the store alone."""
    names = list(dict.fromkeys([*configured, *stats.sinks]))
    sinks = []
    for name in names:
        s = stats.sinks.get(name)
        sinks.append({
            "name": name, "state": None,  # only a running agent knows
            "pending": s.pending if s else 0, "in_doubt": s.in_doubt if s else 0,
            "dead": s.dead if s else 0, "quarantined": s.quarantined if s else 0,
            "bytes": s.bytes if s else 0,
            "oldest_pending_age_s": _round(s.oldest_pending_age_s) if s else None,
        })
    return {
        "outbox": {
            "pending": stats.pending, "in_doubt": stats.in_doubt, "dead": stats.dead,
            "oldest_pending_age_s": _round(stats.oldest_pending_age_s), "bytes": stats.bytes,
            "capacity_bytes": stats.capacity_bytes, "quarantined": stats.quarantined,
        },
        "sinks": sinks,
    }


def _round(seconds: float | None) -> float | None:
    return round(seconds, 3) if seconds is not None else None


# -- talking to the agent -----------------------------------------------------------------


class AgentClient:
    """A small client of the agent's API that turns every failure into an OperatorError."""

    def __init__(self, url: str, token: str, *, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        # "127.0.0.1:8765" is how people type it; aiohttp needs the scheme.
        self.url = (url if "://" in url else f"http://{url}").rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session; idempotent."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def get(self, path: str, *, params: Mapping[str, str] | None = None) -> Any:
        """GET ``path`` and return its JSON."""
        return await self._request("GET", path, params=params)

    async def post(self, path: str) -> Any:
        """POST to ``path`` (no body) and return its JSON."""
        return await self._request("POST", path)

    async def _request(self, method: str, path: str, *,
                       params: Mapping[str, str] | None = None) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        try:
            async with self._session.request(method, self.url + path, params=params,
                                             headers=headers, allow_redirects=False) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            raise OperatorError(f"cannot reach the agent at {self.url}: {_why(err)} — is"
                                " `tillsync run` running?") from None
        try:
            doc = json.loads(body) if body else {}
        except ValueError:
            doc = None
        if 200 <= status < 300 and doc is not None:
            return doc
        raise self._refusal(status, doc, path)

    def _refusal(self, status: int, doc: Any, path: str) -> OperatorError:
        error = doc.get("error") if isinstance(doc, dict) else None
        message = _one_line(str(error.get("message", ""))) if isinstance(error, dict) else ""
        if status == 401:
            return OperatorError(f"the status token was refused by the agent at {self.url}"
                                 f" ({message or 'unauthorized'}) — use api.status_token from"
                                 " agent.toml (--token or $TILLSYNC_STATUS_TOKEN)")
        if status == 403:
            return OperatorError(f"the agent at {self.url} refused this token for {path}"
                                 f" ({message or 'forbidden'}) — use the status token, not a"
                                 " terminal's")
        if status == 404 and isinstance(error, dict):
            return OperatorError(f"{message or 'not found'} — list events with"
                                 " `tillsync outbox list`")
        if status == 404:
            return OperatorError(f"{self.url}{path} is not a tillsync agent endpoint (404) —"
                                 " check --url")
        if status == 421:
            return OperatorError(f"the agent refused the host name in {self.url} — use its"
                                 " listen address, or add the name to api.allowed_hosts")
        if error is None:
            return OperatorError(f"{self.url}{path} answered HTTP {status} without a tillsync"
                                 " error body — check --url points at the agent")
        code = error.get("code", "error") if isinstance(error, dict) else "error"
        return OperatorError(f"the agent answered {status} {code}: {message or 'no message'}"
                             " — see the agent's log (journalctl -u tillsync)")


def _why(err: BaseException) -> str:
    if isinstance(err, TimeoutError):
        return "no answer in time"
    os_error = getattr(err, "os_error", None)
    if isinstance(os_error, OSError):
        # asyncio's strerror is "Connect call failed (...)"; the errno says what happened.
        if os_error.errno and os_error.errno > 0:
            return os.strerror(os_error.errno).lower()
        if os_error.strerror:
            return os_error.strerror.lower()
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return "the connection closed without an answer"
    if isinstance(err, aiohttp.InvalidURL):
        return "not a valid URL"
    return _one_line(str(err)) or type(err).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- formatting ---------------------------------------------------------------------------


def humanize_seconds(seconds: float | None) -> str:
    """Render a duration for people: "45 s", "3 min", "2 h 5 min", "3 d 4 h"."""
    if seconds is None:
        return NONE
    s = max(0, round(float(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        hours, minutes = divmod(s // 60, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(s // 3600, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def humanize_bytes(size: float | None) -> str:
    """Render a byte count in binary units: "512 B", "1.5 MiB"."""
    if size is None:
        return NONE
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def ago(value: Any, now: float) -> str:
    """Render a past time (RFC 3339 or Unix) as "3 min ago"."""
    ts = _timestamp(value)
    if ts is None:
        return "never" if value is None else str(value)
    return f"{humanize_seconds(now - ts)} ago" if now >= ts else "just now"


def until(value: Any, now: float) -> str:
    """Render a future time as "in 30 s" ("now" once it has passed)."""
    ts = _timestamp(value)
    if ts is None:
        return NONE if value is None else str(value)
    return f"in {humanize_seconds(ts - now)}" if ts > now + 0.5 else "now"


def local_time(value: Any) -> str:
    """Render a time as local "YYYY-MM-DD HH:MM:SS"."""
    ts = _timestamp(value)
    if ts is None:
        return NONE
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _count(value: Any) -> str:
    return NONE if value is None else str(value)


def _text(value: Any) -> Text:
    # Text, not a markup string: an error message or sku with "[...]" is shown as is.
    return Text(NONE if value is None or value == "" else str(value))


def _state(value: Any) -> Text:
    if value is None:
        return Text(NONE, style="dim")
    return Text(str(value), style=STATE_STYLE.get(str(value), ""))


def _print_json(console: Console, doc: Any) -> None:
    # Plain text: --json output is for scripts, so no colour, wrapping or markup.
    console.out(json.dumps(doc, indent=2, ensure_ascii=False), highlight=False)
