"""Byte transports for devices: TCP (asyncio streams), serial (pyserial in a thread), USB.

A device URL names the transport and its settings; :func:`parse_device_url` checks it up front
with errors that name the wrong part, so a bad config fails at validation, not at 3 a.m.

Every transport has the same small async surface: ``write``, ``read(max_bytes, timeout_s)``
(``b""`` when nothing arrived in time; :class:`~drivers.base.DeviceUnavailable` when the device
went away), ``close`` (idempotent) and ``closed``. Blocking calls (pyserial, pyusb) run in a
worker thread under one lock per transport, so the event loop never blocks on a device.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Protocol

import serial

from drivers.base import DeviceError, DeviceUnavailable

try:  # POSIX only; Windows serial ports raise SerialException
    import termios

    _TERMIOS_ERRORS: tuple[type[Exception], ...] = (termios.error,)
except ImportError:  # pragma: no cover - Windows
    _TERMIOS_ERRORS = ()

# Serial settings accepted in a serial:// query, with pyserial's allowed values.
SERIAL_BYTESIZES = (5, 6, 7, 8)
SERIAL_PARITIES = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD,
                   "M": serial.PARITY_MARK, "S": serial.PARITY_SPACE}  # fmt: skip
SERIAL_STOPBITS = {"1": 1.0, "1.5": 1.5, "2": 2.0}
SERIAL_FLAGS = ("rtscts", "xonxoff", "dsrdtr", "exclusive")
# A blocking read in the worker thread is cut into slices this long so a write waiting for the
# transport lock is delayed at most this much.
READ_SLICE_S = 0.05


@dataclass(frozen=True)
class TcpEndpoint:
    """A raw TCP device (port 9100 printers, serial device servers)."""

    host: str
    port: int


@dataclass(frozen=True)
class SerialEndpoint:
    """A serial port and its line settings (defaults 9600 8N1, no flow control)."""

    path: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1.0
    rtscts: bool = False
    xonxoff: bool = False
    dsrdtr: bool = False
    exclusive: bool = True


@dataclass(frozen=True)
class UsbEndpoint:
    """A USB printer-class device by vendor and product id."""

    vendor_id: int
    product_id: int
    in_ep: int = 0x82  # python-escpos defaults, right for Epson TM printers
    out_ep: int = 0x01


Endpoint = TcpEndpoint | SerialEndpoint | UsbEndpoint


def _flag(url: str, name: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise DeviceError(f"device url {url!r}: {name}={value!r} must be 0 or 1")


def _int(url: str, name: str, value: str, allowed: tuple[int, ...] | None = None) -> int:
    try:
        number = int(value, 0)
    except ValueError:
        raise DeviceError(f"device url {url!r}: {name}={value!r} is not a number") from None
    if allowed is not None and number not in allowed:
        raise DeviceError(
            f"device url {url!r}: {name}={value!r} must be one of {', '.join(map(str, allowed))}"
        )
    return number


def _parse_serial(url: str, parts: urllib.parse.SplitResult) -> SerialEndpoint:
    if parts.netloc:
        raise DeviceError(
            f"device url {url!r}: a serial url has an empty host and an absolute path, "
            "e.g. serial:///dev/ttyUSB0 (three slashes) or serial:///COM3"
        )
    path = urllib.parse.unquote(parts.path)
    if not path or path == "/":
        raise DeviceError(f"device url {url!r}: the serial port path is missing")
    # serial:///COM3 means the Windows port COM3, not a file /COM3.
    if path[1:].upper().startswith("COM") and path[4:].isdigit():
        path = path[1:]
    settings: dict[str, Any] = {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name == "baudrate":
            baud = _int(url, name, value)
            if baud <= 0:
                raise DeviceError(f"device url {url!r}: baudrate={value!r} must be positive")
            settings[name] = baud
        elif name == "bytesize":
            settings[name] = _int(url, name, value, SERIAL_BYTESIZES)
        elif name == "parity":
            if value.upper() not in SERIAL_PARITIES:
                raise DeviceError(
                    f"device url {url!r}: parity={value!r} must be one of N, E, O, M, S"
                )
            settings[name] = value.upper()
        elif name == "stopbits":
            if value not in SERIAL_STOPBITS:
                raise DeviceError(f"device url {url!r}: stopbits={value!r} must be 1, 1.5 or 2")
            settings[name] = SERIAL_STOPBITS[value]
        elif name in SERIAL_FLAGS:
            settings[name] = _flag(url, name, value)
        else:
            known = "baudrate, bytesize, parity, stopbits, " + ", ".join(SERIAL_FLAGS)
            raise DeviceError(f"device url {url!r}: unknown setting {name!r} (known: {known})")
    return SerialEndpoint(path=path, **settings)


def _parse_usb(url: str, parts: urllib.parse.SplitResult) -> UsbEndpoint:
    ids = parts.netloc or parts.path.strip("/")
    vid, sep, pid = ids.partition(":")
    if not sep:
        raise DeviceError(f"device url {url!r}: a usb url is usb://VID:PID in hex, e.g. 04b8:0202")
    numbers = []
    for label, text in (("vendor id", vid), ("product id", pid)):
        try:
            number = int(text, 16)
        except ValueError:
            raise DeviceError(
                f"device url {url!r}: {label} {text!r} is not a 4-digit hex number"
            ) from None
        if not 0 <= number <= 0xFFFF or len(text) > 4:
            raise DeviceError(f"device url {url!r}: {label} {text!r} is not a 4-digit hex number")
        numbers.append(number)
    settings = {}
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("in_ep", "out_ep"):
            raise DeviceError(
                f"device url {url!r}: unknown setting {name!r} (known: in_ep, out_ep)"
            )
        settings[name] = _int(url, name, value)
    return UsbEndpoint(numbers[0], numbers[1], **settings)


def parse_device_url(url: str) -> Endpoint:
    """Parse ``tcp://host:port``, ``serial:///dev/tty…?baudrate=…`` or ``usb://VID:PID``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "tcp":
        if parts.path not in ("", "/") or parts.query:
            raise DeviceError(f"device url {url!r}: a tcp url is tcp://host:port, nothing after")
        if not parts.hostname:
            raise DeviceError(f"device url {url!r}: the host is missing (tcp://host:9100)")
        try:
            port = parts.port
        except ValueError:
            raise DeviceError(f"device url {url!r}: the port is not a number 1-65535") from None
        if port is None or port == 0:
            raise DeviceError(f"device url {url!r}: the port is missing (tcp://host:9100)")
        return TcpEndpoint(parts.hostname, port)
    if parts.scheme == "serial":
        return _parse_serial(url, parts)
    if parts.scheme == "usb":
        return _parse_usb(url, parts)
    raise DeviceError(
        f"device url {url!r}: unknown scheme {parts.scheme!r} (known: tcp, serial, usb)"
    )


