"""Soak sampling and analysis, plus the agent wrapper the soak runs.

The soak (``test_soak.py``) runs the real ``tillsync run`` for minutes under steady load and
a flapping cloud, and reads from outside, every few seconds, what a long-lived process leaks:

* resident set (``VmRSS``), its anonymous part (``RssAnon``: heap, not library pages) and
  thread count from ``/proc/<pid>/status``;
* open file descriptors, ``len(os.listdir("/proc/<pid>/fd"))``;
* the outbox files' sizes on disk: the database, its ``-wal`` and ``-shm``;
* the agent's own view from ``GET /v1/status``: pending, in doubt, live payload bytes.

``analyse`` splits the samples at the end of the warm-up and computes what the test asserts
and RELIABILITY.md reports: the least-squares RSS slope after warm-up, the maxima before and
after, and how much the database file grew in the second half of the post-warm-up window.

Run as a script (``python tests/system/soak.py run --config agent.toml``) this file is the
agent with one change: the retention purge runs every ``TILLSYNC_SOAK_PURGE_INTERVAL_S``
seconds instead of hourly. ``agent.runtime.PURGE_INTERVAL_S`` is a module constant, not a
config key, and the first purge would come an hour after start, later than a 30-minute soak
ends; without a purge the outbox grows by design (it keeps delivered payloads for
``retention_days``), so "no growth after warm-up" could not be judged. The purge code that
runs is the production code; only its schedule is compressed, together with
``retention_days``/``forget_after_days`` set to seconds in the soak's config.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import ctypes
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

PURGE_ENV = "TILLSYNC_SOAK_PURGE_INTERVAL_S"
# Set to a path prefix, the agent also dumps a tracemalloc snapshot every TRACE_EVERY_S
# seconds to "<prefix>.<seconds since start>": which Python allocations grow, if any.
TRACE_ENV = "TILLSYNC_SOAK_TRACE"
TRACE_EVERY_S = 60.0
# Set to a CSV path, the agent also logs SQLite's and glibc malloc's own memory figures every
# MEMORY_EVERY_S seconds: whose memory a growing RssAnon is.
MEMORY_ENV = "TILLSYNC_SOAK_MEMORY"
MEMORY_EVERY_S = 10.0


@dataclass(frozen=True)
class Sample:
    """One reading of the agent from outside, ``t`` seconds after the load started."""

    t: float
    rss_mb: float  # VmRSS, MB = 10^6 bytes
    fds: int
    threads: int
    db_bytes: int
    wal_bytes: int
    shm_bytes: int
    pending: int  # from /v1/status: deliveries owed to the cloud
    in_doubt: int
    live_bytes: int  # /v1/status outbox.bytes: sealed payload bytes still held
    acked: int  # sales the tills had been answered for, cumulative
    committed: int  # effects the cloud had committed, cumulative
    status_ms: float = 0.0  # how long GET /v1/status took: the agent's responsiveness
    # The longest event-loop stall of the *test* process (tills, stand-in cloud) since the
    # previous sample: the checker's timing judgements assume it stays small.
    loop_lag_ms: float = 0.0
    # RssAnon: the heap and other private memory, without the pages of mapped libraries
    # (which come and go with the page cache). A leak shows here.
    rss_anon_mb: float = 0.0

    @property
    def outbox_bytes(self) -> int:
        """The outbox's footprint on disk: database, WAL and shared-memory index."""
        return self.db_bytes + self.wal_bytes + self.shm_bytes


def proc_status(pid: int) -> tuple[float, float, int]:
    """(VmRSS in MB, RssAnon in MB, thread count) of ``pid`` from ``/proc/<pid>/status``."""
    rss_kb = anon_kb = threads = None
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                anon_kb = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    if rss_kb is None or anon_kb is None or threads is None:
        raise RuntimeError(f"no VmRSS/RssAnon/Threads for process {pid}")
    return rss_kb * 1024 / 1e6, anon_kb * 1024 / 1e6, threads


