from __future__ import annotations

import asyncio
import os
import tty

import pytest

from drivers.base import DeviceError, DeviceUnavailable
from drivers.transport import (
    SerialEndpoint,
    TcpEndpoint,
    UsbEndpoint,
    open_transport,
    parse_device_url,
)


def test_a_tcp_url_gives_host_and_port() -> None:
    assert parse_device_url("tcp://192.168.1.50:9100") == TcpEndpoint("192.168.1.50", 9100)


def test_a_serial_url_gives_path_and_line_settings() -> None:
    endpoint = parse_device_url(
        "serial:///dev/ttyUSB0?baudrate=9600&bytesize=7&parity=E&stopbits=1&rtscts=0"
    )
    assert endpoint == SerialEndpoint(
        "/dev/ttyUSB0", baudrate=9600, bytesize=7, parity="E", stopbits=1.0, rtscts=False
    )


def test_a_serial_url_without_settings_defaults_to_9600_8n1() -> None:
    assert parse_device_url("serial:///dev/ttyS0") == SerialEndpoint("/dev/ttyS0")


def test_a_windows_com_port_is_not_taken_for_a_file() -> None:
    endpoint = parse_device_url("serial:///COM3?baudrate=19200")
    assert isinstance(endpoint, SerialEndpoint)
    assert endpoint.path == "COM3"


def test_a_usb_url_gives_vendor_and_product_ids() -> None:
    assert parse_device_url("usb://04b8:0202") == UsbEndpoint(0x04B8, 0x0202)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("tcp://printer", "port is missing"),
        ("tcp://printer:99999", "port is not a number"),
        ("tcp://:9100", "host is missing"),
        ("serial://dev/ttyUSB0", "three slashes"),
        ("serial:///dev/ttyUSB0?baudrate=fast", "baudrate='fast' is not a number"),
        ("serial:///dev/ttyUSB0?bytesize=9", "bytesize='9' must be one of 5, 6, 7, 8"),
        ("serial:///dev/ttyUSB0?parity=X", "parity='X' must be one of"),
        ("serial:///dev/ttyUSB0?stopbits=3", "stopbits='3' must be 1, 1.5 or 2"),
        ("serial:///dev/ttyUSB0?rtscts=maybe", "rtscts='maybe' must be 0 or 1"),
        ("serial:///dev/ttyUSB0?speed=9600", "unknown setting 'speed'"),
        ("usb://04b8", "usb://VID:PID"),
        ("usb://epson:0202", "vendor id 'epson'"),
        ("usb://04b8:12345", "product id '12345'"),
        ("lpt://1", "unknown scheme 'lpt'"),
    ],
)
def test_a_bad_url_is_refused_naming_the_wrong_part(url: str, message: str) -> None:
    with pytest.raises(DeviceError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_device_url(url)


async def test_tcp_transport_writes_reads_and_times_out_with_empty_bytes() -> None:
    received = asyncio.Queue[bytes]()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.put_nowait(await reader.readexactly(3))
        writer.write(b"\x12")
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        transport = await open_transport(TcpEndpoint("127.0.0.1", port), timeout_s=1)
        await transport.write(b"\x10\x04\x01")
        assert await asyncio.wait_for(received.get(), 1) == b"\x10\x04\x01"
        assert await transport.read(16, 1.0) == b"\x12"
        assert await transport.read(16, 0.05) == b""
        await transport.close()
        await transport.close()
        assert transport.closed


async def test_tcp_transport_reports_a_closed_connection_as_unavailable() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        transport = await open_transport(TcpEndpoint("127.0.0.1", port), timeout_s=1)
        with pytest.raises(DeviceUnavailable, match="closed the connection"):
            await transport.read(16, 1.0)
        assert transport.closed


async def test_tcp_connect_to_a_closed_port_is_unavailable() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(DeviceUnavailable, match=f"tcp://127.0.0.1:{port}"):
        await open_transport(TcpEndpoint("127.0.0.1", port), timeout_s=1)


async def test_serial_transport_talks_to_a_pty_both_ways() -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    path = os.ttyname(slave)
    try:
        transport = await open_transport(SerialEndpoint(path, baudrate=19200), timeout_s=1)
        await transport.write(b"W\r")
        got = b""
        while len(got) < 2:
            got += await asyncio.to_thread(os.read, master, 16)
        assert got == b"W\r"
        os.write(master, b"\x0212.345\r")
        data = b""
        while len(data) < 8:
            chunk = await transport.read(64, 1.0)
            assert chunk, "pty delivered nothing within 1 s"
            data += chunk
        assert data == b"\x0212.345\r"
        assert await transport.read(64, 0.1) == b""
        await transport.close()
        assert transport.closed
    finally:
        os.close(master)
        os.close(slave)


async def test_serial_transport_reports_an_unplugged_port_as_unavailable() -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    path = os.ttyname(slave)
    transport = await open_transport(SerialEndpoint(path), timeout_s=1)
    os.close(slave)
    os.close(master)  # the device side goes away
    with pytest.raises(DeviceUnavailable, match="read failed"):
        await transport.read(64, 1.0)
    assert transport.closed


async def test_opening_a_missing_serial_port_is_unavailable() -> None:
    with pytest.raises(DeviceUnavailable, match="/dev/ttyDoesNotExist0"):
        await open_transport(SerialEndpoint("/dev/ttyDoesNotExist0"), timeout_s=1)


async def test_usb_without_pyusb_fails_with_a_clear_error() -> None:
    pytest.importorskip("escpos.printer")
    try:
        import usb  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyusb is installed here; the missing-library path cannot be shown")
    with pytest.raises(DeviceError, match="pip install pyusb") as info:
        await open_transport(UsbEndpoint(0x04B8, 0x0202), timeout_s=1)
    assert not isinstance(info.value, DeviceUnavailable)
