"""An ESC/POS network printer on 127.0.0.1 that behaves like the real ones (hardware.md §2.12).

* One client at a time: a second connection is accepted by TCP but not served until the first
  closes; an idle client is dropped after ``idle_timeout_s``.
* Real-time commands (DLE EOT 1-4, DLE DC4) are answered on reception, even when offline;
  printing stops while paper is out or the cover is open and resumes when cleared, and the
  GS ( H completion answer is withheld until the job before it has printed.
* Automatic status back (GS a) frames on enable and on every change of an enabled item.
* Records printed bytes per job (a job ends at a GS ( H request or at disconnect) and drawer
  pulses as (pin, on_ms, off_ms).
* Misbehaviour switches: ``silent`` (a clone that never answers status), ``unplug()``/``replug()``
  (power off: connections refused and the current one reset).

Status answers are encoded from the same tables the driver parses (drivers.escpos.status).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from drivers.escpos.status import StatusFacts, encode_asb, encode_dle_eot

# ASB enable bits (GS a) -> the facts whose change triggers a frame.
ASB_TRIGGERS: dict[int, tuple[str, ...]] = {
    0x01: ("drawer_pin3_high",),
    0x02: ("offline",),
    0x04: ("cover_open", "mechanical_error", "autocutter_error", "unrecoverable_error"),
    0x08: ("paper_near_end", "paper_out"),
}


@dataclass(frozen=True)
class DrawerPulse:
    """One drawer pulse the printer output."""

    pin: int
    on_ms: int
    off_ms: int


@dataclass
class PrintedJob:
    """Bytes printed between two job boundaries, and the GS ( H id that closed the job."""

    data: bytes
    process_id: bytes | None = None


@dataclass
class _Session:
    writer: asyncio.StreamWriter
    rx: bytearray = field(default_factory=bytearray)


class EscposPrinterEmulator:
    """A fake ESC/POS TCP printer with switchable paper, cover and misbehaviour states."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        idle_timeout_s: float = 5.0,
        supports_process_id: bool = True,
        asb_default_mask: int = 0,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.port = 0
        self.idle_timeout_s = idle_timeout_s
        self.supports_process_id = supports_process_id
        self.silent = False
        # The roll ends as the next print data arrives: models paper running out mid-job.
        self.run_out_on_next_print = False
        self.jobs: list[PrintedJob] = []
        self.pulses: list[DrawerPulse] = []
        self.received = bytearray()  # everything any client sent, for debugging tests
        self.connections = 0
        self._asb_default_mask = asb_default_mask
        self._asb_mask = asb_default_mask
        self._state = StatusFacts(
            drawer_pin3_high=False,
            offline=False,
            cover_open=False,
            feed_button=False,
            paper_end_stop=False,
            error=False,
            mechanical_error=False,
            autocutter_error=False,
            unrecoverable_error=False,
            auto_recoverable_error=False,
            paper_near_end=False,
            paper_out=False,
        )
        self._pending: list[bytes | tuple[str, bytes]] = []  # received, not yet printed
        self._current = bytearray()  # printed, job not yet closed
        self._server: asyncio.Server | None = None
        self._serve_lock = asyncio.Lock()
        self._session: _Session | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen on host:port (port 0 picks a free one, kept across replug)."""
        self._server = await asyncio.start_server(
            self._on_client, self.host, self.port or self._requested_port
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and drop every client."""
        await self.unplug()

    async def unplug(self) -> None:
        """Power off: refuse connections and reset the current one."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._session is not None:
            self._session.writer.transport.abort()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Power off loses the receive buffer and the ASB setting, like a real printer.
        self._pending.clear()
        self._asb_mask = self._asb_default_mask

    async def replug(self) -> None:
        """Power on again on the same port."""
        await self.start()

    # --- state switches --------------------------------------------------------------------------
    @property
    def state(self) -> StatusFacts:
        """Return the printer's current facts."""
        return self._state

    def set_state(self, **facts: bool) -> None:
        """Change facts (paper_out=True, cover_open=True, ...): ASB fires, printing resumes."""
        before = self._state
        derived = dict(facts)
        after = StatusFacts(**{**before.__dict__, **derived})
        # Derived bits, as a real printer sets them: paper end stops printing and takes the
        # printer offline; an open cover takes it offline; errors set the n=2 error bit.
        stopped = bool(after.paper_out)
        error = bool(
            after.mechanical_error
            or after.autocutter_error
            or after.unrecoverable_error
            or after.auto_recoverable_error
        )
        offline = bool(after.paper_out or after.cover_open or error or after.feed_button)
        after = StatusFacts(
            **{**after.__dict__, "paper_end_stop": stopped, "error": error, "offline": offline}
        )
        self._state = after
        self._send_asb_if_changed(before, after)
        self._print_pending()

    @property
    def paper_out(self) -> bool:
        """Tell whether the roll is empty."""
        return bool(self._state.paper_out)

    @paper_out.setter
    def paper_out(self, value: bool) -> None:
        self.set_state(paper_out=value)

    @property
    def paper_near_end(self) -> bool:
        """Tell whether the near-end sensor is on."""
        return bool(self._state.paper_near_end)

    @paper_near_end.setter
    def paper_near_end(self, value: bool) -> None:
        self.set_state(paper_near_end=value)

    @property
    def cover_open(self) -> bool:
        """Tell whether the cover is open."""
        return bool(self._state.cover_open)

    @cover_open.setter
    def cover_open(self, value: bool) -> None:
        self.set_state(cover_open=value)

    @property
    def asb_enabled(self) -> bool:
        """Tell whether the client enabled automatic status back."""
        return self._asb_mask != 0

    @property
    def printed(self) -> bytes:
        """Return all bytes printed so far, jobs concatenated."""
        return b"".join(job.data for job in self.jobs) + bytes(self._current)

    async def wait_for_jobs(self, count: int, timeout_s: float = 5.0) -> None:
        """Wait until ``count`` jobs have been printed."""
        async with asyncio.timeout(timeout_s):
            while len(self.jobs) < count:
                self._changed.clear()
                await self._changed.wait()

    # --- connection handling ---------------------------------------------------------------------
    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            # Accepted by the kernel, but served only when the previous client has gone.
            async with self._serve_lock:
                self.connections += 1
                self._session = _Session(writer)
                await self._serve(reader, self._session)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            self._end_session()
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, session: _Session) -> None:
        while True:
            try:
                data = await asyncio.wait_for(reader.read(4096), self.idle_timeout_s)
            except TimeoutError:
                return  # idle drop: the printer frees itself for the next client
            if not data:
                return
            self.received += data
            session.rx += data
            self._parse(session)

    def _end_session(self) -> None:
        self._session = None
        if self._current:
            self._close_job(None)

    def _send(self, data: bytes) -> None:
        if self._session is not None and not self.silent:
            self._session.writer.write(data)

    # --- command parsing (lengths from hardware.md §2.11) ----------------------------------------
    def _parse(self, session: _Session) -> None:
        rx = session.rx
        while rx:
            n = self._command_length(rx)
            if n is None:
                return  # incomplete command: wait for more bytes
            command = bytes(rx[:n])
            del rx[:n]
            self._execute(command)

    @staticmethod
    def _command_length(rx: bytearray) -> int | None:
        first = rx[0]
        need: int
        if first == 0x10:  # DLE: real-time commands
            if len(rx) < 3:
                return None
            if rx[1] == 0x14:
                need = {1: 5, 2: 5, 8: 10}.get(rx[2], 3)
            else:
                need = 3
        elif first == 0x1B:  # ESC
            if len(rx) < 2:
                return None
            second = rx[1]
            if second in (0x40, 0x32):
                need = 2
            elif second == 0x24:
                need = 4
            elif second == 0x70:
                need = 5
            elif second == 0x2A:
                if len(rx) < 5:
                    return None
                dots = rx[3] + 256 * rx[4]
                need = 5 + (dots if rx[2] in (0, 1) else 3 * dots)
            elif second == 0x63:
                need = 4
            else:
                need = 3
        elif first == 0x1D:  # GS
            if len(rx) < 2:
                return None
            second = rx[1]
            if second == 0x28:  # GS ( x pL pH ...
                if len(rx) < 5:
                    return None
                need = 5 + rx[3] + 256 * rx[4]
            elif second == 0x56:
                if len(rx) < 3:
                    return None
                need = 4 if rx[2] in (65, 66, 97, 98, 103, 104) else 3
            elif second == 0x6B:
                if len(rx) < 3:
                    return None
                if rx[2] <= 6:  # function A: NUL-terminated
                    end = rx.find(b"\x00", 3)
                    if end < 0:
                        return None
                    need = end + 1
                else:
                    if len(rx) < 4:
                        return None
                    need = 4 + rx[3]
            elif second == 0x76:
                if len(rx) < 8:
                    return None
                need = 8 + (rx[4] + 256 * rx[5]) * (rx[6] + 256 * rx[7])
            elif second in (0x4C, 0x57, 0x50):
                need = 4
            else:
                need = 3
        else:
            need = 1
        return need if len(rx) >= need else None

    def _execute(self, command: bytes) -> None:
        if command[:2] == b"\x10\x04":
            self._answer_dle_eot(command[2])
        elif command[:2] == b"\x10\x05":
            pass  # DLE ENQ: error recovery, not modelled
        elif command[:3] == b"\x10\x14\x01":
            # Real-time pulse: works even when offline; ON = OFF = t x 100 ms.
            t = command[4]
            self.pulses.append(DrawerPulse(2 if command[3] == 0 else 5, t * 100, t * 100))
        elif command[:2] == b"\x10\x14":
            pass
        elif command[:2] == b"\x1d\x61":
            self._asb_mask = command[2] & 0x0F
            if self._asb_mask:
                self._send(encode_asb(self._state))
        elif command[:3] == b"\x1d\x28\x48" and len(command) == 11 and command[5:7] == b"00":
            if self.supports_process_id:
                self._pending.append(("pid", command[7:11]))
                self._print_pending()
        elif command[:2] == b"\x1b\x70":
            # ESC p is buffered: it fires when printing reaches it, not while offline.
            self._pending.append(("pulse", command))
            self._print_pending()
        else:
            if self.run_out_on_next_print:
                self.run_out_on_next_print = False
                self.set_state(paper_out=True)
            self._pending.append(command)
            self._print_pending()

    def _answer_dle_eot(self, n: int) -> None:
        if n in (1, 2, 3, 4):
            self._send(bytes([encode_dle_eot(n, self._state)]))

    def _print_pending(self) -> None:
        # Printing stops while paper is out, the cover is open or in error; data waits.
        if self._state.offline:
            return
        for item in self._pending:
            if isinstance(item, bytes):
                self._current += item
            elif item[0] == "pid":
                self._close_job(item[1])
                self._send(b"\x37\x22" + item[1] + b"\x00")
            else:
                pulse = item[1]
                self.pulses.append(DrawerPulse(2 if pulse[2] in (0, 48) else 5,
                                               pulse[3] * 2, pulse[4] * 2))  # fmt: skip
        self._pending.clear()

    def _close_job(self, process_id: bytes | None) -> None:
        if not self._current:
            return  # a bare GS ( H (a driver's capability probe) prints nothing
        self.jobs.append(PrintedJob(bytes(self._current), process_id))
        self._current.clear()
        self._changed.set()

    def _send_asb_if_changed(self, before: StatusFacts, after: StatusFacts) -> None:
        if not self._asb_mask:
            return
        for bit, names in ASB_TRIGGERS.items():
            if self._asb_mask & bit and any(
                getattr(before, name) != getattr(after, name) for name in names
            ):
                self._send(encode_asb(after))
                return