def open_fds(pid: int) -> int:
    """How many file descriptors ``pid`` has open (sockets, SQLite files, pipes, ...)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def file_size(path: Path) -> int:
    """Size of ``path`` in bytes, 0 when it does not exist (the WAL comes and goes)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def read_sample(t: float, pid: int, db: Path, status: dict[str, Any], acked: int,
                committed: int, *, status_ms: float = 0.0, loop_lag_ms: float = 0.0) -> Sample:
    """Read one ``Sample`` of process ``pid`` whose outbox is ``db``."""
    rss, anon, threads = proc_status(pid)
    outbox = status["outbox"]
    return Sample(
        t=round(t, 2), rss_mb=round(rss, 2), fds=open_fds(pid), threads=threads,
        db_bytes=file_size(db), wal_bytes=file_size(db.with_name(db.name + "-wal")),
        shm_bytes=file_size(db.with_name(db.name + "-shm")),
        pending=int(outbox["pending"]), in_doubt=int(outbox["in_doubt"]),
        live_bytes=int(outbox["bytes"] or 0), acked=acked, committed=committed,
        status_ms=round(status_ms, 1), loop_lag_ms=round(loop_lag_ms, 1),
        rss_anon_mb=round(anon, 2))


class LoopLag:
    """Measures how late this process's event loop wakes a 10 ms sleeper (its stalls)."""

    TICK_S = 0.01

    def __init__(self) -> None:
        self.worst_s = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Sleep ``TICK_S`` at a time until ``stop``; keep the worst overshoot."""
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(self.TICK_S)
            self.worst_s = max(self.worst_s, time.monotonic() - before - self.TICK_S)

    def take_ms(self) -> float:
        """The worst stall since the last call, in ms; starts a new window."""
        worst, self.worst_s = self.worst_s, 0.0
        return 1000 * worst


def retry_after_details(cloud: Any, grace_s: float) -> list[dict[str, float]]:
    """The requests the harness's checker counts as Retry-After violations, with timing:
    how long after the answer each arrived and how long before the deadline, so a report can
    tell an agent ignoring the header (arrives well inside the window) from one that sent
    before it could have read the answer (arrives just past the grace)."""
    # Imported here: this module is also the agent's wrapper script, which needs none of it.
    from tests.system.harness import early_requests

    return [{"at": round(e.at, 3), "after_answer_s": round(e.after_answer_s, 3),
             "before_deadline_s": round(e.before_deadline_s, 3)}
            for e in early_requests(cloud, grace_s=grace_s)]


async def sample_every(interval_s: float, stop: asyncio.Event,
                       take: Callable[[float], Awaitable[Sample]],
                       samples: list[Sample]) -> None:
    """Append ``await take(t)`` to ``samples`` every ``interval_s`` until ``stop`` is set.

    The schedule is absolute (``t0 + k * interval``) so a slow reading does not stretch the
    time axis the slope is fitted on.
    """
    t0 = time.monotonic()
    k = 0
    while not stop.is_set():
        samples.append(await take(time.monotonic() - t0))
        k += 1
        delay = t0 + k * interval_s - time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, delay))


# -- the analysis ---------------------------------------------------------------------------


def slope_per_hour(ts: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``ts`` (seconds), per hour."""
    if len(ts) < 2:
        return 0.0
    return statistics.linear_regression(ts, ys).slope * 3600


