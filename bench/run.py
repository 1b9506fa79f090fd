"""Run the benchmarks, print their tables, and optionally rewrite them into BENCHMARKS.md.

Usage::

    python -m bench                 # every benchmark, full sizes (several minutes)
    python -m bench outbox          # only the outbox benchmark
    python -m bench --quick         # smaller sizes, 1-2 minutes (a smoke test; not run by CI)
    python -m bench --write         # also rewrite each table section of BENCHMARKS.md
    python -m bench latency drain   # the two benchmarks with plots (docs/img/*.png)

To add a benchmark, add a module exposing ``run(args) -> list[bench.common.Row]`` to
``BENCHMARKS``. Its section of BENCHMARKS.md sits between ``<!-- bench:NAME:start -->`` and
``<!-- bench:NAME:end -->``; everything outside the markers is left as written.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import os
import platform
import re
import shlex
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import Row, describe_disk, scratch_dir

REPO = Path(__file__).resolve().parent.parent
# Name -> module; each module exposes run(args) -> list[Row].
BENCHMARKS: dict[str, str] = {
    "outbox": "bench.outbox_bench",
    "relay": "bench.relay_bench",
    "agent": "bench.agent_bench",
    "latency": "bench.latency_bench",
    "drain": "bench.drain_bench",
    "limits": "bench.limits_bench",
}
COLUMNS = ("Figure", "Value", "Unit", "Peer", "Peer value", "Ratio", "Target", "Result",
           "Command")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: benchmark names, --quick, --write, --dir, --file, --keep."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1-2 minutes")
    parser.add_argument("--write", action="store_true",
                        help="rewrite each benchmark's table section in --file")
    parser.add_argument("--dir", type=Path, default=REPO / "bench" / "out",
                        help="scratch directory on a real disk, not tmpfs (default: bench/out)")
    parser.add_argument("--file", type=Path, default=REPO / "BENCHMARKS.md",
                        help="the markdown file --write updates (default: BENCHMARKS.md)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch files")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen benchmarks; print each table; with --write, update the markdown."""
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    for name in args.names or list(BENCHMARKS):
        module = importlib.import_module(BENCHMARKS[name])
        with scratch_dir(args.dir / name, keep=args.keep) as root:
            load, started = os.getloadavg()[0], time.perf_counter()
            # Plots go next to the markdown they illustrate only with --write; otherwise to
            # the (git-ignored) scratch base, so a trial run never replaces the docs' PNGs.
            images = REPO / "docs" / "img" if args.write else args.dir
            rows = module.run(argparse.Namespace(**vars(args), root=root, images=images))
            rows = [with_command(row, name, args.quick) for row in rows]
            header = run_header(args, root, time.perf_counter() - started, load, command)
        print(f"\n== {name}\n{header}\n\n{render_text(rows)}\n{render_notes(rows)}")
        print(f"Reproduce: {command}")
        if args.write:
            write_section(args.file, name, f"{header}\n\n{render_markdown(rows)}\n\n"
                                           f"{render_notes(rows)}")
            print(f"bench: wrote the {name} section of {args.file}")
    return 0


def with_command(row: Row, name: str, quick: bool) -> Row:
    """``row`` with the command that reproduces it (this benchmark alone, same size)."""
    if row.command:
        return row
    return dataclasses.replace(row, command=shlex.join(
        ["python", "-m", "bench", name, *(["--quick"] if quick else [])]))


def run_header(args: argparse.Namespace, root: Path, seconds: float, load: float,
               command: str) -> str:
    """Where, when and how a benchmark ran, as one markdown-friendly paragraph."""
    sizes = "quick sizes" if args.quick else "full sizes"
    end_load = os.getloadavg()[0]
    return (f"Measured {dt.date.today().isoformat()} by `{command}` ({sizes}, {seconds:.0f} s,"
            f" 1-min load average {load:.2f} at start and {end_load:.2f} at the end)."
            f" Python {platform.python_version()},"
            f" SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs,"
            f" {platform.system()} {platform.release()}; files on {describe_disk(root)}.")


# -- rendering -------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    """A number as a table cell: thousands separators, fewer decimals as it grows."""
    if value is None:
        return ""
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    return f"{value:.3f}" if size < 1 else f"{value:.2f}"


def cells(row: Row, *, markdown: bool = False) -> list[str]:
    """The row as strings, in ``COLUMNS`` order (the command as code in markdown)."""
    ratio = f"{row.ratio:.2f}×" if row.ratio is not None else ""
    command = f"`{row.command}`" if markdown and row.command else row.command
    return [row.figure, fmt(row.value), row.unit, row.peer, fmt(row.peer_value), ratio,
            row.target, row.result, command]


def render_text(rows: list[Row]) -> str:
    """A fixed-width table for the terminal."""
    table = [list(COLUMNS), *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    numeric = {1, 4, 5}

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    return "\n".join([line(table[0]), line(["-" * w for w in widths]),
                      *(line(t) for t in table[1:])])


def render_markdown(rows: list[Row]) -> str:
    """A GitHub markdown table."""
    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"

    align = ["---", "---:", "---", "---", "---:", "---:", "---", "---", "---"]
    body = (line(cells(r, markdown=True)) for r in rows)
    return "\n".join([line(list(COLUMNS)), line(align), *body])


def render_notes(rows: list[Row]) -> str:
    """The rows' notes as a list under the table."""
    notes = [f"- {r.figure}: {r.note}" for r in rows if r.note]
    return "Notes:\n" + "\n".join(notes) + "\n" if notes else ""


# -- BENCHMARKS.md ---------------------------------------------------------------------------


def markers(name: str) -> tuple[str, str]:
    """The comment lines that fence a benchmark's section."""
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``name``'s markers in ``path`` (append them if missing)."""
    start, end = markers(name)
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = f"{text.rstrip()}\n\n{block}\n"
    path.write_text(text, encoding="utf-8")