class Transport(Protocol):
    """An open byte stream to one device."""

    @property
    def closed(self) -> bool:
        """Tell whether the transport is closed (by us or by the device going away)."""
        ...

    async def write(self, data: bytes) -> None:
        """Send ``data``; DeviceUnavailable if the device is gone or does not take it in time."""
        ...

    async def read(self, max_bytes: int, timeout_s: float) -> bytes:
        """Return up to ``max_bytes`` received within ``timeout_s``, b"" if none arrived."""
        ...

    async def close(self) -> None:
        """Close; idempotent."""
        ...


class TcpTransport:
    """A TCP connection through asyncio streams."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, write_timeout_s: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._write_timeout_s = write_timeout_s
        self._closed = False

    @property
    def closed(self) -> bool:
        """Tell whether the connection is closed."""
        return self._closed

    async def write(self, data: bytes) -> None:
        """Send ``data`` and wait until the kernel took it (a printer with a full buffer stalls)."""
        if self._closed:
            raise DeviceUnavailable("connection is closed")
        try:
            self._writer.write(data)
            await asyncio.wait_for(self._writer.drain(), self._write_timeout_s)
        except TimeoutError as err:
            await self.close()
            raise DeviceUnavailable(f"device took no data for {self._write_timeout_s:g} s") from err
        except OSError as err:
            await self.close()
            raise DeviceUnavailable(f"write failed: {err}") from err

    async def read(self, max_bytes: int, timeout_s: float) -> bytes:
        """Return what arrives within ``timeout_s`` (b"" if nothing); EOF is DeviceUnavailable."""
        if self._closed:
            raise DeviceUnavailable("connection is closed")
        try:
            data = await asyncio.wait_for(self._reader.read(max_bytes), timeout_s)
        except TimeoutError:
            return b""
        except OSError as err:
            await self.close()
            raise DeviceUnavailable(f"read failed: {err}") from err
        if not data:
            await self.close()
            raise DeviceUnavailable("device closed the connection")
        return data

    async def close(self) -> None:
        """Close the connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)


