"""The tillsync command line, run as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from outbox import NewEvent, Outbox, Settlement, Verdict

REPO = Path(__file__).resolve().parents[2]


def tillsync(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=60, check=False)


async def _fill(db: Path, key: Path) -> None:
    store = await Outbox.open(db, key, create_key=True)
    for seq in range(3):
        await store.append(NewEvent("T01", "transaction", b"{}", ("cloud",), f"k{seq}"))
    [d] = await store.claim("cloud", 1)
    await store.settle([Settlement(d.event_id, "cloud", Verdict.DEAD, error="HTTP 422: no")])
    await store.close()


def test_outbox_stats_and_list_read_the_database(tmp_path: Path):
    db, key = tmp_path / "outbox.db", tmp_path / "outbox.key"
    asyncio.run(_fill(db, key))
    stats = tillsync("outbox", "stats", "--db", str(db), "--key", str(key), "--json")
    assert stats.returncode == 0, stats.stderr
    [cloud] = json.loads(stats.stdout)["sinks"]
    assert (cloud["pending"], cloud["dead"]) == (2, 1)
    listed = tillsync("outbox", "list", "--db", str(db), "--key", str(key), "--state", "dead")
    assert listed.returncode == 0 and "HTTP 422: no" in listed.stdout
    assert len(listed.stdout.strip().splitlines()) == 1


def test_a_failure_is_one_clear_line_without_traceback(tmp_path: Path):
    db, key = tmp_path / "outbox.db", tmp_path / "outbox.key"
    asyncio.run(_fill(db, key))
    key.chmod(0o644)
    result = tillsync("outbox", "stats", "--db", str(db), "--key", str(key))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(key) in lines[0] and "chmod 600" in lines[0]
    assert "Traceback" not in result.stderr


def test_help_and_version_answer():
    assert "outbox" in tillsync("--help").stdout
    assert tillsync("--version").stdout.startswith("tillsync ")
