"""Serial and USB-CDC barcode scanners: suffix framing, AIM ids, GS1 checks (hardware.md §4).

Bytes arrive in arbitrary pieces: a scan may be split across reads and one read may hold two
scans, so `ScanFramer` accumulates and splits on the configured suffix and nothing else.
`decode_frame` turns one frame into a `Scan`: AIM symbology identifier stripped and named,
GTIN check digit verified, GS1 element strings split into AIs, in-store price/weight labels
decoded. A scan that breaks a rule is still delivered, with ``error`` set, so the terminal can
beep instead of the scan vanishing.

`SerialScannerDriver` keeps one reader task per scanner. When the port goes away (unplug, the
pty closes, a read error) it reports DISCONNECTED and reopens the same path with capped,
jittered backoff until the device is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from drivers.base import DeviceError, DeviceSpec, DeviceState, DeviceStatus, DeviceUnavailable
from drivers.gs1 import (
    DEFAULT_VARIABLE_MEASURE_RULES,
    GS1Error,
    VariableMeasure,
    VariableMeasureRule,
    decode_variable_measure,
    has_valid_check_digit,
    is_restricted_circulation,
    parse_element_string,
    to_gtin14,
)
from drivers.transport import SerialEndpoint, Transport, open_transport, parse_device_url

log = logging.getLogger(__name__)

# Record suffixes a scanner can be programmed with (§4.1); NONE frames on a quiet gap instead.
SUFFIXES: dict[str, bytes] = {"CR": b"\r", "LF": b"\n", "CRLF": b"\r\n", "TAB": b"\t", "NONE": b""}

# AIM symbology identifiers `]cm` (§4.2). Exact ids first; `AIM_FAMILIES` names the rest by
# their code character (the modifier only says which options the scanner applied).
AIM_SYMBOLOGIES: dict[str, str] = {
    "]E0": "EAN-13",  # also UPC-A (12 digits) and UPC-E (8 digits): refined by data length
    "]E1": "EAN/UPC 2-digit add-on",
    "]E2": "EAN/UPC 5-digit add-on",
    "]E3": "EAN/UPC with add-on",
    "]E4": "EAN-8",
    "]C0": "Code 128",
    "]C1": "GS1-128",
    "]C2": "Code 128 (FNC1 in second position)",
    "]C4": "ISBT 128",
    "]e0": "GS1 DataBar",
    "]d1": "Data Matrix",
    "]d2": "GS1 DataMatrix",
    "]Q1": "QR Code",
    "]Q3": "GS1 QR Code",
    "]J1": "GS1 DotCode",
}
AIM_FAMILIES: dict[str, str] = {
    "A": "Code 39",
    "C": "Code 128",
    "E": "EAN/UPC",
    "F": "Codabar",
    "G": "Code 93",
    "I": "ITF",
    "L": "PDF417",
    "Q": "QR Code",
    "X": "other",
    "d": "Data Matrix",
    "e": "GS1 DataBar",
    "z": "Aztec",
}
# Identifiers whose data is a GS1 element string (FNC1 in first position).
GS1_AIM_IDS = frozenset({"]C1", "]e0", "]d2", "]Q3", "]J1"})
# Identifiers whose data is an EAN/UPC number with a mod-10 check digit.
EAN_AIM_IDS = frozenset({"]E0", "]E4"})
_EAN_BY_LENGTH = {8: "UPC-E", 12: "UPC-A", 13: "EAN-13"}

# Framing wrappers some scanners add around the data (§4.1 "[STX] … [ETX]").
_STX, _ETX = "\x02", "\x03"
MAX_FRAME_BYTES = 4096  # longer without a suffix is line noise, not a barcode


class ScannerConfigError(DeviceError):
    """A scanner option has a value the driver cannot use."""


@dataclass(frozen=True)
class Scan:
    """One barcode read, as the agent forwards it to terminals."""

    code: str  # the data, without AIM identifier and suffix
    symbology: str | None  # None when the scanner sends no AIM identifier
    gs1: dict[str, str] | None  # AI → value for GS1 element strings
    at: datetime
    aim: str | None = None
    gtin: str | None = None  # GTIN-14 form, for catalogue lookups
    measure: VariableMeasure | None = None  # in-store price/weight label
    error: str | None = None  # why the scan breaks a rule (bad check digit, bad AI)

    def to_event(self) -> dict[str, Any]:
        """Return a JSON-ready dict for the agent's event stream."""
        measure = None
        if self.measure is not None:
            measure = {
                "kind": self.measure.kind,
                "value": str(self.measure.value),
                "item_code": self.measure.item_code,
                "item_ref": self.measure.item_ref,
            }
        return {
            "code": self.code,
            "symbology": self.symbology,
            "aim": self.aim,
            "gs1": self.gs1,
            "gtin": self.gtin,
            "measure": measure,
            "error": self.error,
            "at": self.at.isoformat(),
        }


