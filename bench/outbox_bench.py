"""Outbox benchmark: durable appends, claim+settle, a big queue, and bytes written per event.

Everything runs in one process, on real files under ``args.root`` (a disk, never tmpfs), at
durability "full", beside two peers on the same disk with the same payload bytes:
persist-queue's ``SQLiteAckQueue`` and raw ``sqlite3`` with one INSERT+COMMIT per row (WAL,
``synchronous=FULL``). Each figure is the median of ``reps`` runs, and each outbox run comes
right after the run it is compared with, so a busy machine slows both sides alike.

- appends: N producer coroutines, each appending one ~450-byte sale and awaiting it, over
  8 streams (terminals); the outbox group-commits whatever is waiting.
- claim+settle: on a store filled over 64 streams (a claim returns at most one delivery
  per stream), workers claim, then settle what they got as DELIVERED, until N are settled.
- big queue: a store filled with ``append_many`` batches of 1000, closed and reopened;
  open-to-ready is the time ``Outbox.open`` takes to return. Its append and claim+settle
  rates are set against a fresh store's, in alternating runs.
- bytes per event: ``/proc/self/io`` deltas around the append runs. aiosqlite runs SQLite in
  a thread of this process, so its writes are counted; the file system journal is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import persistqueue

from bench.common import IoMeter, Row, at_least, at_most
from outbox import Delivery, NewEvent, Outbox, Settlement, Verdict

SINK = "cloud"
APPEND_STREAMS = 8  # terminals of one store
CLAIM_STREAMS = 64  # a claim returns at most one delivery per stream
FILL_BATCH = 1000
APPEND_TARGET = 10.0  # appends/s at 64 producers ÷ persist-queue put/s
CLAIM_TARGET = 5.0  # claim+settle/s ÷ persist-queue get+ack/s
OPEN_TARGET_S = 1.0
BIG_TARGET = 0.80  # big-store rate ÷ fresh-store rate: within 20%

# A retail sale as a till would send it; every system under test gets these same bytes.
SALE = {
    "type": "sale", "store": "S0042", "till": "T03", "receipt": "S0042-T03-000123456",
    "at": "2025-06-14T10:32:07.512+02:00", "currency": "EUR",
    "lines": [
        {"sku": "4006381333931", "name": "Pencils HB x12", "qty": 2, "unit": "3.49", "vat": 19},
        {"sku": "5449000000996", "name": "Cola 1.5 l", "qty": 1, "unit": "1.79", "vat": 19},
        {"sku": "4008400402222", "name": "Chocolate 100 g", "qty": 3, "unit": "1.29", "vat": 7},
    ],
    "total": "12.64",
    "payments": [{"method": "card", "amount": "12.64", "auth": "A1B2C3"}],
}
PAYLOAD = json.dumps(SALE, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does."""

    appends: tuple[tuple[int, int], ...]  # (producers, events per run)
    claims: int  # deliveries settled per claim+settle run
    peer_puts: int  # items per persist-queue put run and raw sqlite3 run
    peer_acks: int  # items per persist-queue get+ack run (its get slows as acks pile up)
    big: int  # events queued in the big store
    reps: int  # runs per figure; the median is reported


FULL = Sizes(appends=((1, 2000), (16, 10_000), (64, 20_000)), claims=10_000,
             peer_puts=4000, peer_acks=2000, big=1_000_000, reps=5)
QUICK = Sizes(appends=((1, 300), (16, 2000), (64, 5000)), claims=4000,
              peer_puts=1000, peer_acks=1000, big=100_000, reps=1)


@dataclass(frozen=True)
class Run:
    """One timed run: how many operations, how long, how many writer commits."""

    ops: int
    seconds: float
    commits: int = 0
    empty_claims: int = 0

    @property
    def rate(self) -> float:
        """Operations per second."""
        return self.ops / self.seconds


@dataclass
class Results:
    """Everything measured, by name; turned into rows at the end."""

    sizes: Sizes
    runs: dict[str, Run] = field(default_factory=dict)  # median runs
    io: dict[str, IoMeter] = field(default_factory=lambda: defaultdict(IoMeter))
    facts: dict[str, Any] = field(default_factory=dict)

    def keep_medians(self, samples: dict[str, list[Run]]) -> None:
        """Record the median run of each named group of samples."""
        self.runs.update({name: median_run(group) for name, group in samples.items()})