@dataclass(frozen=True)
class Summary:
    """The figures the soak asserts and RELIABILITY.md reports."""

    duration_s: float
    warm_up_s: float
    samples: int
    offered_per_s: float  # sales the tills answered per second over the load phase
    rss_start_mb: float
    rss_warm_max_mb: float  # highest RSS during warm-up
    rss_after_warm_mb: float  # first sample after warm-up
    rss_post_max_mb: float  # highest RSS after warm-up (load phase)
    rss_end_mb: float  # last sample of the load phase
    rss_drained_mb: float  # after the tills stopped and the backlog drained
    rss_slope_mb_per_h: float  # least squares over the post-warm-up samples
    rss_slope_late_mb_per_h: float  # the same over the second half of them
    anon_slope_late_mb_per_h: float  # RssAnon's, over the second half
    fds_start: int
    fds_warm_max: int
    fds_post_max: int
    fds_drained: int
    threads_warm_max: int
    threads_post_max: int
    outbox_start_bytes: int
    outbox_warm_max_bytes: int
    outbox_post_max_bytes: int
    outbox_end_bytes: int
    db_mid_bytes: int  # database file at the middle of the post-warm-up window
    db_end_bytes: int  # database file at the end of the load phase
    db_slope_bytes_per_h: float  # least squares over the second half after warm-up
    pending_max: int
    pending_post_max: int
    status_max_ms: float  # slowest GET /v1/status during the load
    loop_lag_max_ms: float  # worst stall of the test process's loop during the load

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain JSON-able values."""
        return {k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in asdict(self).items()}


def warm_up_s(duration_s: float) -> float:
    """The warm-up: the first 25 % of the run, at least 20 s."""
    return max(20.0, 0.25 * duration_s)


def analyse(load: Sequence[Sample], drained: Sample, duration_s: float) -> Summary:
    """Split the load-phase samples at the warm-up and compute the summary figures."""
    warm = warm_up_s(duration_s)
    before = [s for s in load if s.t < warm]
    after = [s for s in load if s.t >= warm]
    if len(before) < 2 or len(after) < 4:
        raise ValueError(f"too few samples: {len(before)} in warm-up, {len(after)} after")
    mid_t = (after[0].t + after[-1].t) / 2
    second_half = [s for s in after if s.t >= mid_t]
    mid = second_half[0]
    last = load[-1]
    return Summary(
        duration_s=round(last.t, 1), warm_up_s=warm, samples=len(load),
        offered_per_s=(last.acked - load[0].acked) / max(last.t - load[0].t, 1e-9),
        rss_start_mb=load[0].rss_mb, rss_warm_max_mb=max(s.rss_mb for s in before),
        rss_after_warm_mb=after[0].rss_mb, rss_post_max_mb=max(s.rss_mb for s in after),
        rss_end_mb=last.rss_mb, rss_drained_mb=drained.rss_mb,
        rss_slope_mb_per_h=slope_per_hour([s.t for s in after], [s.rss_mb for s in after]),
        rss_slope_late_mb_per_h=slope_per_hour([s.t for s in second_half],
                                               [s.rss_mb for s in second_half]),
        anon_slope_late_mb_per_h=slope_per_hour([s.t for s in second_half],
                                                [s.rss_anon_mb for s in second_half]),
        fds_start=load[0].fds, fds_warm_max=max(s.fds for s in before),
        fds_post_max=max(s.fds for s in after), fds_drained=drained.fds,
        threads_warm_max=max(s.threads for s in before),
        threads_post_max=max(s.threads for s in after),
        outbox_start_bytes=load[0].outbox_bytes,
        outbox_warm_max_bytes=max(s.outbox_bytes for s in before),
        outbox_post_max_bytes=max(s.outbox_bytes for s in after),
        outbox_end_bytes=last.outbox_bytes, db_mid_bytes=mid.db_bytes,
        db_end_bytes=last.db_bytes,
        db_slope_bytes_per_h=slope_per_hour([s.t for s in second_half],
                                            [s.db_bytes for s in second_half]),
        pending_max=max(s.pending for s in load),
        pending_post_max=max(s.pending for s in after),
        status_max_ms=max(s.status_ms for s in load),
        loop_lag_max_ms=max(s.loop_lag_ms for s in load))


# -- reporting ------------------------------------------------------------------------------

TABLE = (("t s", "t", "{:.0f}"), ("RSS MB", "rss_mb", "{:.1f}"),
         ("anon MB", "rss_anon_mb", "{:.1f}"), ("fds", "fds", "{}"),
         ("thr", "threads", "{}"), ("db KB", "db_bytes", "{:.0f}"),
         ("wal KB", "wal_bytes", "{:.0f}"), ("shm KB", "shm_bytes", "{:.0f}"),
         ("pending", "pending", "{}"), ("live KB", "live_bytes", "{:.0f}"),
         ("acked", "acked", "{}"), ("committed", "committed", "{}"),
         ("status ms", "status_ms", "{:.0f}"), ("lag ms", "loop_lag_ms", "{:.0f}"))
KB_FIELDS = {"db_bytes", "wal_bytes", "shm_bytes", "live_bytes"}


def table(samples: Sequence[Sample], rows: int = 25) -> str:
    """A compact fixed-width time series: at most ``rows`` evenly spaced samples + the last."""
    step = max(1, len(samples) // rows)
    picked = list(samples[::step])
    if picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    cells = [[h for h, _, _ in TABLE]]
    for s in picked:
        cells.append([fmt.format(getattr(s, name) / 1024 if name in KB_FIELDS
                                 else getattr(s, name)) for _, name, fmt in TABLE])
    widths = [max(len(row[i]) for row in cells) for i in range(len(TABLE))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                     for row in cells)


def write_report(path: Path, samples: Sequence[Sample], drained: Sample, summary: Summary,
                 facts: dict[str, Any]) -> None:
    """Write the run as JSON (summary, facts, every sample) or, for ``*.csv``, the samples."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow([f.name for f in fields(Sample)] + ["phase"])
            for s in samples:
                writer.writerow([*astuple_ordered(s), "load"])
            writer.writerow([*astuple_ordered(drained), "drained"])
        return
    path.write_text(json.dumps({"summary": summary.as_dict(), "facts": facts,
                                "samples": [asdict(s) for s in samples],
                                "drained": asdict(drained)}, indent=1) + "\n")


