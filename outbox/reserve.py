"""A disk reserve that keeps delivery going when the outbox's filesystem fills up.

When the disk is full, a claim or a settlement needs write room as much as an append does
(WAL frames), so a queue that lets appends take the last free block also stops its own
drain: the store is full *and* stuck. The reserve is a ballast file beside the database,
``<db>.reserve``, of ``size`` bytes of real blocks (allocated, not sparse). Appends may only
run while it is held:

- the first write that fails with a full disk releases it (deletes the file), so settles
  and claims have room again and delivery carries on;
- from then on appends are refused up front (``OutboxFull`` → HTTP 507 to the till), so the
  freed room stays for the relay;
- once the filesystem has ``2 × size`` free again (an operator freed space), the file is
  written back and appends resume. The hysteresis stops a disk on the edge from flapping.

A restart while released finds no file and too little room, so it starts refusing appends
too, as it should. ``size = 0`` turns the reserve off (appends run until the disk is full).

Every method does file I/O: the store calls them on a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

CHUNK = 1 << 20  # zeros written at a time where posix_fallocate is missing (Windows)
# Below this much free space a full-database error is the disk's, whatever the reserve size
# (a page-count or capacity limit leaves the disk roomy).
SHORT_BYTES = 1 << 20


class DiskReserve:
    """The ballast file ``path`` of ``size`` bytes and whether it is in place."""

    def __init__(self, path: Path, size: int) -> None:
        if size < 0:
            raise ValueError(f"a disk reserve cannot be negative ({size} bytes)")
        self.path = path
        self.size = size
        self.held = size == 0 or _size_of(path) == size

    def free_bytes(self) -> int:
        """Bytes free to this process on the reserve's filesystem."""
        return shutil.disk_usage(self.path.parent).free

    def disk_is_short(self) -> bool:
        """Whether the filesystem, not a database limit, is what ran out of room."""
        try:
            return self.free_bytes() < max(self.size, SHORT_BYTES)
        except OSError:
            return False  # cannot tell: keep the reserve rather than guess

    def hold(self) -> bool:
        """Put the reserve in place if there is room (``2 × size`` free); whether it is held."""
        if self.held:
            return True
        try:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a different size from an earlier config: start over
            if self.free_bytes() < 2 * self.size:
                return False
        except OSError:
            return False  # not ours to write here (permissions): appends stay refused
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            _allocate(partial, self.size)
            os.replace(partial, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                partial.unlink()
            return False
        self.held = True
        return True

    def release(self) -> bool:
        """Delete the reserve to give its room to deliveries; whether that room was freed."""
        if not self.held or self.size == 0:
            return False
        self.held = False  # even if the file will not go: appends must not take the room
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True


def _size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _allocate(path: Path, size: int) -> None:
    """Create ``path`` with ``size`` bytes of real blocks and make it durable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0),
                 0o600)
    try:
        fallocate = getattr(os, "posix_fallocate", None)
        if fallocate is not None:
            try:
                fallocate(fd, 0, size)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise  # ENOSPC and real errors; the others mean: write zeros instead
                fallocate = None
        if fallocate is None:
            zeros = bytes(CHUNK)
            left = size
            while left:
                left -= os.write(fd, zeros[:min(left, CHUNK)])
        os.fsync(fd)
    finally:
        os.close(fd)