def run(args: Any) -> list[Row]:
    """Run the outbox benchmark in ``args.root``; ``args.quick`` selects the small sizes."""
    res = Results(QUICK if args.quick else FULL)
    asyncio.run(measure(Path(args.root), res))
    return build_rows(res)


async def measure(root: Path, res: Results) -> None:
    """Appends and claims on fresh stores (each beside its peer), then the big store."""
    res.facts["pq_pragmas"] = pq_pragmas(root / "peers" / "pragmas")
    await measure_appends(root, res)
    await measure_claims(root, res)
    await measure_big_store(root, res)


# -- helpers ---------------------------------------------------------------------------------


_SEQ = itertools.count(1)


def new_event(streams: int) -> NewEvent:
    """A sale from one of ``streams`` tills, with fresh keys (receipt-number style)."""
    seq = next(_SEQ)
    till = f"till-{seq % streams:02d}"
    return NewEvent(stream=till, kind="sale", payload=PAYLOAD, sinks=(SINK,),
                    idempotency_key=f"idem-{seq:012d}", dedupe_key=f"{till}/{seq:012d}")


def timed(ops: int, fn: Callable[[], object]) -> Run:
    """Time ``fn()``, which does ``ops`` operations."""
    start = time.perf_counter()
    fn()
    return Run(ops, time.perf_counter() - start)


def median_run(runs: list[Run]) -> Run:
    """The run with the median rate (the upper one for an even count)."""
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


# -- peers (synchronous; run in a worker thread so the event loop stays free) ----------------


def pq_open(path: Path) -> persistqueue.SQLiteAckQueue:
    """A persist-queue ack queue as its docs suggest for threads: auto-commit, two conns."""
    return persistqueue.SQLiteAckQueue(str(path), auto_commit=True, multithreading=True)


def pq_pragmas(path: Path) -> str:
    """The journal and sync mode persist-queue actually runs with (it sets only WAL)."""
    queue = pq_open(path)
    try:
        conn = getattr(queue, "_putter")  # noqa: B009  (private: every put and ack commits on it)
        (journal,) = conn.execute("PRAGMA journal_mode").fetchone()
        (sync,) = conn.execute("PRAGMA synchronous").fetchone()
    finally:
        queue.close()
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    return f"journal_mode={journal}, synchronous={sync} ({names.get(sync, '?')})"


def pq_put(path: Path, n: int, threads: int, meter: IoMeter) -> Run:
    """``threads`` threads putting ``n`` items in all, one auto-committed put at a time."""
    queue = pq_open(path)
    per = n // threads

    def putter() -> None:
        for _ in range(per):
            queue.put(PAYLOAD)

    workers = [threading.Thread(target=putter) for _ in range(threads)]

    def go() -> None:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    try:
        with meter.measure(per * threads):
            return timed(per * threads, go)
    finally:
        queue.close()


def pq_get_ack(path: Path, n: int) -> Run:
    """get+ack draining a queue of ``n`` items, one thread (the puts are not timed)."""
    queue = pq_open(path)

    def drain() -> None:
        for _ in range(n):
            item = queue.get(block=False, raw=True)
            queue.ack(id=item["pqid"])

    try:
        for _ in range(n):
            queue.put(PAYLOAD)
        return timed(n, drain)
    finally:
        queue.close()


