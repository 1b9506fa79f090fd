"""Disk full (issue 7, deliverable 4): ``507`` to the tills, status ``failing``, nothing
acknowledged lost, recovery once space returns, without a restart.

The outbox lives on a small filesystem of its own, the most real one this machine allows
(``mount_small_disk``, the kind that ran is printed and recorded as the ``disk`` property):

* ``ext4-loop``: a 32 MiB ext4 image (4 KiB blocks, no reserved blocks) on a loop device:
  real ENOSPC and real fsync. A ballast file leaves 1.5 MB free; space returns when it is
  deleted, as when an operator clears old files.
* ``tmpfs``: a 2 MiB tmpfs, grown live to 64 MiB with ``mount -o remount,size=64m``
  (ENOSPC, but fsync does nothing: this is about SQLITE_FULL, not durability).
* ``page-limit``: where nothing can be mounted (no root, no loop device), the outbox's own
  ``capacity_bytes``; room returns as delivered payloads are released.

``TILLSYNC_DISK_KIND`` forces one kind (to exercise a fallback where a better one exists).

The stand-in cloud is down while the disk fills, so nothing drains and the tills' sales
only pile up. On a real filesystem it then comes back while the disk is still full: the
outbox has released its disk reserve (``outbox.reserve``), so every acknowledged sale must be
delivered while new ones are still refused. It goes down again, space returns, and at the
end it comes back for good, and the checker of ``harness`` compares what the tills were told
with what the cloud committed: every sale answered 202/200, before the disk filled or after
it recovered, arrives exactly once.

``test_a_sigkill_while_the_disk_is_full_loses_nothing_and_the_agent_serves_again`` kills
the agent while it is full with deliveries in flight. The restart must serve on the full
disk: the outbox's recovery of interrupted attempts needs room in the WAL, so it is put off
to the first batch that finds room (it once made ``tillsync run`` exit 1 here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.standin.cloud import StandinCloud
from tests.system.harness import (
    STATUS_TOKEN,
    AgentProcess,
    Till,
    check,
    sale,
    terminal_ids,
    token_for,
    wait_drained,
    write_agent_config,
)

TILLS = terminal_ids(2)
RATE_PER_TILL = 40.0
EXT4_BYTES = 32 * 1024 * 1024  # room to sell on after the ballast goes
TMPFS_SIZE = "2m"
TMPFS_GROWN = "64m"
TMPFS_RESERVE = 256 * 1024
LEAVE_FREE = 1_500_000  # what the ballast leaves: ~40 sales' worth of WAL frames
PAGE_LIMIT_BYTES = 12_000  # page-limit fallback: ~25 sealed sales
# The kinds tried, best first; TILLSYNC_DISK_KIND=tmpfs (or page-limit) tries only that one,
# to run a fallback on a machine that has the better kinds.
KINDS = tuple(k for k in ("ext4-loop", "tmpfs", "page-limit")
              if os.environ.get("TILLSYNC_DISK_KIND", k) == k)

pytestmark = [pytest.mark.timeout(180)]


# -- a small filesystem --------------------------------------------------------------------


@dataclass
class SmallDisk:
    """The filesystem the outbox lives on, and how to fill and free it."""

    kind: str  # "ext4-loop" | "tmpfs" | "page-limit"
    path: Path
    image: Path | None = None

    @property
    def mounted(self) -> bool:
        """Whether ``path`` is a filesystem of its own."""
        return self.kind != "page-limit"

    @property
    def outbox_extra(self) -> str:
        """Config lines for ``[outbox]``: the capacity, in the page-limit fallback; a disk
        reserve that fits the 2 MiB tmpfs (ext4 keeps the default 8 MiB)."""
        if self.kind == "tmpfs":
            return f"disk_reserve_bytes = {TMPFS_RESERVE}\n"
        return f"capacity_bytes = {PAGE_LIMIT_BYTES}\n" if not self.mounted else ""

    @property
    def reserve(self) -> Path:
        """The outbox's disk reserve file (``outbox.reserve``)."""
        return self.path / "outbox.db.reserve"

    def free(self) -> int:
        """Bytes free on it."""
        return shutil.disk_usage(self.path).free

    def fill(self, leave: int) -> None:
        """Write a ballast file so that about ``leave`` bytes stay free."""
        if self.mounted:
            self._ballast("ballast", max(0, self.free() - leave))

    def fill_up(self) -> None:
        """Take every free byte (a second ballast file, written until ENOSPC)."""
        if self.mounted:
            self._ballast("ballast-rest", None)

    def _ballast(self, name: str, size: int | None) -> None:
        fd = os.open(self.path / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        block = b"\0" * 65536
        try:
            written = 0
            while size is None or written < size:
                n = len(block) if size is None else min(len(block), size - written)
                try:
                    written += os.write(fd, block[:n])
                except OSError:
                    if size is None and len(block) > 512:
                        block = block[:len(block) // 2]  # the last few blocks too
                        continue
                    if size is None:
                        break
                    raise
            with contextlib.suppress(OSError):
                os.fsync(fd)
        finally:
            os.close(fd)

    def grow(self) -> None:
        """Give the space back: delete the ballast (ext4), grow the filesystem (tmpfs)."""
        if self.kind == "tmpfs":
            subprocess.run(["mount", "-o", f"remount,size={TMPFS_GROWN}", str(self.path)],
                           check=True)
        for name in ("ballast", "ballast-rest"):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()

    def unmount(self) -> None:
        """Unmount (lazily if something still holds a file open) and drop the image."""
        if self.mounted:
            done = subprocess.run(["umount", str(self.path)], capture_output=True)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
        if self.image is not None:
            self.image.unlink(missing_ok=True)


def _run(*command: str | Path) -> None:
    subprocess.run([str(c) for c in command], check=True, capture_output=True, timeout=30)


def mount_small_disk(root: Path, kinds: tuple[str, ...] = KINDS) -> SmallDisk:
    """Mount the most real small filesystem this machine allows at ``root/disk``."""
    path = root / "disk"
    path.mkdir()
    if ("ext4-loop" in kinds and os.geteuid() == 0 and shutil.which("mkfs.ext4")
            and shutil.which("mount")):
        image = root / "disk.img"
        try:
            with open(image, "wb") as out:
                out.truncate(EXT4_BYTES)
            _run("mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", image)
            _run("mount", "-o", "loop", image, path)
            return SmallDisk("ext4-loop", path, image)
        except (OSError, subprocess.SubprocessError):
            image.unlink(missing_ok=True)
    if "tmpfs" in kinds and shutil.which("mount"):
        try:
            _run("mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", path)
            return SmallDisk("tmpfs", path)
        except (OSError, subprocess.SubprocessError):
            pass
    return SmallDisk("page-limit", path)


@pytest.fixture(params=["best", "tiny"])
def disk(request: pytest.FixtureRequest, tmp_path: Path,
         record_property: Callable[[str, object], None]) -> Iterator[SmallDisk]:
    """GIVEN a small filesystem for the outbox (the kind is recorded): the best this machine
    allows, then the 2 MiB tmpfs, whose 256 KiB disk reserve only suffices because the
    outbox keeps the WAL short while the reserve is released."""
    kinds = KINDS
    if request.param == "tiny":
        kinds = tuple(k for k in ("tmpfs", "page-limit") if k in KINDS) or KINDS
    small = mount_small_disk(tmp_path, kinds)
    print(f"disk-full test on: {small.kind}")
    record_property("disk", small.kind)
    try:
        yield small
    finally:
        small.unmount()


# -- helpers -------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str,
                     agent: AgentProcess) -> float:
    """Poll ``predicate``; return the seconds it took; fail with the agent's log."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s\n{agent.log_tail()}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def acked(tills: list[Till]) -> int:
    """Sales answered 202/200 so far."""
    return sum(len(t.acked) for t in tills)


async def get(http: aiohttp.ClientSession, agent: AgentProcess, path: str,
              ) -> tuple[int, str]:
    """GET ``path`` with the status token; (status, text)."""
    async with http.get(agent.base + path, headers={"Authorization": f"Bearer {STATUS_TOKEN}"},
                        timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status, await resp.text()


async def post(http: aiohttp.ClientSession, agent: AgentProcess, body: dict[str, Any],
               ) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST a sale as its till; (status, JSON body, headers)."""
    async with http.post(agent.base + "/v1/transactions", json=body,
                         headers={"Authorization": f"Bearer {token_for(body['terminal_id'])}"},
                         timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def stop_tills(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    """Let each till finish the sale in hand, then end."""
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 30)


class BlackHole:
    """A server that accepts connections and never answers: a cloud that hangs, so that the
    agent's deliveries stay in flight."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self, port: int) -> None:
        """Listen on ``port`` of 127.0.0.1."""
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.writers.append(writer)
            with contextlib.suppress(ConnectionError):
                await reader.read()

        self.server = await asyncio.start_server(swallow, "127.0.0.1", port,
                                                 reuse_address=True)

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        if self.server is not None:
            self.server.close()
            for writer in self.writers:
                writer.close()
            await self.server.wait_closed()


# -- the tests -----------------------------------------------------------------------------


async def test_a_full_disk_refuses_sales_507_and_recovers_without_a_restart(
        tmp_path: Path, disk: SmallDisk, record_property: Callable[[str, object], None]):
    """GIVEN the outbox on a small filesystem and the cloud down WHEN two tills sell until
    the disk is full THEN they get 507 outbox_full with a Retry-After, status says failing
    with the reason, /healthz, /v1/status and /metrics keep answering and /readyz says why
    it is not ready; WHEN the cloud comes back while the disk is still full THEN every
    acknowledged sale is delivered (the disk reserve gave the relay room) and sales are
    still refused; WHEN space returns (ballast deleted, or tmpfs grown) THEN, with no
    restart, new sales get 202 again and status leaves failing; WHEN the cloud comes back
    THEN every sale ever answered 202/200 arrives exactly once."""
    figures: dict[str, Any] = {"disk": disk.kind}
    async with StandinCloud() as cloud:
        await cloud.close_port()  # down: connection refused, nothing drains
        config = write_agent_config(tmp_path, sink_url=cloud.url, terminals=TILLS,
                                    outbox_path=disk.path / "outbox.db",
                                    outbox_extra=disk.outbox_extra)
        agent = AgentProcess(config, log_path=tmp_path / "agent.log")
        await agent.start()
        pid = agent.pid
        disk.fill(leave=LEAVE_FREE)
        figures["free_at_start"] = disk.free()
        tills = [Till(t, agent.base, RATE_PER_TILL) for t in TILLS]
        stop = asyncio.Event()
        try:
            async with aiohttp.ClientSession() as http:
                tasks = [asyncio.create_task(t.run(stop, http)) for t in tills]
                # 1. Selling until the outbox is full.
                figures["s_to_full"] = round(await wait_until(
                    lambda: any(t.answers[507] for t in tills), 60, "a 507", agent), 2)
                # The first refusal is one batch's; another till's smaller batch may still
                # have fitted in the last free pages. Full means every till is refused.
                await wait_until(lambda: all(t.answers[507] for t in tills), 30,
                                 "a 507 to every till", agent)
                figures["acked_before_full"] = acked(tills)
                figures["free_when_full"] = disk.free()
                await asyncio.sleep(1.0)  # the tills keep trying
                assert acked(tills) == figures["acked_before_full"], "accepted while full?"
                status, body, headers = await post(http, agent, sale(TILLS[0], 900_001))
                assert status == 507, body
                assert body["error"]["code"] == "outbox_full", body
                assert int(headers["Retry-After"]) > 0, headers
                state = await agent.status(http)
                assert state["status"] == "failing", state
                assert any("full" in r for r in state["reasons"]), state["reasons"]
                figures["status_reason"] = state["reasons"][0]
                # Everything else keeps answering.
                assert (await get(http, agent, "/healthz"))[0] == 200
                code, text = await get(http, agent, "/readyz")
                assert code == 503 and "full" in text, text
                code, text = await get(http, agent, "/metrics")
                assert code == 200, text
                assert 'tillsync_events_rejected_total{reason="outbox_full"}' in text
                # 2. Deliveries go on while the disk is full: the reserve made room for the
                # relay's writes, and appends stay refused so they do not take it.
                if disk.mounted:
                    assert not disk.reserve.exists(), "the disk reserve was not released"
                    await cloud.open_port()
                    await wait_until(lambda: len(cloud.effects) >= acked(tills), 30,
                                     "every acknowledged sale delivered on the full disk",
                                     agent)
                    figures["delivered_while_full"] = len(cloud.effects)
                    status, body, _ = await post(http, agent, sale(TILLS[0], 900_004))
                    assert status == 507, body
                    await cloud.close_port()
                # 3. Space returns; no restart.
                if disk.mounted:
                    disk.grow()
                else:
                    await cloud.open_port()  # page limit: deliveries release room
                before = acked(tills)
                figures["s_to_first_202_after_space"] = round(await wait_until(
                    lambda: acked(tills) > before, 30, "a 202 after space returned",
                    agent), 2)
                deadline = time.monotonic() + 10
                while (await agent.status(http))["status"] == "failing":
                    assert time.monotonic() < deadline, await agent.status(http)
                    await asyncio.sleep(0.1)
                assert agent.pid == pid, "the agent restarted"
                if disk.mounted:
                    assert disk.reserve.exists(), "the disk reserve was not written back"
                await asyncio.sleep(1.0)  # selling on after recovery
                await stop_tills(stop, tasks)
                figures["acked_total"] = acked(tills)
                answers: Counter[int] = sum((t.answers for t in tills), start=Counter())
                figures["answers"] = {str(k): v for k, v in sorted(answers.items())}
            # 4. The cloud comes back: everything acknowledged arrives, once.
            await cloud.open_port()
            await wait_drained(agent, cloud, timeout_s=60)
            assert await agent.stop() == 0, agent.log_tail()
        finally:
            stop.set()
            await agent.kill()
    report = check(tills, cloud)
    figures.update(report.figures())
    print(f"disk full: {json.dumps(figures)}")
    for name, value in figures.items():
        record_property(name, value)
    assert report.clean, str(report)
    assert figures["acked_before_full"] > 0 and report.acknowledged > figures[
        "acked_before_full"], figures


class RestartOnFullDiskFailed(AssertionError):
    """The agent did not serve after a restart on a full disk (the known product bug)."""


def outbox_states(db: Path) -> dict[str, int]:
    """Delivery states in the outbox, read from the file with a read-only connection."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state"))
    finally:
        conn.close()