def astuple_ordered(sample: Sample) -> list[Any]:
    """The sample's fields in declaration order."""
    return [getattr(sample, f.name) for f in fields(Sample)]


# -- the agent with a compressed purge schedule --------------------------------------------


def run_agent(argv: Sequence[str]) -> int:
    """``tillsync`` with the purge job every ``$TILLSYNC_SOAK_PURGE_INTERVAL_S`` seconds (and
    tracemalloc snapshots when ``$TILLSYNC_SOAK_TRACE`` is set)."""
    import agent.runtime
    from agent.cli import main

    trace = os.environ.get(TRACE_ENV)
    if trace:
        trace_allocations(trace)
    memory = os.environ.get(MEMORY_ENV)
    if memory:
        sample_memory(Path(memory))
    interval = os.environ.get(PURGE_ENV)
    if interval:
        # Read by Agent._scheduler_ctx when it adds the job, i.e. after this assignment.
        agent.runtime.PURGE_INTERVAL_S = float(interval)  # type: ignore[assignment]
    return int(main(list(argv)) or 0)


def trace_allocations(prefix: str) -> None:
    """Trace allocations made from now on; dump a snapshot every ``TRACE_EVERY_S`` seconds.

    Started after the agent's imports, so the snapshots hold what the running agent
    allocates. Compare two with ``Snapshot.load(b).compare_to(Snapshot.load(a), "lineno")``.
    Tracing slows the agent and inflates its RSS: a traced run's RSS figures mean nothing.
    """
    import threading
    import tracemalloc

    tracemalloc.start(12)
    started = time.monotonic()

    def dump() -> None:
        while True:
            time.sleep(TRACE_EVERY_S)
            age = int(time.monotonic() - started)
            tracemalloc.take_snapshot().dump(f"{prefix}.{age:05d}")

    threading.Thread(target=dump, name="soak-tracemalloc", daemon=True).start()


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (2.33+): size_t fields, so no 2 GB wrap like mallinfo().
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


MEMORY_COLUMNS = ("t", "rss_anon_kB", "sqlite_used", "sqlite_highwater", "sqlite_pagecache",
                  "malloc_arena", "malloc_mmap", "malloc_in_use", "malloc_free", "py_blocks")


def sample_memory(path: Path) -> None:
    """Log, every ``MEMORY_EVERY_S`` seconds, who holds the agent's heap, to a CSV at ``path``.

    * ``sqlite_used``/``sqlite_highwater``: ``sqlite3_status64(SQLITE_STATUS_MEMORY_USED)``,
      every byte SQLite has malloc'ed (page caches, schemas, statements) across connections;
      ``sqlite_pagecache``: its page-cache overflow, the page caches alone (no
      ``SQLITE_CONFIG_PAGECACHE`` buffer is set, so all of them overflow to malloc).
    * ``malloc_*``: glibc's ``mallinfo2()``: bytes the main arena got from ``brk``, bytes in
      ``mmap``ed chunks, bytes in use and bytes free inside the arenas (fragmentation).
    * ``py_blocks``: ``sys.getallocatedblocks()``, Python objects alive.

    Reads the same ``libsqlite3.so.0`` the ``sqlite3`` module is linked to, from a daemon
    thread; the figures are process-wide and cost microseconds to read.
    """
    import threading

    sqlite = ctypes.CDLL("libsqlite3.so.0")
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    memory_used, pagecache_overflow = 0, 2  # SQLITE_STATUS_MEMORY_USED, _PAGECACHE_OVERFLOW
    started = time.monotonic()

    def status(op: int) -> tuple[int, int]:
        current, highwater = ctypes.c_int64(), ctypes.c_int64()
        sqlite.sqlite3_status64(op, ctypes.byref(current), ctypes.byref(highwater), 0)
        return current.value, highwater.value

    def log() -> None:
        with path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(MEMORY_COLUMNS)
            while True:
                used, highwater = status(memory_used)
                info = libc.mallinfo2()
                _, anon_mb, _ = proc_status(os.getpid())
                writer.writerow((round(time.monotonic() - started, 1), round(anon_mb * 1e3),
                                 used, highwater,
                                 status(pagecache_overflow)[0], info.arena, info.hblkhd,
                                 info.uordblks, info.fordblks, sys.getallocatedblocks()))
                out.flush()
                time.sleep(MEMORY_EVERY_S)

    threading.Thread(target=log, name="soak-memory", daemon=True).start()


if __name__ == "__main__":
    sys.exit(run_agent(sys.argv[1:]))
