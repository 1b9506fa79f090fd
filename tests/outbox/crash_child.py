"""Child process for the crash tests in ``test_crash.py``; the parent SIGKILLs it at random.

It reports on stdout only what the outbox has acknowledged: the lines for one call are
written only after the awaited call returned, all in one ``write`` syscall (atomic on a pipe
below PIPE_BUF), so a kill reports a call wholly or not at all and never tears a line.

Modes (``python tests/outbox/crash_child.py MODE DB KEY_FILE ...``):

``append BASE WORKERS``
    ``WORKERS`` coroutines append forever, worker ``w`` to stream ``till-w`` with sequence
    numbers from ``BASE``; worker 0 uses ``append_many`` in threes, the others ``append``.
    After each return: ``appended <dedupe_key> <event_id> <created 0/1>``.

``relay SINK...``
    One relay per sink claims (up to 3, at most one per stream) and settles with a verdict
    that is a pure function of (sink, event id, attempts), see ``verdict_for``. After the
    claim returns: ``claimed <sink> <event_id> <in_doubt 0/1> <attempts> <sha256(payload)>``
    per delivery; after the settle returns: ``settled <sink> <event_id> <verdict>`` each.

The store's clock is never injected here: the parent checks outcomes, not timestamps, and
``next_attempt_at`` is passed explicitly (see ``next_attempt_for``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from pathlib import Path

from outbox import NewEvent, Outbox, Settlement, Verdict

SINKS = ("cloud", "erp")
# Far beyond any next_attempt_at the relay sets, so every head is due.
CLAIM_NOW = 1e12


def payload_for(stream: str, seq: int) -> bytes:
    """A few hundred bytes that only this (stream, seq) produces."""
    digest = hashlib.sha256(f"{stream}:{seq}".encode()).digest()
    return digest * (8 + seq % 8)


def verdict_for(sink: str, event_id: int, attempts: int) -> Verdict:
    """Deterministic outcome of attempt number ``attempts + 1`` of (event, sink)."""
    h = hashlib.sha256(f"{sink}:{event_id}:{attempts}".encode()).digest()[0] % 10
    if h < 4:
        return Verdict.DELIVERED
    if h < 6:
        return Verdict.RETRY
    if h < 8:
        return Verdict.IN_DOUBT
    return Verdict.DEAD


def next_attempt_for(event_id: int, attempts: int) -> float:
    """The ``next_attempt_at`` the relay passes with a RETRY or IN_DOUBT settlement."""
    return 5_000.0 + event_id + attempts / 8


def error_for(verdict: Verdict, attempts: int) -> str | None:
    """The error text the relay records with a verdict (None for DELIVERED)."""
    if verdict is Verdict.DELIVERED:
        return None
    return f"simulated {verdict.value} on attempt {attempts + 1} ✗"


def emit(lines: str) -> None:
    """Write whole lines with a single syscall (atomic on a pipe below PIPE_BUF)."""
    data = (lines + "\n").encode()
    assert len(data) <= 4096  # PIPE_BUF on Linux
    while data:
        data = data[os.write(1, data):]


async def append_forever(db: Path, key_file: Path, base: int, workers: int) -> None:
    """Append from several coroutines until killed."""
    outbox = await Outbox.open(db, key_file, durability="full", create_key=True)

    async def worker(w: int) -> None:
        stream = f"till-{w}"
        seq = base
        while True:
            batch = [NewEvent(stream, "sale", payload_for(stream, s), SINKS,
                              f"idem-{stream}-{s}", f"{stream}:{s}")
                     for s in range(seq, seq + (3 if w == 0 else 1))]
            if len(batch) == 1:
                results = [await outbox.append(batch[0])]
            else:
                results = await outbox.append_many(batch)
            emit("\n".join(f"appended {event.dedupe_key} {result.event_id} {int(result.created)}"
                            for event, result in zip(batch, results, strict=True)))
            seq += len(batch)

    await asyncio.gather(*(worker(w) for w in range(workers)))


async def relay_forever(db: Path, key_file: Path, sinks: list[str]) -> None:
    """Claim and settle for each sink until killed."""
    outbox = await Outbox.open(db, key_file, durability="full")

    async def relay(sink: str) -> None:
        while True:
            claimed = await outbox.claim(sink, 3, now=CLAIM_NOW)
            if not claimed:
                await asyncio.sleep(0.005)
                continue
            emit("\n".join(f"claimed {sink} {d.event_id} {int(d.in_doubt)} {d.attempts} "
                            f"{hashlib.sha256(d.payload).hexdigest()}" for d in claimed))
            settlements = []
            for d in claimed:
                verdict = verdict_for(sink, d.event_id, d.attempts)
                settlements.append(Settlement(
                    d.event_id, sink, verdict,
                    next_attempt_at=next_attempt_for(d.event_id, d.attempts),
                    error=error_for(verdict, d.attempts)))
            await outbox.settle(settlements)
            emit("\n".join(f"settled {sink} {s.event_id} {s.verdict.value}"
                            for s in settlements))

    await asyncio.gather(*(relay(sink) for sink in sinks))


def main(argv: list[str]) -> None:
    """Dispatch on the mode; see the module docstring."""
    mode, db, key_file, *rest = argv
    if mode == "append":
        asyncio.run(append_forever(Path(db), Path(key_file), int(rest[0]), int(rest[1])))
    elif mode == "relay":
        asyncio.run(relay_forever(Path(db), Path(key_file), rest))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
