"""The ESC/POS receipt printer and cash drawer driver (TCP 9100, serial, USB).

Conversations are serialised by one lock per printer. Status is asked with DLE EOT 1-4 (all four
back to back, answers in order) and every incoming byte goes through the StatusParser, so an
automatic status back frame or a late answer is never mistaken for the answer we wait for. A
printer that stays silent is "not responding", never "OK".

A TCP printer serves one client at a time, so the connection is released after ``idle_close_s``
without traffic; the next operation reconnects. Serial and USB ports stay open.

Print completion uses GS ( H process ids where the printer answers them (probed at open);
otherwise a clean DLE EOT after sending is taken as done. Once bytes are sent, a job whose
completion cannot be confirmed raises :class:`PrintInDoubt` rather than a retryable error: a
retry could print the receipt twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from drivers.base import (
    DeviceError,
    DeviceRefused,
    DeviceSpec,
    DeviceState,
    DeviceStatus,
    DeviceUnavailable,
)
from drivers.escpos import commands
from drivers.escpos.status import (
    ByteKind,
    Incoming,
    StatusFacts,
    StatusParser,
    parse_asb,
    parse_dle_eot,
)
from drivers.transport import Endpoint, TcpEndpoint, Transport, open_transport, parse_device_url

log = logging.getLogger(__name__)

NOT_RESPONDING = "not responding"
_PID_ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# Options of a [[devices]] entry of type "escpos", with their defaults.
DEFAULT_OPTIONS: dict[str, Any] = {
    "connect_timeout_s": 3.0,
    "status_timeout_s": 1.0,  # silence longer than this is "not responding"
    "idle_close_s": 5.0,  # TCP only; printers drop idle clients at ~90 s and block others
    "completion": "auto",  # "auto" (probe GS ( H), "process_id" or "status"
    "drawer_pin": 2,
    "drawer_on_ms": 50,  # 50 ms / 240 ms: duty 17 %, inside Citizen's 20 % limit (§2.5)
    "drawer_off_ms": 240,
    "drawer_open_when": "high",  # pin 3 level meaning "open"; depends on the drawer's switch
}


class PrintInDoubt(DeviceError):
    """The job was sent but its printing was not confirmed: do not resend it blindly."""

    def __init__(self, message: str, status: DeviceStatus | None = None) -> None:
        super().__init__(message)
        self.status = status


def describe(facts: StatusFacts) -> DeviceStatus:
    """Map the printer's facts to a device state and the most useful detail."""
    if facts.cover_open:
        return DeviceStatus(DeviceState.ERROR, "cover open")
    if facts.paper_out or facts.paper_end_stop:
        return DeviceStatus(DeviceState.ERROR, "paper out")
    if facts.autocutter_error:
        return DeviceStatus(DeviceState.ERROR, "cutter error")
    if facts.unrecoverable_error or facts.mechanical_error:
        return DeviceStatus(DeviceState.ERROR, "unrecoverable error")
    if facts.auto_recoverable_error:
        return DeviceStatus(DeviceState.ERROR, "print head too hot")
    if facts.error:
        return DeviceStatus(DeviceState.ERROR, "error")
    if facts.feed_button:
        return DeviceStatus(DeviceState.ERROR, "paper being fed")
    if facts.offline:
        return DeviceStatus(DeviceState.ERROR, "offline")
    if facts.paper_near_end:
        return DeviceStatus(DeviceState.CONNECTED, "paper near end")
    return DeviceStatus(DeviceState.CONNECTED)


def process_id_for(job_id: str) -> bytes:
    """Return the 4 printable bytes sent as the GS ( H id of ``job_id``."""
    digest = hashlib.sha256(job_id.encode()).digest()
    return bytes(_PID_ALPHABET[b % len(_PID_ALPHABET)] for b in digest[:4])


