"""The ``tillsync`` command line.

Every failure prints one line (what, why, what to do) and exits non-zero; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from outbox import DeliveryState, Outbox, OutboxError
from outbox.version import package_version


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser; its --help is the command's reference."""
    parser = argparse.ArgumentParser(
        prog="tillsync",
        description="In-store edge sync agent: keeps POS events in an encrypted outbox "
                    "and replays them idempotently to cloud APIs.")
    parser.add_argument("--version", action="version", version=f"tillsync {package_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on failure")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    outbox = commands.add_parser("outbox", help="look at the outbox database directly")
    outbox_commands = outbox.add_subparsers(dest="outbox_command", required=True,
                                            metavar="ACTION")
    for name, text in (("stats", "counts per sink: pending, in doubt, dead, bytes, oldest"),
                       ("list", "deliveries in event order, optionally by state")):
        sub = outbox_commands.add_parser(name, help=text, description=text)
        sub.add_argument("--db", type=Path, required=True, help="path of outbox.db")
        sub.add_argument("--key", type=Path, required=True, help="path of outbox.key")
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        if name == "list":
            sub.add_argument("--state", choices=[s.value for s in DeliveryState],
                             help="only deliveries in this state")
            sub.add_argument("--limit", type=int, default=50, help="at most this many")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_outbox_command(args))
    except OutboxError as err:
        if args.debug:
            raise
        hint = f" ({err.hint})" if err.hint else ""
        print(f"tillsync: {err}{hint}", file=sys.stderr)
        return 1


async def _outbox_command(args: argparse.Namespace) -> int:
    if not args.db.exists():
        raise OutboxError(f"no outbox database at {args.db}",
                          hint="check the path, or the agent's outbox.path setting")
    store = await Outbox.open(args.db, args.key)
    try:
        if args.outbox_command == "stats":
            stats = await store.stats()
            if args.json:
                print(json.dumps({"events": stats.events, "bytes": stats.bytes,
                                  "sinks": [asdict(s) for s in stats.sinks.values()]}))
                return 0
            print(f"{'sink':<16}{'pending':>9}{'in doubt':>10}{'dead':>7}{'quarant.':>10}"
                  f"{'bytes':>12}{'oldest':>10}")
            for s in stats.sinks.values():
                oldest = "-" if s.oldest_pending_age_s is None else f"{s.oldest_pending_age_s:.0f}s"
                print(f"{s.sink:<16}{s.pending:>9}{s.in_doubt:>10}{s.dead:>7}"
                      f"{s.quarantined:>10}{s.bytes:>12}{oldest:>10}")
            return 0
        state = DeliveryState(args.state) if args.state else None
        rows = await store.list_deliveries(state=state, limit=args.limit)
        if args.json:
            print(json.dumps([asdict(r) for r in rows]))
            return 0
        for r in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at))
            error = f"  {r.last_error}" if r.last_error else ""
            print(f"{r.event_id:>8}  {r.sink:<12}{r.state:<12}{r.stream:<10}{r.kind:<14}"
                  f"{when}  attempts={r.attempts}{error}")
        return 0
    finally:
        await store.close()