class SerialTransport:
    """A serial port through pyserial, every blocking call in a worker thread under one lock."""

    def __init__(self, port: serial.Serial) -> None:
        self._port = port
        self._lock = asyncio.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Tell whether the port is closed."""
        return self._closed

    @classmethod
    def open_blocking(cls, endpoint: SerialEndpoint, write_timeout_s: float) -> serial.Serial:
        """Open the port with all settings at once (a pty refuses a later 7-bit reconfigure)."""
        return serial.Serial(
            port=endpoint.path,
            baudrate=endpoint.baudrate,
            bytesize=endpoint.bytesize,
            parity=SERIAL_PARITIES[endpoint.parity],
            stopbits=endpoint.stopbits,
            rtscts=endpoint.rtscts,
            xonxoff=endpoint.xonxoff,
            dsrdtr=endpoint.dsrdtr,
            exclusive=endpoint.exclusive,
            # Non-blocking reads: we wait with select() ourselves, so no timeout ever has to be
            # changed after open (hardware.md §3.3.3).
            timeout=0,
            write_timeout=write_timeout_s,
        )

    def _read_blocking(self, max_bytes: int, timeout_s: float) -> bytes:
        fileno = getattr(self._port, "fileno", None)
        if fileno is not None:
            ready, _, _ = select.select([fileno()], [], [], timeout_s)
            if not ready:
                return b""
            # pyserial raises SerialException when a ready port returns nothing: unplugged.
            return bytes(self._port.read(max_bytes))
        # No fd to select on (Windows): poll the input queue.
        deadline = time.monotonic() + timeout_s
        while True:
            waiting = self._port.in_waiting
            if waiting:
                return bytes(self._port.read(min(waiting, max_bytes)))
            if time.monotonic() >= deadline:
                return b""
            time.sleep(0.005)

    def _write_blocking(self, data: bytes) -> None:
        # pyserial raises SerialTimeoutException after write_timeout (set at open).
        self._port.write(data)

    async def write(self, data: bytes) -> None:
        """Send ``data``; DeviceUnavailable when the port is gone."""
        if self._closed:
            raise DeviceUnavailable("port is closed")
        async with self._lock:
            try:
                await asyncio.to_thread(self._write_blocking, data)
            except (serial.SerialException, OSError) as err:
                await self._close_locked()
                raise DeviceUnavailable(f"write failed: {err}") from err

    async def read(self, max_bytes: int, timeout_s: float) -> bytes:
        """Return what arrives within ``timeout_s`` (b"" if nothing); unplug raises."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._closed:
                raise DeviceUnavailable("port is closed")
            remaining = deadline - time.monotonic()
            async with self._lock:
                try:
                    data = await asyncio.to_thread(
                        self._read_blocking, max_bytes, max(0.0, min(remaining, READ_SLICE_S))
                    )
                except (serial.SerialException, OSError, ValueError) as err:
                    await self._close_locked()
                    raise DeviceUnavailable(f"read failed: {err}") from err
            if data or remaining <= READ_SLICE_S:
                return data

    async def _close_locked(self) -> None:
        self._closed = True
        with contextlib.suppress(serial.SerialException, OSError):
            await asyncio.to_thread(self._port.close)

    async def close(self) -> None:
        """Close the port; idempotent."""
        if self._closed:
            return
        self._closed = True
        async with self._lock:
            with contextlib.suppress(serial.SerialException, OSError):
                await asyncio.to_thread(self._port.close)


