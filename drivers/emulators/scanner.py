"""A serial barcode scanner on a pty, and the pty plumbing the scale emulators share.

`PtyLink` is the "cable": a pty pair whose slave path is published under a stable symlink, as
``/dev/serial/by-id/…`` is for real adapters (hardware.md §3.3.1). ``unplug()`` closes the master
and removes the link (the driver's next read fails like a pulled USB adapter, §3.3.4);
``replug()`` creates a new pty, usually with another /dev/pts number, behind the same link.

`ScannerEmulator` types scans into the line the way scanners do (§4.1, §4.5): optional AIM
identifier, data, record suffix; optionally split into pieces with gaps, or several scans in one
write.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
import tty
from collections.abc import Iterable, Sequence
from pathlib import Path

SUFFIX_BYTES: dict[str, bytes] = {
    "CR": b"\r",
    "LF": b"\n",
    "CRLF": b"\r\n",
    "TAB": b"\t",
    "NONE": b"",
}


class PtyLink:
    """A pty pair behind a stable symlink, with unplug and replug."""

    def __init__(self, link: str | os.PathLike[str]) -> None:
        self.link = Path(link)
        self.master: int | None = None
        self._slave: int | None = None

    @property
    def url(self) -> str:
        """Return the ``serial://`` url a driver is configured with."""
        return f"serial://{self.link.absolute()}"

    @property
    def plugged(self) -> bool:
        """Tell whether the device is present."""
        return self.master is not None

    def plug(self) -> None:
        """Create the pty and publish its slave under the link."""
        if self.master is not None:
            return
        master, slave = os.openpty()
        # Raw before anyone opens it: a cooked pty would echo the host's requests back to us.
        tty.setraw(slave)
        self.master, self._slave = master, slave
        tmp = self.link.with_name(self.link.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(os.ttyname(slave))
        tmp.replace(self.link)  # atomic: the driver never sees a half-made link
        self._on_plug()

    def unplug(self) -> None:
        """Pull the cable: remove the link and close the pty (the driver's I/O fails)."""
        if self.master is None:
            return
        self._on_unplug()
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        master, slave = self.master, self._slave
        self.master = self._slave = None
        os.close(master)
        if slave is not None:
            os.close(slave)

    def replug(self) -> None:
        """Plug the device back in (a new pty behind the same link)."""
        self.unplug()
        self.plug()

    def close(self) -> None:
        """Unplug for good."""
        self.unplug()

    def write(self, data: bytes) -> None:
        """Send bytes towards the host."""
        if self.master is None:
            raise OSError("device is unplugged")
        view = memoryview(data)
        while view:
            written = os.write(self.master, view)
            view = view[written:]

    def _on_plug(self) -> None:
        """Start device logic (subclasses)."""

    def _on_unplug(self) -> None:
        """Stop device logic before the pty closes (subclasses)."""

    def __enter__(self) -> PtyLink:
        self.plug()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScannerEmulator(PtyLink):
    """A serial/USB-CDC barcode scanner that scans on command."""

    def __init__(
        self, link: str | os.PathLike[str], *, suffix: str = "CR", gap_s: float = 0.02
    ) -> None:
        super().__init__(link)
        self.suffix = SUFFIX_BYTES[suffix]
        self.gap_s = gap_s  # pause between pieces of a split scan, so they arrive apart

    def frame(self, code: str, symbology: str | None = "]E0") -> bytes:
        """Return the bytes one scan puts on the wire: AIM id, data, suffix."""
        return (symbology or "").encode("ascii") + code.encode("utf-8") + self.suffix

    def scan(
        self, code: str, symbology: str | None = "]E0", split: int | Sequence[int] | None = None
    ) -> None:
        """Scan ``code``; ``split`` cuts the frame at these byte offsets into separate writes."""
        self.send(self.frame(code, symbology), split)

    def scan_many(self, codes: Iterable[tuple[str, str | None]]) -> None:
        """Send several scans in a single write (a burst)."""
        self.write(b"".join(self.frame(code, aim) for code, aim in codes))

    def send(self, data: bytes, split: int | Sequence[int] | None = None) -> None:
        """Write raw bytes, cut at ``split`` offsets with a gap between the pieces."""
        cuts = [split] if isinstance(split, int) else list(split or [])
        bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
        for i, (start, end) in enumerate(itertools.pairwise(bounds)):
            if i:
                time.sleep(self.gap_s)
            self.write(data[start:end])