def raw_sqlite_insert(path: Path, n: int) -> Run:
    """Single-row INSERT+COMMIT, WAL and synchronous=FULL."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")

    def insert() -> None:
        for _ in range(n):
            conn.execute("BEGIN")
            conn.execute("INSERT INTO q (payload) VALUES (?)", (PAYLOAD,))
            conn.execute("COMMIT")

    try:
        return timed(n, insert)
    finally:
        conn.close()


# -- outbox runs -----------------------------------------------------------------------------


async def open_store(root: Path, name: str) -> Outbox:
    """Open (or create) the outbox ``name`` under ``root`` at durability "full"."""
    return await Outbox.open(root / f"{name}.db", root / f"{name}.key", durability="full",
                             create_key=True)


async def append_run(store: Outbox, producers: int, n: int,
                     meter: IoMeter | None = None) -> Run:
    """``producers`` coroutines append ``n`` events in all, one at a time, awaiting each."""
    per = n // producers

    async def producer() -> None:
        for _ in range(per):
            await store.append(new_event(APPEND_STREAMS))

    commits = store.commits
    with meter.measure(per * producers) if meter else contextlib.nullcontext():
        start = time.perf_counter()
        await asyncio.gather(*(producer() for _ in range(producers)))
        seconds = time.perf_counter() - start
    return Run(per * producers, seconds, store.commits - commits)


async def fill(store: Outbox, n: int, streams: int) -> Run:
    """Queue ``n`` events with ``append_many`` batches of ``FILL_BATCH``."""
    start = time.perf_counter()
    for done in range(0, n, FILL_BATCH):
        batch = [new_event(streams) for _ in range(min(FILL_BATCH, n - done))]
        await store.append_many(batch)
    return Run(n, time.perf_counter() - start)


async def claim_settle_run(store: Outbox, workers: int, per_claim: int, n: int) -> Run:
    """``workers`` coroutines claim ``per_claim`` and settle them DELIVERED until ``n`` are."""
    settled = in_flight = empty = 0
    seen: set[int] = set()

    async def worker() -> None:
        nonlocal settled, in_flight, empty
        while settled < n:
            got = await store.claim(SINK, per_claim)
            if not got:
                if not in_flight:
                    raise RuntimeError(f"store drained after {settled} of {n} settles")
                empty += 1  # every stream head is with another worker
                await asyncio.sleep(0)
                continue
            check_claim(got, seen)
            in_flight += len(got)
            await store.settle([Settlement(d.event_id, d.sink, Verdict.DELIVERED) for d in got])
            in_flight -= len(got)
            settled += len(got)

    commits = store.commits
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    seconds = time.perf_counter() - start
    return Run(settled, seconds, store.commits - commits, empty)


def check_claim(got: list[Delivery], seen: set[int]) -> None:
    """A claim hands out each delivery once, and at most one per stream."""
    ids = {d.event_id for d in got}
    if len({d.stream for d in got}) != len(got) or ids & seen:
        raise RuntimeError(f"claim broke its promise: {[(d.event_id, d.stream) for d in got]}")
    seen |= ids


# -- phases ----------------------------------------------------------------------------------


async def measure_appends(root: Path, res: Results) -> None:
    """Per rep: raw sqlite3, then for 1/16/64: persist-queue puts, then outbox appends."""
    sizes, peers = res.sizes, root / "peers"
    samples: dict[str, list[Run]] = defaultdict(list)
    store = await open_store(root, "appends")
    try:
        for rep in range(sizes.reps):
            samples["raw_sqlite"].append(await asyncio.to_thread(
                raw_sqlite_insert, peers / f"raw-{rep}.db", sizes.peer_puts))
            for producers, n in sizes.appends:
                put, add = f"pq_put_{producers}", f"append_{producers}"
                samples[put].append(await asyncio.to_thread(
                    pq_put, peers / f"{put}-{rep}", sizes.peer_puts, producers, res.io[put]))
                samples[add].append(await append_run(store, producers, n, res.io[add]))
    finally:
        await store.close()
    res.keep_medians(samples)


async def measure_claims(root: Path, res: Results) -> None:
    """Per rep: persist-queue get+ack, then claim+settle 1 × 64 and 8 × 8 (64 streams)."""
    sizes = res.sizes
    samples: dict[str, list[Run]] = defaultdict(list)
    store = await open_store(root, "claims")
    try:
        await fill(store, 2 * sizes.reps * sizes.claims + 2 * FILL_BATCH, CLAIM_STREAMS)
        for rep in range(sizes.reps):
            samples["pq_get_ack"].append(await asyncio.to_thread(
                pq_get_ack, root / "peers" / f"ack-{rep}", sizes.peer_acks))
            samples["claim_1x64"].append(await claim_settle_run(store, 1, 64, sizes.claims))
            samples["claim_8x8"].append(await claim_settle_run(store, 8, 8, sizes.claims))
    finally:
        await store.close()
    res.keep_medians(samples)


async def measure_big_store(root: Path, res: Results) -> None:
    """Fill; open cold and warm; rates right after open, then alternating with a fresh twin."""
    path, key = root / "big.db", root / "big.key"
    store = await open_store(root, "big")
    try:
        res.runs["fill"] = await fill(store, res.sizes.big, CLAIM_STREAMS)
    finally:
        await store.close()
    res.facts["big_db_bytes"] = path.stat().st_size
    await measure_cold_open(path, key, res)
    store, res.facts["open_warm"], check = await timed_open(path, key)
    try:
        n64 = dict(res.sizes.appends)[64]
        res.runs["big_append_checking"] = await append_run(store, 64, n64)
        res.facts["check_running_after_append"] = not check.done()
        res.facts["check_warm"] = await check
        await compare_with_twin(root, store, res)
    finally:
        await store.close()


async def measure_cold_open(path: Path, key: Path, res: Results) -> None:
    """From a cold page cache: open then close at once; then open and wait for the check."""
    evict_from_page_cache(path)
    store, res.facts["open_cold"], check = await timed_open(path, key)
    start = time.perf_counter()
    await store.close()  # the background quick_check is still reading the file
    res.facts["close_while_checking"] = time.perf_counter() - start
    check.cancel()
    evict_from_page_cache(path)
    store, _, check = await timed_open(path, key)
    try:
        res.facts["check_cold"] = await check
    finally:
        await store.close()


async def compare_with_twin(root: Path, big: Outbox, res: Results) -> None:
    """Alternate runs on the big store and a fresh twin, so drift and noise hit both alike."""
    sizes = res.sizes
    n64 = dict(sizes.appends)[64]
    samples: dict[str, list[Run]] = defaultdict(list)
    twin = await open_store(root, "twin")
    try:
        await fill(twin, sizes.reps * sizes.claims + 2 * FILL_BATCH, CLAIM_STREAMS)
        for _ in range(sizes.reps):
            for name, store in (("twin", twin), ("big", big)):
                samples[f"{name}_append"].append(await append_run(store, 64, n64))
                samples[f"{name}_claim"].append(
                    await claim_settle_run(store, 8, 8, sizes.claims))
    finally:
        await twin.close()
    res.keep_medians(samples)


async def timed_open(path: Path, key: Path) -> tuple[Outbox, float, asyncio.Task[float]]:
    """Open an existing store: (store, seconds until ``open`` returned, check task).

    The store runs ``PRAGMA quick_check`` in the background after ``open`` returns; the
    task yields the seconds from the start of ``open`` to the end of that check.
    """
    start = time.perf_counter()
    store = await Outbox.open(path, key, durability="full")
    opened = time.perf_counter() - start

    async def checked() -> float:
        problems = await store.verified()
        if problems:
            raise RuntimeError(f"quick_check failed on {path}: {problems}")
        return time.perf_counter() - start

    return store, opened, asyncio.create_task(checked())


def evict_from_page_cache(path: Path) -> None:
    """Drop the database's pages from the OS page cache, as after a reboot (Linux)."""
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError), _fd(name) as fd:
            os.fsync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@contextlib.contextmanager
