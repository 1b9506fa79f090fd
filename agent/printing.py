"""Print jobs (CONTRACT §4 ``POST /v1/print``): built here, queued in the outbox, printed by a sink.

A print job is an outbox event like a sale, so a printer gets what a cloud API gets (DESIGN:
one delivery engine): durable queueing, per-printer order, retry with backoff, expiry and
status. The event:

- ``kind`` "print_job", ``stream`` the printer's name (jobs print in the order accepted),
  ``sinks`` ``("printer:<name>",)``;
- ``payload`` a small JSON document holding the rendered ESC/POS bytes (base64), the copies
  and the job id; sealed at rest like every payload;
- ``idempotency_key`` uuid5 of (store, "print_job", terminal, job_id); ``dedupe_key``
  ``print_job/<terminal>/<job_id>``, so the same job_id again is the same job (200, never a
  second print) and the same job_id with other content is a 409;
- ``expires_at`` now + ``expires_in_s``: the relay dead-letters a job whose time has passed
  before attempting it ("expired before it could be delivered"), and :class:`PrinterSink`
  checks again once it holds the printer, so a job is never *sent* late.

What the printer sink reports, and so what the relay does (``outbox.classify``):

| the driver                    | reported as                    | the relay                     |
|-------------------------------|--------------------------------|-------------------------------|
| printed and confirmed         | ``Answered(200)``              | delivered                     |
| DeviceRefused (paper out,     | ``NoAnswer("connect",          | sink offline: retried with    |
| cover open), DeviceUnavailable| sent=False)``: nothing printed | backoff capped at 5 s, and at |
|                               |                                | once when the printer is back |
| PrintInDoubt (bytes sent,     | ``Unsendable``                 | dead, with the reason; *not*  |
|   completion not confirmed)   |                                | reprinted                     |
| any other DeviceError         | ``Unsendable``                 | dead (a bug or a bad config)  |

**In doubt means not reprinted.** Once the bytes are in the printer, a printer out of paper
mid-job keeps them and prints them when paper is loaded; a retry would print the receipt
twice. So an unconfirmed job is dead-lettered with a reason that says to look at the printer;
``POST /v1/outbox/{id}/retry`` prints it again on purpose. Two honest limits remain: bytes the
printer holds in its own buffer print whenever it can, even after ``expires_in_s`` (the agent
cannot take them back); and if the agent dies between sending a job and recording the result,
the outbox makes that job pending again and it prints a second time after the restart.

A ``transaction_id`` is looked up among the transactions *this* terminal posted (its dedupe key
``transaction/<terminal>/<id>``) by :class:`TransactionIndex`, through the store's public reads.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent import canonical
from agent.canonical import CARD_MESSAGE, InvalidEvent
from agent.errors import RequestError
from drivers.base import DeviceError, DeviceRefused, DeviceState, DeviceUnavailable
from drivers.escpos.commands import Encoder
from drivers.escpos.printer import PrintInDoubt
from drivers.escpos.receipt import COLUMNS, render_receipt
from drivers.manager import DeviceChange, DeviceManager, UnknownDevice
from outbox import DedupeConflict, NewEvent
from outbox.classify import Answered, AttemptResult, NoAnswer, Unsendable
from outbox.models import Delivery
from outbox.relay import EXPIRED
from outbox.sinks.base import SinkPolicy

if TYPE_CHECKING:
    from outbox import Appended, Outbox
    from outbox.relay import Relay

log = logging.getLogger(__name__)

KIND = "print_job"
SINK_PREFIX = "printer:"
DEFAULT_EXPIRES_IN_S = 600
MAX_EXPIRES_IN_S = 86400
MAX_COPIES = 10
MAX_LINES = 500
MAX_LINE_CHARS = 1000
# How long the driver waits for a sent job's completion answer before calling it in doubt.
PRINT_TIMEOUT_S = 30.0
# Waiting for the printer (its lock is held by a status poll or a drawer kick) and connecting
# come on top; past this the attempt is abandoned.
ATTEMPT_SLACK_S = 30.0
# Printers are near: retry soon (the cap bounds the wait after paper is loaded even when the
# device's state change is missed), one job at a time so the order holds.
PRINTER_POLICY = SinkPolicy(concurrency=1, backoff_base_s=0.25, backoff_cap_s=5.0,
                            pause_recheck_s=5.0)
NOT_REPRINTED = ("sent to the printer but its printing was not confirmed ({why}); not "
                 "reprinted automatically so that no receipt prints twice: look at the printer"
                 " and retry this event to print it again")
# Reads of the outbox per page when looking a transaction up, and how many transaction keys the
# index keeps (about 150 bytes each); older ones are found by a slower full scan.
INDEX_PAGE = 1000
INDEX_CAP = 100_000
PRINTER_PATTERN = r"[A-Za-z0-9._-]{1,64}"  # a [[devices]] name
FIELDS = ("printer", "transaction_id", "transaction", "lines", "job_id", "copies",
          "expires_in_s")


def sink_name(printer: str) -> str:
    """Return the outbox sink name of printer ``printer``."""
    return f"{SINK_PREFIX}{printer}"


class PrintRequestError(RequestError):
    """A refused print request: HTTP status, snake_case code, message, optional details."""


def _invalid(problems: list[tuple[str, str, str]],
             code: str = "validation_failed") -> PrintRequestError:
    shown = "; ".join(f"{f or 'body'}: {m}" for f, _, m in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return PrintRequestError(422, code, shown + more,
                             [{"field": f, "code": c, "message": m} for f, c, m in problems])


# -- the request ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrintRequest:
    """A checked ``POST /v1/print`` body; exactly one of the three sources is set."""

    printer: str
    job_id: str | None
    copies: int
    expires_in_s: float
    transaction_id: str | None = None
    transaction: Mapping[str, Any] | None = None
    lines: tuple[str, ...] | None = None


def parse_print_request(body: bytes) -> PrintRequest:
    """Check a ``POST /v1/print`` body; raise PrintRequestError (422) listing every problem."""
    try:
        data = json.loads(body, object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise _invalid([("", "invalid_json", f"not valid JSON: {err}")], "invalid_json") from None
    if not isinstance(data, dict):
        raise _invalid([("", "type", "must be a JSON object")])
    problems: list[tuple[str, str, str]] = []
    for key in data:
        if key not in FIELDS:
            problems.append((key, "unknown_field", f"unknown field; known: {', '.join(FIELDS)}"))
    printer = data.get("printer")
    if not _is_id(printer, PRINTER_PATTERN):
        problems.append(("printer", "required" if printer is None else "invalid",
                         "must be the name of a printer in [[devices]]"))
    job_id = data.get("job_id")
    if job_id is not None and not _is_id(job_id):
        problems.append(("job_id", "invalid", "must match [A-Za-z0-9._:-]{1,64}"))
    copies = data.get("copies", 1)
    if not _is_int(copies) or not 1 <= copies <= MAX_COPIES:
        problems.append(("copies", "out_of_range", f"must be an integer from 1 to {MAX_COPIES}"))
    expires = data.get("expires_in_s", DEFAULT_EXPIRES_IN_S)
    if (not isinstance(expires, int | float) or isinstance(expires, bool)
            or not 1 <= expires <= MAX_EXPIRES_IN_S):
        problems.append(("expires_in_s", "out_of_range",
                         f"must be a number of seconds from 1 to {MAX_EXPIRES_IN_S}"))
    sources = [k for k in ("transaction_id", "transaction", "lines") if k in data]
    if len(sources) != 1:
        problems.append(("", "one_source", "give exactly one of transaction_id, transaction "
                         f"and lines (got {', '.join(sources) or 'none'})"))
    txn_id = data.get("transaction_id")
    if "transaction_id" in data and not _is_id(txn_id):
        problems.append(("transaction_id", "invalid", "must match [A-Za-z0-9._:-]{1,64}"))
    ids = {k: data[k] for k in ("job_id", "transaction_id") if isinstance(data.get(k), str)}
    problems += [(path, "card_number", CARD_MESSAGE) for path in canonical.find_card_numbers(ids)]
    lines = data.get("lines")
    if "lines" in data:
        problems += _line_problems(lines)
    transaction = None
    if "transaction" in data and not problems:
        transaction = _check_transaction(data["transaction"])
    if problems:
        cards = any(code == "card_number" for _, code, _ in problems)
        raise _invalid(problems, "card_number_not_allowed" if cards else "validation_failed")
    return PrintRequest(str(printer), job_id, int(copies), float(expires),
                        transaction_id=txn_id, transaction=transaction,
                        lines=tuple(lines) if lines is not None else None)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _is_id(value: Any, pattern: str = canonical.ID_PATTERN) -> bool:
    return isinstance(value, str) and re.fullmatch(pattern, value) is not None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _line_problems(lines: Any) -> list[tuple[str, str, str]]:
    if not isinstance(lines, list) or not 1 <= len(lines) <= MAX_LINES:
        return [("lines", "invalid", f"must be a list of 1 to {MAX_LINES} strings")]
    problems = []
    for i, line in enumerate(lines):
        if not isinstance(line, str) or len(line) > MAX_LINE_CHARS:
            problems.append((f"lines[{i}]", "invalid",
                             f"must be a string of at most {MAX_LINE_CHARS} characters"))
        elif any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line):
            # ESC, GS and DLE would be printer commands: a text line must not carry them.
            problems.append((f"lines[{i}]", "control_character",
                             "must not hold control characters (one list entry per line)"))
    if not problems:
        # Printed text is stored in the outbox like a sale: no card numbers in it either.
        problems = [(path, "card_number", CARD_MESSAGE)
                    for path in canonical.find_card_numbers(lines, "lines")]
    return problems


def _check_transaction(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _invalid([("transaction", "type", "must be a transaction object (CONTRACT §5)")])
    try:
        accepted = canonical.parse_transaction(json.dumps(value, ensure_ascii=False).encode())
    except InvalidEvent as err:
        raise _invalid([(_join("transaction", p.field), p.code, p.message)
                        for p in err.problems], err.code) from None
    return accepted.data


def _join(prefix: str, field: str) -> str:
    if not field:
        return prefix
    return f"{prefix}{field}" if field.startswith("[") else f"{prefix}.{field}"


# -- the job's bytes --------------------------------------------------------------------------


def render_lines(lines: Iterable[str], *, width_mm: int = 80) -> bytes:
    """Return the ESC/POS bytes of a plain-text job: the lines as given, then a cut."""
    if width_mm not in COLUMNS:
        raise ValueError(f"width_mm must be 58 or 80, not {width_mm}")
    enc = Encoder()
    enc.style()
    for line in lines:
        enc.text(line)
    enc.cut()
    return enc.output


def job_payload(store_id: str, *, printer: str, terminal_id: str, job_id: str, copies: int,
                source: Mapping[str, str], data: bytes) -> bytes:
    """Return the outbox payload of a job; equal requests give equal bytes (for dedupe)."""
    document = {"store_id": store_id, "kind": KIND, "printer": printer,
                "terminal_id": terminal_id, "job_id": job_id, "copies": copies,
                "source": dict(source), "escpos_base64": base64.b64encode(data).decode()}
    return json.dumps(document, ensure_ascii=False, sort_keys=True,
                      separators=(",", ":")).encode()


@dataclass(frozen=True)
class Job:
    """A print job as the sink reads it back from the outbox."""

    job_id: str
    copies: int
    data: bytes

    @property
    def output(self) -> bytes:
        """Return the bytes sent to the printer: every copy, one after the other."""
        return self.data * self.copies


def read_job(payload: bytes) -> Job:
    """Decode a job's payload; ValueError when it is not one."""
    try:
        document = json.loads(payload)
        job = Job(str(document["job_id"]), int(document["copies"]),
                  base64.b64decode(document["escpos_base64"], validate=True))
    except (KeyError, TypeError, binascii.Error) as err:
        raise ValueError(f"not a print job: {err!r}") from None
    if not 1 <= job.copies <= MAX_COPIES:
        raise ValueError(f"not a print job: copies {job.copies}")
    return job