class EscposPrinterDriver:
    """An ESC/POS receipt printer with a cash drawer on its kick-out connector."""

    kind: ClassVar[str] = "printer"

    def __init__(self, spec: DeviceSpec) -> None:
        unknown = set(spec.options) - set(DEFAULT_OPTIONS)
        if unknown:
            raise DeviceError(
                f"device {spec.name!r}: unknown options {sorted(unknown)} "
                f"(known: {', '.join(sorted(DEFAULT_OPTIONS))})"
            )
        self.spec = spec
        self.options = {**DEFAULT_OPTIONS, **spec.options}
        if self.options["completion"] not in ("auto", "process_id", "status"):
            raise DeviceError(
                f"device {spec.name!r}: completion must be auto, process_id or status"
            )
        if self.options["drawer_open_when"] not in ("high", "low"):
            raise DeviceError(f"device {spec.name!r}: drawer_open_when must be high or low")
        try:
            # Validate the drawer defaults now: a bad config must fail at start, not at the till.
            commands.drawer_pulse(
                self.options["drawer_pin"],
                self.options["drawer_on_ms"],
                self.options["drawer_off_ms"],
            )
        except ValueError as err:
            raise DeviceError(f"device {spec.name!r}: {err}") from err
        self.endpoint: Endpoint = parse_device_url(spec.url)
        self._lock = asyncio.Lock()
        self._transport: Transport | None = None
        self._parser = StatusParser()
        self._realtime: list[int] = []
        self._process_ids: list[bytes] = []
        self._facts = StatusFacts()
        self._supports_pid: bool | None = {"auto": None, "process_id": True, "status": False}[
            self.options["completion"]
        ]
        self._idle_task: asyncio.Task[None] | None = None

    # --- Driver protocol -------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect and check that an ESC/POS printer answers; DeviceUnavailable otherwise."""
        async with self._lock:
            await self._refresh_locked()
            if self._supports_pid is None:
                self._supports_pid = await self._probe_process_id_locked()
            self._touch()

    async def close(self) -> None:
        """Release the connection; idempotent."""
        if self._idle_task is not None:
            self._idle_task.cancel()
            self._idle_task = None
        async with self._lock:
            await self._drop_locked()

    async def status(self) -> DeviceStatus:
        """Ask the printer now (DLE EOT 1-4); silence is DISCONNECTED "not responding"."""
        async with self._lock:
            try:
                facts = await self._refresh_locked()
            except DeviceUnavailable as err:
                return DeviceStatus(DeviceState.DISCONNECTED, _detail(err))
            finally:
                self._touch()
        status = describe(facts)
        if status.state is DeviceState.CONNECTED and self.drawer_open:
            # Only "open" is news: a printer without a drawer reads some fixed pin level.
            detail = ", ".join(d for d in (status.detail, "drawer open") if d)
            status = DeviceStatus(DeviceState.CONNECTED, detail)
        return status

    @classmethod
    async def probe(cls, url: str, timeout_s: float = 1.0) -> bool:
        """Tell whether an ESC/POS printer answers DLE EOT 1 at ``url``."""
        try:
            options = {"status_timeout_s": timeout_s, "connect_timeout_s": timeout_s}
            driver = cls(DeviceSpec("probe", "escpos", url, options))
        except DeviceError:
            return False
        try:
            async with driver._lock:
                await driver._refresh_locked(requests=(1,))
            return True
        except DeviceUnavailable:
            return False
        finally:
            await driver.close()

    # --- operations ------------------------------------------------------------------------------
    @property
    def last_facts(self) -> StatusFacts:
        """Return what the printer last said about itself (DLE EOT answers and ASB frames)."""
        return self._facts

    @property
    def drawer_open(self) -> bool | None:
        """Tell whether the drawer switch reads open (None until the printer reported pin 3)."""
        pin3 = self._facts.drawer_pin3_high
        if pin3 is None:
            return None
        return pin3 if self.options["drawer_open_when"] == "high" else not pin3

    async def print_job(self, data: bytes, *, job_id: str, timeout_s: float = 30.0,
                        before_send: Callable[[], Awaitable[None]] | None = None) -> None:
        """Print ``data`` once and wait for completion; refuse when the printer cannot print.

        ``before_send`` is awaited once the printer has said it can print, just before the
        first byte goes out (the caller records that the job may now print); if it raises,
        nothing is sent.
        """
        async with self._lock:
            try:
                facts = await self._refresh_locked()
                if facts.cannot_print:
                    raise DeviceRefused(f"printer {self.spec.name!r}: {describe(facts).detail}")
                if before_send is not None:
                    await before_send()
                pid = process_id_for(job_id)
                payload = data + (commands.process_id_request(pid) if self._supports_pid else b"")
                await self._transport_locked().write(payload)
            finally:
                self._touch()
            # From here on the bytes are in the printer: failures are "in doubt", not retryable.
            try:
                if self._supports_pid:
                    await self._wait_process_id_locked(pid, timeout_s)
                else:
                    facts = await self._refresh_locked()
                    if facts.cannot_print:
                        raise PrintInDoubt(
                            f"printer {self.spec.name!r}: {describe(facts).detail} after sending "
                            f"job {job_id!r}",
                            describe(facts),
                        )
            except DeviceUnavailable as err:
                raise PrintInDoubt(
                    f"printer {self.spec.name!r}: lost while printing job {job_id!r}: {err}",
                    DeviceStatus(DeviceState.DISCONNECTED, _detail(err)),
                ) from err
            finally:
                self._touch()

    async def kick_drawer(
        self, pin: int | None = None, on_ms: int | None = None, off_ms: int | None = None
    ) -> None:
        """Pulse the drawer now or not at all; refused while the printer cannot act on it."""
        try:
            pulse = commands.drawer_pulse(
                self.options["drawer_pin"] if pin is None else pin,
                self.options["drawer_on_ms"] if on_ms is None else on_ms,
                self.options["drawer_off_ms"] if off_ms is None else off_ms,
            )
        except ValueError as err:
            raise DeviceError(f"printer {self.spec.name!r}: {err}") from err
        async with self._lock:
            try:
                facts = await self._refresh_locked()
                # ESC p is buffered while offline and would fire later: that would be a drawer
                # opening nobody asked for at that moment, so refuse instead.
                if facts.cannot_print or facts.offline:
                    raise DeviceRefused(
                        f"printer {self.spec.name!r}: {describe(facts).detail}; drawer not opened"
                    )
                await self._transport_locked().write(pulse)
            finally:
                self._touch()

    # --- conversation helpers (call with the lock held) ------------------------------------------
    def _transport_locked(self) -> Transport:
        if self._transport is None or self._transport.closed:
            raise DeviceUnavailable(f"printer {self.spec.name!r}: not connected")
        return self._transport

    async def _connect_locked(self) -> Transport:
        if self._transport is not None and not self._transport.closed:
            return self._transport
        self._transport = await open_transport(
            self.endpoint, timeout_s=float(self.options["connect_timeout_s"])
        )
        self._parser = StatusParser()
        self._realtime.clear()
        return self._transport

    async def _drop_locked(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.close()
        self._realtime.clear()

    def _absorb(self, units: list[Incoming]) -> None:
        for unit in units:
            if unit.kind is ByteKind.REALTIME:
                self._realtime.append(unit.data[0])
            elif unit.kind is ByteKind.ASB:
                self._facts = self._facts.merged(parse_asb(unit.data))
            elif unit.kind is ByteKind.PROCESS_ID:
                self._process_ids.append(unit.data[2:6])
            elif unit.kind is ByteKind.JUNK:
                log.debug("printer %s: ignored bytes %s", self.spec.name, unit.data.hex(" "))

    async def _read_some_locked(self, timeout_s: float) -> None:
        data = await self._transport_locked().read(256, timeout_s)
        if data:
            self._absorb(self._parser.feed(data))

    async def _drain_unsolicited_locked(self) -> None:
        # Take in what arrived between conversations (ASB frames, late answers) and forget stale
        # real-time answers so the next ones line up with our requests.
        with contextlib.suppress(DeviceUnavailable):
            await self._read_some_locked(0.0)
        self._realtime.clear()

    async def _refresh_locked(self, requests: tuple[int, ...] = (1, 2, 3, 4)) -> StatusFacts:
        await self._connect_locked()
        await self._drain_unsolicited_locked()
        if self._transport is None or self._transport.closed:
            # The printer dropped us while idle (its own idle timeout): reconnect once.
            await self._connect_locked()
        timeout_s = float(self.options["status_timeout_s"])
        try:
            await self._transport_locked().write(b"".join(commands.dle_eot(n) for n in requests))
            deadline = time.monotonic() + timeout_s
            while len(self._realtime) < len(requests):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeviceUnavailable(NOT_RESPONDING)
                await self._read_some_locked(remaining)
        except DeviceUnavailable:
            # Late answers from a slow or silent printer must not be read as the next ones.
            await self._drop_locked()
            raise
        facts = self._facts
        for n, byte in zip(requests, self._realtime, strict=False):
            facts = facts.merged(parse_dle_eot(n, byte))
        self._realtime.clear()
        self._facts = facts
        return facts

    async def _probe_process_id_locked(self) -> bool:
        probe = b"~TS~"
        self._process_ids.clear()
        await self._transport_locked().write(commands.process_id_request(probe))
        deadline = time.monotonic() + float(self.options["status_timeout_s"])
        while probe not in self._process_ids:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.info("printer %s: no GS ( H answer; completion by status", self.spec.name)
                return False
            await self._read_some_locked(remaining)
        return True

    async def _wait_process_id_locked(self, pid: bytes, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        poll_s = min(0.5, float(self.options["status_timeout_s"]))
        while pid not in self._process_ids:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status = describe(self._facts)
                raise PrintInDoubt(
                    f"printer {self.spec.name!r}: job not confirmed within {timeout_s:g} s "
                    f"({status.detail or 'no completion answer'})",
                    status,
                )
            before = len(self._process_ids)
            await self._read_some_locked(min(remaining, poll_s))
            if len(self._process_ids) == before and pid not in self._process_ids:
                # Still printing, or stuck (paper out mid-job): make sure the printer is alive.
                await self._refresh_locked()
        self._process_ids.clear()

    def _touch(self) -> None:
        # TCP printers serve one client at a time: let go of the connection when idle.
        if not isinstance(self.endpoint, TcpEndpoint):
            return
        if self._idle_task is not None:
            self._idle_task.cancel()
        self._idle_task = asyncio.get_running_loop().create_task(self._idle_close())

    async def _idle_close(self) -> None:
        await asyncio.sleep(float(self.options["idle_close_s"]))
        async with self._lock:
            await self._drop_locked()


def _detail(err: DeviceUnavailable) -> str:
    text = str(err)
    return NOT_RESPONDING if text == NOT_RESPONDING else f"unreachable: {text}"