class ScanFramer:
    """Split a byte stream into scans on a suffix, whatever the read boundaries."""

    def __init__(self, suffix: bytes, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.suffix = suffix
        self.max_frame = max_frame
        self.discarded = 0  # frames dropped as overlong noise
        self._buf = bytearray()

    @property
    def pending(self) -> bool:
        """Tell whether bytes of an unfinished frame are waiting."""
        return bool(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete frames they finish, in order."""
        self._buf += data
        if not self.suffix:
            if len(self._buf) > self.max_frame:
                self.reset()
                self.discarded += 1
            return []
        frames: list[bytes] = []
        while (end := self._buf.find(self.suffix)) >= 0:
            frame = self._clean(bytes(self._buf[:end]))
            del self._buf[: end + len(self.suffix)]
            if frame:
                frames.append(frame)
        if len(self._buf) > self.max_frame:
            self.reset()
            self.discarded += 1
        return frames

    def flush(self) -> bytes | None:
        """End the pending frame (a quiet gap in NONE mode); return it, or None if empty."""
        frame = self._clean(bytes(self._buf))
        self.reset()
        return frame or None

    def reset(self) -> None:
        """Forget a partial frame (after a reconnect the rest of it never comes)."""
        self._buf.clear()

    @staticmethod
    def _clean(frame: bytes) -> bytes:
        # A scanner set to CRLF on a driver set to CR leaves a LF at the start of the next
        # frame; stray CR/LF never belong to barcode data at its ends.
        return frame.strip(b"\r\n")


def _expand_upce(code: str) -> str | None:
    """Return the UPC-A form of an 8-digit UPC-E (number system 0 or 1), None if not UPC-E."""
    if len(code) != 8 or not code.isdigit() or code[0] not in "01":
        return None
    d, last = code[1:7], code[6]
    if last in "012":
        body = d[0:2] + last + "0000" + d[2:5]
    elif last == "3":
        body = d[0:3] + "00000" + d[3:5]
    elif last == "4":
        body = d[0:4] + "00000" + d[4]
    else:
        body = d[0:5] + "0000" + last
    return code[0] + body + code[7]


def _as_text(frame: bytes) -> str:
    try:
        return frame.decode("utf-8")
    except UnicodeDecodeError:
        return frame.decode("latin-1")  # every byte maps; nothing a scanner sends is lost


def decode_frame(
    frame: bytes,
    *,
    rules: Iterable[VariableMeasureRule] = DEFAULT_VARIABLE_MEASURE_RULES,
    at: datetime | None = None,
) -> Scan:
    """Turn one framed scan into a `Scan` (AIM id, GTIN, GS1 AIs, in-store label)."""
    text = _as_text(frame)
    if text.startswith(_STX):
        text = text[1:].removesuffix(_ETX)
    aim: str | None = None
    if len(text) >= 3 and text[0] == "]" and text[1].isalpha() and text[2].isalnum():
        aim, text = text[:3], text[3:]
    symbology = None
    if aim is not None:
        symbology = AIM_SYMBOLOGIES.get(aim) or AIM_FAMILIES.get(aim[1], "unknown")
    gs1: dict[str, str] | None = None
    gtin: str | None = None
    measure: VariableMeasure | None = None
    error: str | None = None

    if aim in GS1_AIM_IDS:
        try:
            gs1 = parse_element_string(text)
        except GS1Error as err:
            error = f"GS1: {err}"
        else:
            gtin = gs1.get("01")
    elif aim in EAN_AIM_IDS or (aim is None and text.isdigit() and len(text) in (8, 12, 13)):
        full = _expand_upce(text) if len(text) == 8 and aim == "]E0" else text
        if aim == "]E0":
            symbology = _EAN_BY_LENGTH.get(len(text), symbology)
        if (
            full is not None
            and full.isdigit()
            and has_valid_check_digit(full)
            and len(full) in (8, 12, 13)
        ):
            gtin = to_gtin14(full)
        elif aim is not None:
            error = f"check digit is wrong: {text}"
        if gtin is not None and is_restricted_circulation(gtin[1:]):
            try:
                measure = decode_variable_measure(gtin[1:], rules)
            except GS1Error as err:
                error = f"in-store label: {err}"
    return Scan(
        code=text,
        symbology=symbology,
        gs1=gs1,
        at=at or datetime.now(UTC),
        aim=aim,
        gtin=gtin,
        measure=measure,
        error=error,
    )


class ScanPublisher:
    """Fan-out of scans to subscriptions and callbacks (shared by the scanner drivers)."""

    spec: DeviceSpec
    _queue_size: int = 256

    def _init_publisher(self) -> None:
        self._subscriptions: set[ScanSubscription] = set()
        self._listeners: list[Callable[[Scan], object]] = []

    def subscribe(self) -> ScanSubscription:
        """Return a new subscription receiving every scan from now on."""
        sub = ScanSubscription(self, self._queue_size)
        self._subscriptions.add(sub)
        return sub

    def add_listener(self, callback: Callable[[Scan], object]) -> Callable[[], None]:
        """Call ``callback(scan)`` for every scan; return a function that removes it."""
        self._listeners.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return remove

    def _publish(self, scan: Scan) -> None:
        for sub in list(self._subscriptions):
            sub._put(scan)
        for callback in list(self._listeners):
            try:
                callback(scan)
            except Exception:
                # A broken listener is removed (and said once) rather than stopping the scanner.
                log.exception("scanner %s: listener %r failed and was removed",
                              self.spec.name, callback)
                with contextlib.suppress(ValueError):
                    self._listeners.remove(callback)

    def _end_subscriptions(self) -> None:
        for sub in list(self._subscriptions):
            sub.close()


class ScanSubscription:
    """An async iterator over scans from one driver; ``close()`` (or ``async with``) ends it."""

    def __init__(self, owner: ScanPublisher, maxsize: int) -> None:
        self._owner = owner
        self._queue: asyncio.Queue[Scan | None] = asyncio.Queue(maxsize)
        self.dropped = 0  # scans dropped because this subscriber fell behind

    def _put(self, scan: Scan | None) -> None:
        # A slow consumer (an SSE client on a bad link) must never stall the scanner:
        # the oldest scan goes.
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(scan)

    def __aiter__(self) -> ScanSubscription:
        return self

    async def __anext__(self) -> Scan:
        scan = await self._queue.get()
        if scan is None:
            raise StopAsyncIteration
        return scan

    async def get(self, timeout_s: float) -> Scan:
        """Return the next scan within ``timeout_s``; TimeoutError otherwise."""
        async with asyncio.timeout(timeout_s):
            return await self.__anext__()

    def close(self) -> None:
        """Stop receiving; a pending iteration ends."""
        self._owner._subscriptions.discard(self)
        self._put(None)

    async def __aenter__(self) -> ScanSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _option(options: Mapping[str, Any], name: str, default: float) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ScannerConfigError(f"scanner option {name}={value!r} must be a positive number")
    return float(value)


def _rules(options: Mapping[str, Any]) -> tuple[VariableMeasureRule, ...]:
    raw = options.get("variable_measure")
    if raw is None:
        return DEFAULT_VARIABLE_MEASURE_RULES
    try:
        return tuple(VariableMeasureRule(**{**r, "prefixes": tuple(r["prefixes"])}) for r in raw)
    except (TypeError, KeyError, GS1Error) as err:
        raise ScannerConfigError(f"scanner option variable_measure: {err}") from err


class SerialScannerDriver(ScanPublisher):
    """A barcode scanner on a serial or USB-CDC port."""

    kind: ClassVar[str] = "scanner"
    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {
            "suffix",
            "idle_timeout_s",
            "frame_timeout_s",
            "reconnect_max_s",
            "queue_size",
            "variable_measure",
        }
    )

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        endpoint = parse_device_url(spec.url)
        if not isinstance(endpoint, SerialEndpoint):
            raise ScannerConfigError(f"scanner {spec.name!r}: url must be serial:///dev/…")
        self._endpoint = endpoint
        unknown = set(spec.options) - self.OPTIONS
        if unknown:
            raise ScannerConfigError(
                f"scanner {spec.name!r}: unknown option(s) {', '.join(sorted(unknown))} "
                f"(known: {', '.join(sorted(self.OPTIONS))})"
            )
        suffix = str(spec.options.get("suffix", "CR")).upper()
        if suffix not in SUFFIXES:
            raise ScannerConfigError(
                f"scanner {spec.name!r}: suffix {suffix!r} must be one of {', '.join(SUFFIXES)}"
            )
        self._suffix = SUFFIXES[suffix]
        # NONE framing: a scan ends when the line stays quiet this long (scanners send a whole
        # scan within a few ms; people do not scan twice within 50 ms).
        self._idle_timeout_s = _option(spec.options, "idle_timeout_s", 0.05)
        # With a suffix, a partial frame this old is noise or a misconfigured suffix: dropped.
        self._frame_timeout_s = _option(spec.options, "frame_timeout_s", 0.5)
        self._reconnect_max_s = _option(spec.options, "reconnect_max_s", 1.0)
        self._queue_size = int(_option(spec.options, "queue_size", 256))
        self._rules = _rules(spec.options)
        self._transport: Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._detail: str | None = "not opened"
        self._init_publisher()

    # ---- lifecycle

    async def open(self) -> None:
        """Open the port and start reading; DeviceUnavailable when it is not there."""
        if self._task is not None and not self._task.done():
            if self._transport is None:
                raise DeviceUnavailable(self._detail or "reconnecting")
            return
        self._closing = False
        self._transport = await self._connect()
        self._detail = None
        self._task = asyncio.create_task(self._run(), name=f"scanner {self.spec.name}")

    async def close(self) -> None:
        """Stop reading and close the port; idempotent."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            # The loop checks _closing between reads (each ≤ 0.25 s); a hard cancel could leave
            # a worker thread reading an fd number the kernel hands out again.
            try:
                await asyncio.wait_for(asyncio.shield(task), 2.0)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._transport is not None:
            await self._transport.close()
            self._transport = None
        self._detail = "closed"
        self._end_subscriptions()

    async def status(self) -> DeviceStatus:
        """Report CONNECTED while the port is open (scanners have no status request)."""
        if self._transport is not None and not self._transport.closed:
            return DeviceStatus(DeviceState.CONNECTED)
        return DeviceStatus(DeviceState.DISCONNECTED, self._detail)

    @classmethod
    async def probe(cls, url: str, timeout_s: float = 1.0) -> bool:
        """Tell whether a serial port opens at ``url`` (a scanner answers nothing to ask)."""
        try:
            endpoint = parse_device_url(url)
            if not isinstance(endpoint, SerialEndpoint):
                return False
            transport = await open_transport(endpoint, timeout_s=timeout_s)
        except DeviceError:
            return False
        await transport.close()
        return True

    # ---- reader

    async def _connect(self) -> Transport:
        try:
            return await open_transport(self._endpoint, timeout_s=1.0)
        except DeviceError:
            raise
        except Exception as err:
            # termios.error (not an OSError) when a pty refuses a 7-bit reconfigure (§3.3.3)
            raise DeviceUnavailable(f"{self._endpoint.path}: {err}") from err

    async def _run(self) -> None:
        framer = ScanFramer(self._suffix)
        delay = 0.05
        attempts = 0
        lost_at = 0.0
        while not self._closing:
            transport = self._transport
            if transport is None:
                try:
                    transport = await self._connect()
                except DeviceUnavailable as err:
                    attempts += 1
                    self._detail = f"unplugged: {err}"
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, self._reconnect_max_s)
                    continue
                if self._closing:
                    await transport.close()
                    break
                self._transport, self._detail = transport, None
                log.info(
                    "scanner %s reconnected after %d failed attempts, %.1f s",
                    self.spec.name,
                    attempts,
                    time.monotonic() - lost_at,
                )
                delay, attempts = 0.05, 0
            if framer.pending:
                wait = self._idle_timeout_s if not self._suffix else self._frame_timeout_s
            else:
                wait = 0.25
            try:
                data = await transport.read(4096, wait)
            except DeviceUnavailable as err:
                framer.reset()  # the rest of a frame cut by an unplug never comes
                await transport.close()
                self._transport = None
                self._detail = f"unplugged: {err}"
                lost_at = time.monotonic()
                log.warning("scanner %s disconnected: %s", self.spec.name, err)
                continue
            if data:
                for frame in framer.feed(data):
                    self._publish(decode_frame(frame, rules=self._rules))
            elif framer.pending:
                if not self._suffix:
                    last = framer.flush()
                    if last is not None:
                        self._publish(decode_frame(last, rules=self._rules))
                else:
                    framer.reset()
                    framer.discarded += 1
                    log.warning(
                        "scanner %s: partial scan without suffix dropped "
                        "(is the scanner's suffix set to %r?)",
                        self.spec.name,
                        self._suffix,
                    )


__all__ = [
    "AIM_FAMILIES",
    "AIM_SYMBOLOGIES",
    "SUFFIXES",
    "Scan",
    "ScanFramer",
    "ScanPublisher",
    "ScanSubscription",
    "ScannerConfigError",
    "SerialScannerDriver",
    "decode_frame",
]
