"""The benchmark plots (PNG): ingest latency over offered load, and drain after an outage.

matplotlib is the ``bench`` extra (``pip install -e '.[bench]'``), not a dependency of the
agent or of the test suite, and it is imported only when a plot is drawn, with the Agg
backend (no display). Without it a plain run prints why it skipped the plot and keeps the
table; ``--write`` refuses, because BENCHMARKS.md would then point at a stale picture.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.drain_bench import Timeline
    from bench.latency_bench import Step

DPI = 110
SIZE_IN = (8.0, 4.8)


def pyplot(path: Path, required: bool) -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None (with a message) when not installed;
    when the plot is ``required`` (``--write``), a missing matplotlib stops the run."""
    if importlib.util.find_spec("matplotlib") is None:
        if required:
            raise SystemExit(f"bench: cannot draw {path.name}: matplotlib is missing;"
                             " pip install -e '.[bench]'")
        print(f"bench: skipped {path.name}: matplotlib is missing (pip install -e '.[bench]')")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(plt: Any, fig: Any, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(f"bench: wrote {path}")
    return path


def ingest_latency(steps: Sequence[Step], path: Path, *, target_ms: float, step_s: float,
                   quick: bool, required: bool) -> Path | None:
    """p50/p95/p99 time to 202 (log scale) against the offered rate, target line drawn."""
    plt = pyplot(path, required)
    if plt is None:
        return None
    rates = [s.offered for s in steps]
    fig, ax = plt.subplots(figsize=SIZE_IN)
    for label, values, style in (("p50", [s.p50 for s in steps], "o-"),
                                 ("p95", [s.p95 for s in steps], "s-"),
                                 ("p99", [s.p99 for s in steps], "^-")):
        ax.plot(rates, values, style, label=label, markersize=4)
    ax.axhline(target_ms, color="tab:red", linestyle="--", linewidth=1,
               label=f"p99 target {target_ms:g} ms")
    saturated = [s for s in steps if s.saturated]
    for s in saturated:
        ax.annotate(f"saturated\n{s.answered_per_s:,.0f}/s answered", (s.offered, s.p99),
                    textcoords="offset points", xytext=(-110, -35), fontsize=8,
                    arrowprops={"arrowstyle": "->", "linewidth": 0.8})
    ax.set_yscale("log")
    # Plain numbers (2, 5, 10, 20 ms), not 2×10^0: the reader compares against 15 ms.
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("offered load (sales/s, open loop)")
    ax.set_ylabel("time to 202 (ms, log scale)")
    size = " (--quick)" if quick else ""
    ax.set_title(f"Agent ingest: time to 202 against offered load{size}\n"
                 f"durability full, relay delivering meanwhile, {step_s:g} s per step",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return save(plt, fig, path)


def per_second(times: Sequence[float], bin_s: float, end: float) -> tuple[list[float],
                                                                         list[float]]:
    """Events per second in ``bin_s`` bins from 0 to ``end``: (bin centres, rates)."""
    counts = Counter(int(t // bin_s) for t in times if 0 <= t < end)
    bins = range(int(end // bin_s) + 1)
    return [(b + 0.5) * bin_s for b in bins], [counts.get(b, 0) / bin_s for b in bins]


def peak_rate(times: Sequence[float], bin_s: float) -> float:
    """The highest events-per-second count over ``bin_s`` bins."""
    counts = Counter(int(t // bin_s) for t in times)
    return max(counts.values(), default=0) / bin_s


def drain_after_outage(tl: Timeline, path: Path, *, rate: float, bin_s: float,
                       quick: bool, required: bool) -> Path | None:
    """Owed deliveries (top) and delivered/accepted per second (bottom) over time."""
    plt = pyplot(path, required)
    if plt is None:
        return None
    end = max(t for t, _, _ in tl.samples)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(SIZE_IN[0], 6.0), sharex=True,
                                      height_ratios=(3, 2))
    ts = [t for t, _, _ in tl.samples]
    top.plot(ts, [owed for _, owed, _ in tl.samples], color="tab:blue", linewidth=1.5,
             label="owed to the cloud (pending + in doubt)")
    top.set_ylabel("events owed")
    centres, delivered = per_second(tl.committed_at, bin_s, end)
    _, accepted = per_second(tl.accepted_at, bin_s, end)
    bottom.plot(centres, delivered, color="tab:green", linewidth=1.2, drawstyle="steps-mid",
                label=f"delivered/s (cloud commits, {bin_s:g} s bins)")
    bottom.plot(centres, accepted, color="tab:gray", linewidth=1.0, linestyle="--",
                drawstyle="steps-mid",
                label="sales accepted/s (202s)")
    bottom.set_ylabel("events/s")
    bottom.set_xlabel("time since the first sale (s)")
    for ax in (top, bottom):
        ax.axvspan(tl.down_at, tl.up_at, color="tab:red", alpha=0.12,
                   label="cloud down" if ax is top else None)
        if tl.zero_at is not None:
            ax.axvline(tl.zero_at, color="black", linestyle=":", linewidth=1,
                       label="backlog cleared" if ax is top else None)
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0, end)
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper left", fontsize=8)
    size = " (--quick)" if quick else ""
    top.set_title(f"Drain after a {tl.up_at - tl.down_at:.0f} s cloud outage, tills selling"
                  f" {rate:g}/s throughout{size}", fontsize=10)
    return save(plt, fig, path)
