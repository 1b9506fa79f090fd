"""Retail scales on serial ports: Mettler-Toledo 8217, NCI/Avery "W" and CAS ECR (hardware.md §5).

Each driver is request/response under one lock per device: drop stale input, send the
request, read until the protocol's frame is complete or the timeout passes. `read_weight`
returns only a stable, in-range weight (weights-and-measures practice, §5.5); otherwise it
raises DeviceRefused naming why ("in motion", "over capacity", "under zero"). A scale that does
not answer raises DeviceUnavailable and is reported DISCONNECTED "not responding".

The port is opened by ``open()`` and reopened on the next request after an unplug, so a scale
is back as soon as its path is (the device manager paces the retries).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import urllib.parse
from collections.abc import Callable
from typing import ClassVar

from drivers.base import (
    DeviceError,
    DeviceRefused,
    DeviceSpec,
    DeviceState,
    DeviceStatus,
    DeviceUnavailable,
)
from drivers.scale_protocols import (
    ACK,
    CAS_ENQ,
    CAS_WEIGHT_REQUEST,
    NCI_STATUS_REQUEST,
    NCI_WEIGHT_REQUEST,
    SERIAL_DEFAULTS,
    TOLEDO_ECHO_END,
    TOLEDO_ECHO_PROBE,
    TOLEDO_WEIGHT_REQUEST,
    ScaleCommandError,
    ScaleFrameError,
    Weight,
    cas_frame_end,
    cas_handshake_end,
    nci_frame_end,
    parse_cas_ecr,
    parse_nci,
    parse_toledo_8217,
    toledo_frame_end,
)
from drivers.transport import SerialEndpoint, Transport, open_transport, parse_device_url

log = logging.getLogger(__name__)

FrameEnd = Callable[[bytes], "int | None"]


def _endpoint(url: str, protocol: str) -> SerialEndpoint:
    """Parse ``url``; line settings it does not give come from the protocol's defaults."""
    endpoint = parse_device_url(url)
    if not isinstance(endpoint, SerialEndpoint):
        raise DeviceError(f"scale url {url!r} must be serial:///dev/…")
    given = {name for name, _ in urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)}
    defaults = {k: v for k, v in SERIAL_DEFAULTS[protocol].items() if k not in given}
    return dataclasses.replace(endpoint, **defaults)  # type: ignore[arg-type]


def refusal(weight: Weight) -> str | None:
    """Return why ``weight`` may not be sold by, or None when it is a usable stable weight."""
    if weight.faults:
        return "scale fault: " + ", ".join(weight.faults)
    if weight.over:
        return "over capacity"
    if weight.under:
        return "under zero"
    if weight.motion or not weight.stable:
        return "in motion"
    if weight.value is None:
        return "no weight"
    return None


