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
``POST /v1/outbox/{id}/retry`` prints it again on purpose. The same holds across a stop or a
crash: the sink marks a job in doubt, durably, just before its first byte goes out
(``Outbox.mark_sent``; ``tracks_sends`` below), so a job cut off after that
is dead-lettered on restart, and one cut off before it (still waiting for the printer)
prints then. One honest limit remains: bytes the printer holds in its own buffer print
whenever it can, even after ``expires_in_s`` (the agent cannot take them back).

A ``transaction_id`` is looked up among the transactions *this* terminal posted (its dedupe key
``transaction/<terminal>/<id>``) by :class:`TransactionIndex`, through the store's public reads;
an inline ``transaction`` must carry this terminal's ``terminal_id`` (``check_terminal``), as a
posted one must (CONTRACT §4).
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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError

from agent import canonical
from agent.canonical import CARD_MESSAGE, Identifier, InvalidEvent, Problem
from agent.currencies import currency_decimals
from agent.errors import RequestError
from drivers.base import DeviceError, DeviceRefused, DeviceState, DeviceUnavailable
from drivers.escpos.commands import Encoder
from drivers.escpos.printer import PrintInDoubt
from drivers.escpos.receipt import COLUMNS, render_receipt
from drivers.manager import DeviceChange, DeviceManager, UnknownDevice
from outbox import DedupeConflict, NewEvent, OutboxError
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
SOURCES = ("transaction_id", "transaction", "lines")


def tracks_sends(sink: str) -> bool:
    """Whether ``sink`` is a printer's, whose sink marks its sends.

    :class:`PrinterSink` marks a job in doubt, durably, just before its first byte goes
    out, so a stop or crash before that gives the job back to print, and one after it never
    prints it twice.

    The outbox is told at open; its crash recovery and the relay's stop believe the marks.
    """
    return sink.startswith(SINK_PREFIX)


def sink_name(printer: str) -> str:
    """Return the outbox sink name of printer ``printer``."""
    return f"{SINK_PREFIX}{printer}"


class PrintRequestError(RequestError):
    """A refused print request: HTTP status, snake_case code, message, optional details."""


def _refused(err: InvalidEvent) -> PrintRequestError:
    details = [{"field": p.field, "code": p.code, "message": p.message} for p in err.problems]
    return PrintRequestError(422, err.code, err.message, details)


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


_PRINTER = re.compile(PRINTER_PATTERN)


def _printer_name(value: Any) -> str:
    text = canonical.text_check(64)(value)
    if not _PRINTER.fullmatch(text):
        raise canonical.field_error("invalid_format", "must be the name of a printer in"
                                    " [[devices]]: 1 to 64 of A-Z a-z 0-9 . _ -")
    return text