def _fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


# -- rows ------------------------------------------------------------------------------------


def build_rows(res: Results) -> list[Row]:
    """The table: throughput with peers, the big store, then bytes per event."""
    return [*append_rows(res), *claim_rows(res), *big_rows(res), *io_rows(res)]


def ratio_row(figure: str, value: float, unit: str, peer: str, peer_value: float, *,
              target: float | None = None, note: str = "") -> Row:
    """A row set against a peer; with ``target``, passes when value ÷ peer ≥ target."""
    ratio = value / peer_value
    return Row(figure, value, unit, peer, peer_value, ratio,
               f"≥ {target:g}×" if target is not None else "",
               at_least(ratio, target) if target is not None else None, note)


def plural(n: int, word: str) -> str:
    """``1 producer``, ``16 producers``."""
    return f"{n} {word}{'s' * (n != 1)}"


def append_rows(res: Results) -> list[Row]:
    """Appends at 1/16/64 producers against persist-queue put with as many threads."""
    rows = []
    for producers, _ in res.sizes.appends:
        ours, theirs = res.runs[f"append_{producers}"], res.runs[f"pq_put_{producers}"]
        rows.append(ratio_row(
            f"durable appends, {plural(producers, 'producer')}", ours.rate, "events/s",
            f"persist-queue put, {plural(producers, 'thread')}", theirs.rate,
            target=APPEND_TARGET if producers == 64 else None,
            note=f"{ours.ops / max(ours.commits, 1):.1f} events per commit"))
    rows.append(ratio_row(
        "raw sqlite3 1-row INSERT+COMMIT (WAL, synchronous=FULL)", res.runs["raw_sqlite"].rate,
        "rows/s", "persist-queue put, 1 thread", res.runs["pq_put_1"].rate,
        note=f"persist-queue ran with {res.facts['pq_pragmas']}; it sets only WAL, FULL is"
             " SQLite's default"))
    return rows