# -- finding a transaction this terminal posted -------------------------------------------------


class TransactionIndex:
    """Finds a transaction by (terminal, transaction id) through the store's public reads.

    The store has no public lookup by dedupe key, so this reads ``list_deliveries`` forward
    from where it last stopped and remembers the transaction keys it saw (at most
    ``cap``; older ones are found by a full scan). The first lookup after a start reads the
    whole outbox once. A transaction routed to no sink has no delivery and cannot be found
    this way: it is answered 404 like an unknown one.
    """

    def __init__(self, *, cap: int = INDEX_CAP, page: int = INDEX_PAGE) -> None:
        self._ids: dict[str, int] = {}
        self._after = 0  # every delivery up to this event id has been read
        self._evicted_upto = 0  # keys of events up to this id may have been forgotten
        self._cap = cap
        self._page = page
        self._lock = asyncio.Lock()

    async def find(self, store: Outbox, terminal_id: str,
                   transaction_id: str) -> Mapping[str, Any]:
        """Return the transaction as posted; PrintRequestError 404 or 410 if it cannot be."""
        key = canonical.dedupe_key("transaction", terminal_id, transaction_id)
        event_id = self._ids.get(key)
        if event_id is None:
            async with self._lock:
                await self._catch_up(store)
                event_id = self._ids.get(key)
                if event_id is None and self._evicted_upto:
                    event_id = await self._scan(store, key, self._evicted_upto)
        missing = PrintRequestError(
            404, "transaction_not_found",
            f"terminal {terminal_id} posted no transaction {transaction_id!r} that this agent"
            " still holds; send the sale itself as \"transaction\" to print its receipt")
        if event_id is None:
            raise missing
        record = await store.read(event_id)
        if record is None or record.dedupe_key != key:
            self._ids.pop(key, None)  # forgotten by the purge
            raise missing
        if record.payload is None:
            why = "quarantined" if record.quarantined else "released after outbox.retention_days"
            raise PrintRequestError(
                410, "transaction_purged",
                f"transaction {transaction_id!r} of terminal {terminal_id} is known but its "
                f"content was {why}; send the sale itself as \"transaction\" to print it")
        try:
            data = json.loads(record.payload)["data"]
        except (ValueError, KeyError, TypeError):
            raise PrintRequestError(500, "internal_error",
                                    f"event {event_id} does not hold a transaction") from None
        if not isinstance(data, dict):
            raise PrintRequestError(500, "internal_error",
                                    f"event {event_id} does not hold a transaction")
        return data

    async def _catch_up(self, store: Outbox) -> None:
        while True:
            rows = await store.list_deliveries(after_event_id=self._after, limit=self._page)
            for row in rows:
                if row.kind == "transaction" and row.dedupe_key:
                    self._remember(row.dedupe_key, row.event_id)
            if rows:
                self._after = max(self._after, rows[-1].event_id)
            if len(rows) < self._page:
                return

    def _remember(self, key: str, event_id: int) -> None:
        self._ids[key] = event_id
        while len(self._ids) > self._cap:
            oldest = next(iter(self._ids))
            self._evicted_upto = max(self._evicted_upto, self._ids.pop(oldest))

    async def _scan(self, store: Outbox, key: str, upto: int) -> int | None:
        after = 0
        while after < upto:
            rows = await store.list_deliveries(after_event_id=after, limit=self._page)
            for row in rows:
                if row.dedupe_key == key:
                    return row.event_id
            if len(rows) < self._page:
                return None
            after = rows[-1].event_id
        return None