def _copies(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise canonical.field_error("wrong_type",
                                    f"must be an integer, not {canonical.json_type(value)}")
    if not 1 <= value <= MAX_COPIES:
        raise canonical.field_error("out_of_range", f"must be an integer from 1 to {MAX_COPIES}")
    return int(value)


def _expires_in_s(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise canonical.field_error("wrong_type", f"must be a number of seconds, not"
                                    f" {canonical.json_type(value)}")
    if not 1 <= value <= MAX_EXPIRES_IN_S:
        raise canonical.field_error("out_of_range", f"must be a number of seconds from 1 to"
                                    f" {MAX_EXPIRES_IN_S}")
    return float(value)


def _at_most_max_lines(value: Any) -> Any:
    if isinstance(value, list) and len(value) > MAX_LINES:
        raise canonical.field_error("too_many", f"has {len(value)} lines; at most {MAX_LINES}")
    return value


PrinterName = Annotated[str, PlainValidator(_printer_name)]
Copies = Annotated[int, PlainValidator(_copies)]
Seconds = Annotated[float, PlainValidator(_expires_in_s)]
# A line is text like a sale's description: no control characters (an ESC, GS or DLE would be
# a printer command), one list entry per printed line.
TextLine = Annotated[str, PlainValidator(canonical.text_check(MAX_LINE_CHARS))]
TextLines = Annotated[list[TextLine], BeforeValidator(_at_most_max_lines), Field(min_length=1)]


class _PrintBody(BaseModel):
    """The fields of a print request; the inline transaction is checked as a §5 event."""

    model_config = ConfigDict(extra="forbid")

    printer: PrinterName
    transaction_id: Identifier | None = None
    transaction: dict[str, Any] | None = None
    lines: TextLines | None = None
    job_id: Identifier | None = None
    copies: Copies | None = None
    expires_in_s: Seconds | None = None


def parse_print_request(body: bytes) -> PrintRequest:
    """Check a ``POST /v1/print`` body; raise PrintRequestError (422) listing every problem.

    The body passes the gates of a posted event (``agent.canonical``), in the same order and
    with the same codes (docs/events.md, "Errors"): ``invalid_json``, then
    ``card_number_not_allowed`` (anywhere, the inline transaction read as a sale is), then
    ``validation_failed`` with one detail per bad field, an inline transaction's fields
    prefixed with ``transaction.``. The one detail code of its own is ``one_source``. As in
    an event, an optional field sent as null is not given.
    """
    try:
        data = canonical.load_json(body)
    except InvalidEvent as err:
        raise _refused(err) from None
    cards = _card_paths(data)
    if cards:
        raise _refused(InvalidEvent("card_number_not_allowed",
                                    [Problem(path, "card_number", CARD_MESSAGE)
                                     for path in cards]))
    problems: list[Problem] = []
    checked: _PrintBody | None = None
    try:
        checked = _PrintBody.model_validate(data)
    except ValidationError as err:
        hint = f"the fields are {', '.join(FIELDS)}"
        problems += canonical.validation_problems(err, unknown_hint=hint)
    sources = [k for k in SOURCES if data.get(k) is not None]
    if len(sources) != 1:
        problems.append(Problem("", "one_source", "give exactly one of transaction_id,"
                                f" transaction and lines (got {', '.join(sources) or 'none'})"))
    transaction = None
    inline = data.get("transaction")
    if isinstance(inline, dict):
        try:
            transaction = canonical.check_transaction(inline).data
        except InvalidEvent as err:
            problems += [Problem(_join("transaction", p.field), p.code, p.message)
                         for p in err.problems]
    if problems or checked is None:
        raise _refused(InvalidEvent("validation_failed", problems))
    return PrintRequest(checked.printer, checked.job_id,
                        1 if checked.copies is None else checked.copies,
                        DEFAULT_EXPIRES_IN_S if checked.expires_in_s is None
                        else checked.expires_in_s,
                        transaction_id=checked.transaction_id, transaction=transaction,
                        lines=tuple(checked.lines) if checked.lines is not None else None)


def _card_paths(data: dict[str, Any]) -> list[str]:
    # The inline transaction is read on its own, as a posted sale is, so that its skus and
    # ids get the same narrower readings (canonical.find_card_numbers); the rest of the body
    # is read with it left out, keeping every other key's position.
    paths = canonical.find_card_numbers({k: None if k == "transaction" else v
                                         for k, v in data.items()})
    if "transaction" in data:
        inline = data["transaction"]
        if isinstance(inline, dict):
            paths += [_join("transaction", p) for p in canonical.find_card_numbers(inline)]
        else:
            paths += canonical.find_card_numbers(inline, "transaction")
    return paths


def check_terminal(request: PrintRequest, terminal_id: str) -> None:
    """Refuse an inline transaction of another terminal: 403 ``terminal_mismatch``.

    CONTRACT §4: a terminal token posts only for its own terminal_id. A ``transaction_id``
    is already looked up among this terminal's own sales.
    """
    if request.transaction is None:
        return
    sent = str(request.transaction["terminal_id"])
    if sent != terminal_id:
        message, details = canonical.terminal_mismatch(terminal_id, sent,
                                                       "transaction.terminal_id")
        raise PrintRequestError(403, "terminal_mismatch", message, details)


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
    """Build the outbox event of a checked request; returns (job_id, event).

    PrintRequestError 403 ``terminal_mismatch`` when the request's inline transaction is
    another terminal's (``check_terminal``).
    """
    check_terminal(request, terminal_id)
    job_id = request.job_id or uuid.uuid4().hex
    source: dict[str, str]
    if request.lines is not None:
        data = render_lines(request.lines, width_mm=printer.width_mm)
        source = {"type": "lines"}
    else:
        txn = transaction if transaction is not None else request.transaction
        assert txn is not None
        data = render_receipt(txn, width_mm=printer.width_mm, store_name=store_name,
                              decimals=currency_decimals(txn))
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

    def __init__(self, printer: str, manager: DeviceManager,
                 mark_sent: Callable[[Delivery], Awaitable[None]], *,
                 policy: SinkPolicy = PRINTER_POLICY, print_timeout_s: float = PRINT_TIMEOUT_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.printer = printer
        self._mark_sent = mark_sent  # Outbox.mark_sent
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
            # Its bytes may have gone out before a stop or crash (marked just before sending).
            return Unsendable(NOT_REPRINTED.format(why="the agent stopped while it printed"))
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
                                    timeout_s=self.print_timeout_s,
                                    before_send=lambda: self._mark_sent(delivery))
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
        except OutboxError as err:  # the mark could not be recorded: nothing was sent
            return NoAnswer("connect", sent=False, detail=f"outbox: {err}")
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
