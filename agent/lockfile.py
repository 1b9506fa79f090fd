"""One process at a time on an outbox: an exclusive lock on ``<outbox.path>.lock``.

SQLite here must have a single writer (the WAL-reset bug of SQLite ≤ 3.51.2), so a second
``tillsync run`` on the same database, or an operator command opening it directly while the
agent runs, is refused instead of risking the queue. ``flock`` locks vanish with the
process, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


class LockHeld(Exception):
    """Another process holds the outbox; ``path`` is its database."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"another tillsync process is using {path}")
        self.path = path


def lock_path(db_path: Path) -> Path:
    """Where the lock for ``db_path`` lives."""
    return db_path.with_name(db_path.name + ".lock")


@contextlib.contextmanager
def exclusive(db_path: Path) -> Iterator[None]:
    """Hold the outbox's lock for the ``with`` block; ``LockHeld`` when taken."""
    if sys.platform == "win32":  # the MSI installs one service; nothing to race with
        yield
        return
    import fcntl

    path = lock_path(db_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockHeld(db_path) from None
        yield
    finally:
        os.close(fd)  # closing drops the lock