# -- queueing a job ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Printer:
    """What the API needs to know of a configured printer."""

    name: str
    width_mm: int
    enabled: bool


def check_printer(manager: DeviceManager, printers: Mapping[str, Printer],
                  name: str) -> Printer:
    """Return the printer ``name``; PrintRequestError 404 (unknown) or 409 (not a printer)."""
    try:
        snapshot = manager.snapshot(name)
    except UnknownDevice:
        raise PrintRequestError(404, "printer_not_found", f"no device named {name!r}",
                                [{"field": "printer", "code": "not_found",
                                  "message": "must be the name of a printer in [[devices]]"}]
                                ) from None
    printer = printers.get(name)
    if printer is None or snapshot.kind != "printer":
        raise PrintRequestError(409, "device_not_a_printer",
                                f"device {name!r} is a {snapshot.kind}, not a receipt printer")
    if not printer.enabled:
        raise PrintRequestError(409, "printer_disabled",
                                f"printer {name!r} is disabled in the config (enabled = false);"
                                " a job for it would never print")
    return printer


def print_event(request: PrintRequest, *, store_id: str, terminal_id: str, printer: Printer,
                store_name: str, transaction: Mapping[str, Any] | None,
                now: float) -> tuple[str, NewEvent]:
    """Build the outbox event of a checked request; returns (job_id, event)."""
    job_id = request.job_id or uuid.uuid4().hex
    source: dict[str, str]
    if request.lines is not None:
        data = render_lines(request.lines, width_mm=printer.width_mm)
        source = {"type": "lines"}
    else:
        txn = transaction if transaction is not None else request.transaction
        assert txn is not None
        data = render_receipt(txn, width_mm=printer.width_mm, store_name=store_name)
        source = {"type": "transaction", "transaction_id": str(txn["transaction_id"]),
                  "terminal_id": str(txn["terminal_id"])}
    payload = job_payload(store_id, printer=printer.name, terminal_id=terminal_id,
                          job_id=job_id, copies=request.copies, source=source, data=data)
    key = str(uuid.uuid5(canonical.NAMESPACE, f"{store_id}/{KIND}/{terminal_id}/{job_id}"))
    event = NewEvent(stream=printer.name, kind=KIND, payload=payload,
                     sinks=(sink_name(printer.name),), idempotency_key=key,
                     dedupe_key=f"{KIND}/{terminal_id}/{job_id}" if request.job_id else None,
                     expires_at=now + request.expires_in_s)
    return job_id, event