class UsbTransport:
    """A USB printer through python-escpos's ``Usb`` class in a worker thread.

    Not tested against hardware (none in CI): only URL parsing and the missing-library error are.
    """

    def __init__(self, usb: Any, endpoint: UsbEndpoint) -> None:
        self._usb = usb
        self._endpoint = endpoint
        self._lock = threading.Lock()  # pyusb handles are used from worker threads only
        self._closed = False

    @property
    def closed(self) -> bool:
        """Tell whether the device is released."""
        return self._closed

    @classmethod
    def open_blocking(cls, endpoint: UsbEndpoint, timeout_s: float) -> Any:
        """Find, claim and configure the device (python-escpos also resets it)."""
        from drivers.escpos.commands import escpos_module

        printer = escpos_module("escpos.printer")
        if not printer.Usb.is_usable():
            raise DeviceError(
                "USB printers need pyusb and libusb-1.0: `pip install pyusb` and "
                "`apt install libusb-1.0-0` (or use the printer's serial or network port)"
            )
        usb = printer.Usb(
            endpoint.vendor_id,
            endpoint.product_id,
            timeout=int(timeout_s * 1000),
            in_ep=endpoint.in_ep,
            out_ep=endpoint.out_ep,
        )
        usb.open()
        return usb

    def _write_blocking(self, data: bytes) -> None:
        with self._lock:
            self._usb._raw(data)

    def _read_blocking(self, max_bytes: int, timeout_s: float) -> bytes:
        with self._lock:
            try:
                data = self._usb.device.read(
                    self._endpoint.in_ep, max(max_bytes, 16), max(1, int(timeout_s * 1000))
                )
            except Exception as err:
                # pyusb signals a read timeout with USBTimeoutError (errno 110/ETIMEDOUT).
                if type(err).__name__ == "USBTimeoutError" or getattr(err, "errno", None) == 110:
                    return b""
                raise
            return bytes(data)

    async def write(self, data: bytes) -> None:
        """Send ``data`` over the bulk OUT endpoint."""
        if self._closed:
            raise DeviceUnavailable("USB device is released")
        try:
            await asyncio.to_thread(self._write_blocking, data)
        except Exception as err:  # pyusb raises USBError for unplug, pipe and access errors
            await self.close()
            raise DeviceUnavailable(f"USB write failed: {err}") from err

    async def read(self, max_bytes: int, timeout_s: float) -> bytes:
        """Return what the bulk IN endpoint delivers within ``timeout_s`` (b"" if nothing)."""
        if self._closed:
            raise DeviceUnavailable("USB device is released")
        try:
            return await asyncio.to_thread(self._read_blocking, max_bytes, timeout_s)
        except Exception as err:
            await self.close()
            raise DeviceUnavailable(f"USB read failed: {err}") from err

    async def close(self) -> None:
        """Release the device; idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._usb.close)


async def open_transport(endpoint: Endpoint, *, timeout_s: float) -> Transport:
    """Connect to ``endpoint`` within ``timeout_s``; DeviceUnavailable when it is not there."""
    if isinstance(endpoint, TcpEndpoint):
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.host, endpoint.port), timeout_s
            )
        except TimeoutError as err:
            raise DeviceUnavailable(
                f"tcp://{endpoint.host}:{endpoint.port}: no connection within {timeout_s:g} s"
            ) from err
        except OSError as err:
            raise DeviceUnavailable(f"tcp://{endpoint.host}:{endpoint.port}: {err}") from err
        return TcpTransport(reader, writer, write_timeout_s=max(timeout_s, 5.0))
    if isinstance(endpoint, SerialEndpoint):
        try:
            port = await asyncio.to_thread(
                SerialTransport.open_blocking, endpoint, max(timeout_s, 5.0)
            )
        except (serial.SerialException, OSError, ValueError, *_TERMIOS_ERRORS) as err:
            # termios.error is no OSError: a pty refusing 7-bit or parity settings raises it.
            raise DeviceUnavailable(f"serial {endpoint.path}: {err}") from err
        # A pty or a USB-serial adapter may still hold bytes from before a replug (§3.3.3).
        with contextlib.suppress(serial.SerialException, OSError):
            await asyncio.to_thread(port.reset_input_buffer)
        return SerialTransport(port)
    try:
        usb = await asyncio.to_thread(UsbTransport.open_blocking, endpoint, timeout_s)
    except DeviceError:
        raise
    except Exception as err:  # python-escpos raises DeviceNotFoundError, pyusb USBError
        raise DeviceUnavailable(
            f"usb://{endpoint.vendor_id:04x}:{endpoint.product_id:04x}: {err}"
        ) from err
    return UsbTransport(usb, endpoint)
