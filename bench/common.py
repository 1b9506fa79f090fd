"""What every benchmark shares: result rows, a scratch directory on a real disk, I/O counters.

A benchmark module exposes ``run(args) -> list[Row]``; ``args`` carries ``quick`` (smaller
sizes, a smoke run), ``write`` (whether BENCHMARKS.md is being rewritten), ``root`` (a fresh
scratch directory on a disk-backed file system, made by ``scratch_dir``) and ``images``
(where plots go: ``docs/img`` with ``--write``, else the git-ignored ``bench/out``). The
runner in ``bench.run`` prints the rows, each with the command that reproduces it, and
writes them to BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# File systems that live in RAM: an fsync there costs nothing, so results would lie.
RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})
MIN_FREE_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class Row:
    """One measured figure, optionally set against a peer's value and a target."""

    figure: str
    value: float
    unit: str
    peer: str = ""
    peer_value: float | None = None
    ratio: float | None = None
    target: str = ""
    passed: bool | None = None
    note: str = ""
    # The command that reproduces this row; the runner fills in ``python -m bench NAME``
    # when a benchmark leaves it empty.
    command: str = ""

    @property
    def result(self) -> str:
        """"pass", "FAIL", or "" for a figure without a target."""
        if self.passed is None:
            return ""
        return "pass" if self.passed else "FAIL"


@dataclass(frozen=True)
class Mount:
    """The mount a path lives on, from /proc/mounts."""

    point: str
    device: str
    fstype: str


def mount_of(path: Path) -> Mount:
    """The longest mount point that holds ``path``."""
    real = os.path.realpath(path)
    best = Mount("/", "?", "?")
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            device, point, fstype, *_ = line.split()
            point = point.replace("\\040", " ")
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best.point):
                best = Mount(point, device, fstype)
    return best


def describe_disk(path: Path) -> str:
    """E.g. ``ext4 on /dev/vda (rotational=1, write cache: write back)``."""
    mount = mount_of(path)
    name = os.path.basename(mount.device)
    facts = []
    for label, rel in (("rotational", "queue/rotational"), ("write cache", "queue/write_cache")):
        with contextlib.suppress(OSError):
            facts.append(f"{label}={Path('/sys/block', name, rel).read_text().strip()}")
    extra = f" ({', '.join(facts)})" if facts else ""
    return f"{mount.fstype} on {mount.device}{extra}, mounted at {mount.point}"


@contextlib.contextmanager
def scratch_dir(base: Path, *, keep: bool = False) -> Iterator[Path]:
    """A fresh directory under ``base``; refuses RAM file systems and nearly full disks."""
    base.mkdir(parents=True, exist_ok=True)
    mount = mount_of(base)
    if mount.fstype in RAM_FILESYSTEMS:
        raise SystemExit(f"bench: {base} is on {mount.fstype} ({mount.point}); fsync would be"
                         " free there. Pass --dir on a disk-backed file system.")
    st = os.statvfs(base)
    if st.f_bavail * st.f_frsize < MIN_FREE_BYTES:
        raise SystemExit(f"bench: less than {MIN_FREE_BYTES >> 30} GiB free under {base}")
    root = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    try:
        yield root
    finally:
        if keep:
            print(f"bench: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def read_io() -> dict[str, int]:
    """This process's I/O counters (all threads, so aiosqlite's worker thread too)."""
    counters = {}
    with open("/proc/self/io", encoding="ascii") as io:
        for line in io:
            key, _, value = line.partition(":")
            counters[key] = int(value)
    return counters


class IoMeter:
    """Accumulates ``/proc/self/io`` deltas, and the items written, over measured blocks."""

    def __init__(self) -> None:
        self.write_bytes = 0  # bytes this process caused to be sent to storage
        self.wchar = 0  # bytes passed to write(2) and friends
        self.items = 0

    @contextlib.contextmanager
    def measure(self, items: int) -> Iterator[None]:
        """Add what the enclosed block, which writes ``items`` items, wrote to the totals."""
        before = read_io()
        yield
        after = read_io()
        self.write_bytes += after["write_bytes"] - before["write_bytes"]
        self.wchar += after["wchar"] - before["wchar"]
        self.items += items

    def per_item(self, counter: str) -> float:
        """``write_bytes`` or ``wchar`` per item written."""
        return float(getattr(self, counter)) / max(self.items, 1)


def at_least(value: float, bound: float) -> bool:
    """Target check that reads like the target text: ``value ≥ bound``."""
    return value >= bound


def at_most(value: float, bound: float) -> bool:
    """Target check that reads like the target text: ``value ≤ bound``."""
    return value <= bound


@contextlib.contextmanager
def child_server(module: str) -> Iterator[tuple[subprocess.Popen[str], Callable[[], Any]]]:
    """Run ``python -m module`` (a bench server that prints JSON lines and exits when its
    stdin closes); yield the process and a reader of its next line."""
    child = subprocess.Popen([sys.executable, "-m", module],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read() -> Any:
        assert child.stdout is not None
        return json.loads(child.stdout.readline())

    try:
        yield child, read
    finally:
        assert child.stdin is not None
        child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