async def append_job(store: Outbox, event: NewEvent, job_id: str) -> Appended:
    """Append the job; the same job_id with other content is PrintRequestError 409."""
    try:
        return await store.append(event)
    except DedupeConflict as err:
        raise PrintRequestError(
            409, "conflict",
            f"job {job_id!r} was already accepted (event {err.event_id}) with different "
            "content; a different job needs a new job_id") from None


# -- the sink ---------------------------------------------------------------------------------


class PrinterSink:
    """Prints jobs on one configured printer, through the device manager (its lock held)."""

    def __init__(self, printer: str, manager: DeviceManager, *,
                 policy: SinkPolicy = PRINTER_POLICY, print_timeout_s: float = PRINT_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.printer = printer
        self.name = sink_name(printer)
        self.policy = policy
        self.print_timeout_s = print_timeout_s
        self._manager = manager
        self._clock = clock

    async def start(self) -> None:
        """Nothing to acquire: the device manager owns the connection."""

    async def close(self) -> None:
        """Nothing to release."""

    async def lookup(self, delivery: Delivery) -> bool | None:
        """Unknown: a printer cannot tell whether it printed a job earlier."""
        return None

    async def deliver(self, delivery: Delivery) -> AttemptResult:
        """Print one job once; report what happened, never raise a device error."""
        try:
            job = read_job(delivery.payload)
        except ValueError as err:
            return Unsendable(str(err))
        if delivery.in_doubt:
            # Not produced by this sink (it never reports "sent" for a retry); kept as a guard.
            return Unsendable(NOT_REPRINTED.format(why="an earlier attempt"))
        holding = False
        try:
            async with asyncio.timeout(self.print_timeout_s + ATTEMPT_SLACK_S):
                async with self._manager.use(self.printer) as driver:
                    holding = True
                    if delivery.expires_at is not None and self._clock() >= delivery.expires_at:
                        return Unsendable(EXPIRED)  # expired while waiting for the printer
                    print_job = getattr(driver, "print_job", None)
                    if print_job is None:
                        return Unsendable(f"device {self.printer!r} cannot print")
                    await print_job(job.output, job_id=job.job_id,
                                    timeout_s=self.print_timeout_s)
        except PrintInDoubt as err:
            log.warning("printer %s: job %s not confirmed: %s", self.printer, job.job_id, err)
            return Unsendable(NOT_REPRINTED.format(why=str(err)))
        except (DeviceRefused, DeviceUnavailable) as err:
            return NoAnswer("connect", sent=False, detail=str(err) or type(err).__name__)
        except TimeoutError:
            if not holding:
                return NoAnswer("connect", sent=False, detail="the printer stayed busy")
            return Unsendable(NOT_REPRINTED.format(why="no answer in time"))
        except DeviceError as err:
            return Unsendable(f"printer error, not retried: {err}")
        return Answered(200, {}, f"printed on {self.printer}")


def resume_on_recovery(manager: DeviceManager,
                       relays: Mapping[str, Relay]) -> Callable[[], None]:
    """Re-check a printer's relay as soon as its device is CONNECTED again (paper loaded).

    Returns the function that stops it. Without it the relay still retries, within its
    backoff cap.
    """
    tasks: set[asyncio.Task[None]] = set()

    def on_change(change: DeviceChange) -> None:
        relay = relays.get(sink_name(change.name))
        if relay is None or change.new.state is not DeviceState.CONNECTED:
            return
        if change.old.state is DeviceState.CONNECTED:
            return  # a detail changed ("paper near end"): it could print before too
        task = asyncio.get_running_loop().create_task(relay.recheck())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return manager.subscribe(on_change)