async def test_a_sigkill_while_the_disk_is_full_loses_nothing_and_the_agent_serves_again(
        tmp_path: Path, disk: SmallDisk, request: pytest.FixtureRequest,
        record_property: Callable[[str, object], None]):
    """GIVEN the outbox on a small filesystem, a cloud that hangs (deliveries in flight) and
    tills' sales accepted WHEN the disk fills to the last byte (a sale gets 507) and the
    agent is SIGKILLed THEN, started again on the still-full disk, it serves /healthz and
    answers sales 507 rather than crash or exit; and once space returns and the cloud is
    back, every acknowledged sale arrives exactly once."""
    async with StandinCloud() as cloud:
        await cloud.close_port()
        hole = BlackHole()
        await hole.start(cloud.port)
        db = disk.path / "outbox.db"
        config = write_agent_config(tmp_path, sink_url=cloud.url, terminals=TILLS,
                                    outbox_path=db, outbox_extra=disk.outbox_extra)
        agent = AgentProcess(config, log_path=tmp_path / "agent.log")
        await agent.start()
        disk.fill(leave=LEAVE_FREE)
        tills = [Till(t, agent.base, RATE_PER_TILL) for t in TILLS]
        restart_error: str | None = None
        try:
            async with aiohttp.ClientSession() as http:
                # Sales accepted; the relay claims their deliveries, which hang.
                stop = asyncio.Event()
                tasks = [asyncio.create_task(t.run(stop, http)) for t in tills]
                await wait_until(lambda: acked(tills) >= 10, 30, "10 sales", agent)
                await stop_tills(stop, tasks)
                await asyncio.sleep(0.3)
                # The disk fills to the last byte; a sale is refused.
                disk.fill_up()
                if not disk.mounted:  # page limit: sell until the capacity is reached
                    stop = asyncio.Event()
                    tasks = [asyncio.create_task(t.run(stop, http)) for t in tills]
                    await wait_until(lambda: any(t.answers[507] for t in tills), 30,
                                     "a 507", agent)
                    for task in tasks:
                        task.cancel()  # each is re-posting a refused sale: not acked
                    await asyncio.gather(*tasks, return_exceptions=True)
                status, body, _ = await post(http, agent, sale(TILLS[0], 900_002))
                assert status == 507, body
                states = outbox_states(db)
                record_property("states_at_kill", json.dumps(states))
                if disk.mounted:  # what the restart must redo; the relay's writes all fail
                    assert states.get("in_flight", 0) > 0, states
                # SIGKILL while full, and start again on the full disk.
                await agent.kill()
                try:
                    await agent.start(ready_timeout_s=20, until="/healthz")
                except (RuntimeError, TimeoutError) as err:
                    restart_error = str(err)
                if restart_error is None:
                    assert (await get(http, agent, "/healthz"))[0] == 200
                    if disk.mounted:  # the released reserve tells, before any sale is refused
                        code, text = await get(http, agent, "/readyz")
                        assert code == 503 and "disk is full" in text, (code, text)
                    status, body, _ = await post(http, agent, sale(TILLS[0], 900_003))
                    assert status == 507, body  # still full: refused, not lost
                # Space returns, the cloud comes back.
                disk.grow()
                if agent.pid is None:
                    await agent.start()
                await hole.close()
                await cloud.open_port()
                stop = asyncio.Event()
                tasks = [asyncio.create_task(t.run(stop, http)) for t in tills]
                await asyncio.sleep(1.0)
                await stop_tills(stop, tasks)
            await wait_drained(agent, cloud, timeout_s=60)
            assert await agent.stop() == 0, agent.log_tail()
        finally:
            await agent.kill()
            await hole.close()
    report = check(tills, cloud)
    print(f"kill while full ({disk.kind}): restart error: {restart_error}; {report}")
    record_property("restart_error", restart_error or "")
    assert report.clean, str(report)
    if restart_error is not None:
        raise RestartOnFullDiskFailed(restart_error)