class SerialScaleDriver:
    """Shared request/response machinery; subclasses name the protocol."""

    kind: ClassVar[str] = "scale"
    protocol: ClassVar[str]

    def __init__(self, spec: DeviceSpec) -> None:
        self.spec = spec
        self._endpoint = _endpoint(spec.url, self.protocol)
        unit = spec.options.get("unit")
        self._unit = str(unit) if unit is not None else None
        self._transport: Transport | None = None
        self._lock = asyncio.Lock()
        self._detail: str | None = "not opened"
        self._opened = False

    # ---- lifecycle

    async def open(self) -> None:
        """Open the port; DeviceUnavailable when it is not there."""
        self._opened = True
        async with self._lock:
            await self._ensure_open()

    async def close(self) -> None:
        """Close the port; idempotent."""
        self._opened = False
        async with self._lock:
            if self._transport is not None:
                await self._transport.close()
                self._transport = None
            self._detail = "closed"

    async def status(self) -> DeviceStatus:
        """Ask the scale now: CONNECTED only if it answered."""
        try:
            async with self._lock:
                await self._ping(timeout_s=0.5)
        except DeviceUnavailable as err:
            return DeviceStatus(DeviceState.DISCONNECTED, str(err))
        except DeviceRefused:
            pass  # it answered, just not with what we asked
        except ScaleFrameError as err:
            return DeviceStatus(DeviceState.ERROR, f"unreadable answer: {err}")
        return DeviceStatus(DeviceState.CONNECTED)

    @classmethod
    async def probe(cls, url: str, timeout_s: float = 1.0) -> bool:
        """Tell whether this protocol's scale answers at ``url``."""
        try:
            driver = cls(DeviceSpec(name="probe", type=cls.protocol, url=url))
            await driver.open()
        except Exception:  # whatever a wrong port does, the answer is "no"
            return False
        try:
            async with driver._lock:
                await driver._identify(timeout_s)
        except DeviceError:
            return False
        finally:
            await driver.close()
        return True

    # ---- operations

    async def measure(self, timeout_s: float = 1.0) -> Weight:
        """Return the scale's reading as it is (maybe in motion or status only)."""
        async with self._lock:
            try:
                return await self._measure(timeout_s)
            except ScaleCommandError as err:
                raise DeviceRefused(str(err)) from err
            except ScaleFrameError as err:
                raise DeviceRefused(f"unreadable answer: {err}") from err

    async def read_weight(self, timeout_s: float = 1.0) -> Weight:
        """Return a stable weight; DeviceRefused when in motion, over or under; else no answer."""
        weight = await self.measure(timeout_s)
        reason = refusal(weight)
        if reason is not None:
            raise DeviceRefused(reason)
        return weight

    # ---- protocol hooks

    async def _measure(self, timeout_s: float) -> Weight:
        raise NotImplementedError

    async def _ping(self, timeout_s: float) -> None:
        await self._measure(timeout_s)

    async def _identify(self, timeout_s: float) -> None:
        await self._ping(timeout_s)

    # ---- I/O (callers hold self._lock)

    async def _ensure_open(self) -> Transport:
        if self._transport is None or self._transport.closed:
            try:
                self._transport = await open_transport(self._endpoint, timeout_s=1.0)
            except DeviceUnavailable as err:
                self._transport = None
                self._detail = f"unplugged: {err}"
                raise
            except DeviceError:
                raise
            except Exception as err:
                # termios.error (not an OSError) when a pty refuses a 7-bit reconfigure (§3.3.3)
                self._transport = None
                self._detail = f"cannot configure port: {err}"
                raise DeviceUnavailable(f"{self._endpoint.path}: {err}") from err
            if self._detail is not None and self._detail != "not opened":
                log.info("scale %s reconnected", self.spec.name)
            self._detail = None
        return self._transport

    async def _ask(self, request: bytes, frame_end: FrameEnd, timeout_s: float) -> bytes:
        """Send ``request``; return the first complete answer frame within ``timeout_s``."""
        transport = await self._ensure_open()
        try:
            while await transport.read(4096, 0.0):
                pass  # stale answers from before (a pty or adapter keeps them, §3.3.3)
            await transport.write(request)
            buf = b""
            deadline = time.monotonic() + timeout_s
            while (end := frame_end(buf)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._detail = "not responding"
                    raise DeviceUnavailable(
                        f"scale {self.spec.name}: not responding within {timeout_s:g} s")
                buf += await transport.read(4096, remaining)
        except DeviceUnavailable as err:
            if transport.closed:
                if self._transport is transport:
                    self._transport = None
                self._detail = f"unplugged: {err}"
                log.warning("scale %s disconnected: %s", self.spec.name, err)
            raise
        return buf[:end]


class MettlerToledo8217ScaleDriver(SerialScaleDriver):
    """Mettler-Toledo 8217 "ECR" protocol: ``W`` → ``STX ww.www CR`` (9600 7E1)."""

    protocol: ClassVar[str] = "toledo8217"

    async def _measure(self, timeout_s: float) -> Weight:
        frame = await self._ask(TOLEDO_WEIGHT_REQUEST, toledo_frame_end, timeout_s)
        return parse_toledo_8217(frame, self._unit)

    async def _identify(self, timeout_s: float) -> None:
        # The echo test (as Odoo probes): "E" answers STX "E" CR, then bytes come back as sent.
        expected = b"\x02E\r" + TOLEDO_ECHO_PROBE[1:]
        answer = await self._ask(TOLEDO_ECHO_PROBE,
                                 lambda buf: len(expected) if len(buf) >= len(expected) else None,
                                 timeout_s)
        transport = await self._ensure_open()
        await transport.write(TOLEDO_ECHO_END)
        if answer != expected:
            raise DeviceRefused(f"not an 8217 echo: {answer!r}")


class NciScaleDriver(SerialScaleDriver):
    """NCI / Avery Weigh-Tronix "W" protocol: ``W CR`` → weight, units and status (9600 7E1)."""

    protocol: ClassVar[str] = "nci"

    async def _measure(self, timeout_s: float) -> Weight:
        return parse_nci(await self._ask(NCI_WEIGHT_REQUEST, nci_frame_end, timeout_s))

    async def _ping(self, timeout_s: float) -> None:
        parse_nci(await self._ask(NCI_STATUS_REQUEST, nci_frame_end, timeout_s))


class CasScaleDriver(SerialScaleDriver):
    """CAS ECR protocol: ENQ → ACK, DC1 → ``SOH STX S/U sign weight unit BCC ETX EOT``."""

    protocol: ClassVar[str] = "cas"

    async def _ping(self, timeout_s: float) -> None:
        answer = await self._ask(CAS_ENQ, cas_handshake_end, timeout_s)
        if answer[-1] != ACK:
            raise DeviceRefused("scale busy (NAK)")

    async def _measure(self, timeout_s: float) -> Weight:
        await self._ping(timeout_s)
        return parse_cas_ecr(await self._ask(CAS_WEIGHT_REQUEST, cas_frame_end, timeout_s))


__all__ = [
    "CasScaleDriver",
    "MettlerToledo8217ScaleDriver",
    "NciScaleDriver",
    "SerialScaleDriver",
    "Weight",
    "refusal",
]