def claim_rows(res: Results) -> list[Row]:
    """Claim+settle on a fresh store against persist-queue get+ack."""
    peer = f"persist-queue get+ack, 1 thread ({res.sizes.peer_acks:,} items)"
    rows = []
    for key, label in (("claim_1x64", "1 worker × claim 64"), ("claim_8x8", "8 workers × claim 8")):
        ours = res.runs[key]
        note = (f"{ours.commits / ours.ops * 64:.1f} commits per 64 settled;"
                f" {ours.empty_claims} empty claims")
        rows.append(ratio_row(f"claim+settle, {label}", ours.rate, "events/s", peer,
                              res.runs["pq_get_ack"].rate, target=CLAIM_TARGET, note=note))
    return rows


def big_rows(res: Results) -> list[Row]:
    """Open-to-ready and rates on the big store against the fresh twin."""
    n, facts = res.sizes.big, res.facts
    size = f"{n:,} events queued"
    quick = " (--quick: 100,000 events, not 1,000,000)" if n < 1_000_000 else ""
    open_target = f"≤ {OPEN_TARGET_S:g} s"
    twin = "same on a fresh store (alternating runs)"
    checking = res.runs["big_append_checking"]
    return [
        Row(f"open-to-ready, {size}, warm cache", facts["open_warm"], "s", target=open_target,
            passed=at_most(facts["open_warm"], OPEN_TARGET_S),
            note=f"database {facts['big_db_bytes'] / 1e6:,.0f} MB{quick}"),
        Row(f"open-to-ready, {size}, cold cache", facts["open_cold"], "s", target=open_target,
            passed=at_most(facts["open_cold"], OPEN_TARGET_S),
            note="file evicted from the page cache with posix_fadvise(DONTNEED) first"),
        Row(f"open to quick_check done, {size}, warm cache", facts["check_warm"], "s",
            note="the check runs in the background after open returns"),
        Row(f"open to quick_check done, {size}, cold cache", facts["check_cold"], "s"),
        Row(f"close() right after open, {size}, cold cache", facts["close_while_checking"],
            "s", note="close waits for the background quick_check to finish reading"),
        Row(f"fill with append_many({FILL_BATCH})", res.runs["fill"].rate, "events/s"),
        ratio_row(f"durable appends, 64 producers, {size}", res.runs["big_append"].rate,
                  "events/s", twin, res.runs["twin_append"].rate, target=BIG_TARGET),
        ratio_row(f"claim+settle, 8 × 8, {size}", res.runs["big_claim"].rate, "events/s", twin,
                  res.runs["twin_claim"].rate, target=BIG_TARGET),
        ratio_row(f"durable appends, 64 producers, {size}, right after open", checking.rate,
                  "events/s", twin, res.runs["twin_append"].rate,
                  note="the open-time quick_check was still running at the end"
                  if facts["check_running_after_append"] else
                  "the open-time quick_check finished during this run"),
    ]


def io_rows(res: Results) -> list[Row]:
    """Bytes written per event at 1 and 64 producers, against persist-queue per put."""
    rows = []
    for producers in (1, 64):
        ours, theirs = res.io[f"append_{producers}"], res.io[f"pq_put_{producers}"]
        for counter in ("write_bytes", "wchar"):
            rows.append(ratio_row(
                f"{counter} per event, {plural(producers, 'producer')}",
                ours.per_item(counter), "B/event",
                f"persist-queue put, {plural(producers, 'thread')}", theirs.per_item(counter)))
    return rows
