"""``tillsync demo`` as a newcomer runs it: a real subprocess, a short run, exit 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_delivers_every_sale_once_prints_every_receipt_and_streams_every_scan():
    result = subprocess.run([sys.executable, "-m", "agent", "demo", "--seconds", "6"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "every sale arrived exactly once, and every receipt printed once" in out
    assert "cloud unreachable" in out and "cloud back online" in out
    assert "duplicates seen by the cloud" in out
    assert "scans streamed to till T01" in out
