"""A real network path for system tests: the cloud in a network namespace behind a veth pair.

Layout (one per test, names and subnet unique per process and test)::

    host (agent, tills)                         namespace tillsync-nl-<pid>-<n> (cloud)
    tnl<tag>h 10.231.X.Y+1/30  ── veth ──  tnl<tag>n 10.231.X.Y+2/30

The faults are the kernel's own, not an imitation:

* **Link cut**: the namespace side of the veth goes down. The host side loses carrier but
  keeps its connected route, so new connections get no ARP answer (connect timeout, then
  "No route to host") and open ones stall in TCP retransmission, as when the far end of a
  cable is pulled. The host side is deliberately *not* taken down: that removes the route,
  and a connect to 10.231.X.Y+2 would then follow the machine's default route to whatever
  answers there (in some sandboxes an egress proxy that says HTTP 426).
* **Packet loss**: an nftables table in the namespace drops a random share of packets in
  both directions (``numgen random``), counted, so a test can show the loss happened. TCP
  turns that into retransmissions, stalls, connect timeouts and in-doubt requests.
* **Latency is not here**: ``tc qdisc ... netem`` needs the ``sch_netem`` module, which
  kernels in CI containers often lack (this one does); tests add latency with
  ``faultproxy.FaultProxy`` and say so.

Everything needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), ``ip`` (iproute2) and ``nft``.
``unavailable_reason`` probes once per process by building and removing a throwaway
namespace; a test that gets a reason back runs its faults through the TCP proxy instead.
``TILLSYNC_NETLAB=off`` forces that fallback on a capable machine, to test it for real.

Clean-up: ``veth_namespace`` deletes its namespace in ``finally`` (the veth pair goes with
it), killing anything a test left running inside first, and sweeps namespaces left by test
processes that died (SIGKILL skips ``finally``): their names carry the pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import cache

NETNS_PATH = "netns+veth+nft"
PROXY_PATH = "tcp-proxy"
NS_PREFIX = "tillsync-nl-"
NFT_TABLE = "tillsync_netlab"
ENV_SWITCH = "TILLSYNC_NETLAB"
# 10.231.0.0/16 holds 16,384 /30 subnets; a test takes one derived from its pid and a
# counter, skipping any the host already routes.
SUBNET_BASE = (10, 231)
_counter = itertools.count()


class NetlabError(RuntimeError):
    """An ``ip`` or ``nft`` command failed."""


def _run(argv: Sequence[str], *, check: bool = True,
         stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one command synchronously (they take milliseconds; clean-up must not be
    cancellable halfway)."""
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                          timeout=15, check=False)
    if check and proc.returncode != 0:
        raise NetlabError(f"{' '.join(argv)} failed ({proc.returncode}): "
                          f"{(proc.stderr or proc.stdout).strip()}")
    return proc


@cache
def unavailable_reason() -> str | None:
    """Why a netns + veth + nft path cannot be built here, or None when it can."""
    if os.environ.get(ENV_SWITCH, "").lower() in ("0", "off", "no", "false"):
        return f"{ENV_SWITCH}={os.environ[ENV_SWITCH]} forces the TCP proxy"
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux-only (this is {sys.platform})"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        probe = _Names.new()
        try:
            _build(probe)
            _run(["ip", "netns", "exec", probe.ns, "nft", "-f", "-"],
                 stdin=_nft_script(0))
        finally:
            _remove(probe)
    except (NetlabError, OSError, subprocess.SubprocessError) as err:
        return f"cannot build a namespace here: {err}"
    return None


@dataclass(frozen=True)
class _Names:
    ns: str
    host_if: str
    ns_if: str
    host_ip: str
    ns_ip: str

    @classmethod
    def new(cls) -> _Names:
        pid, n = os.getpid(), next(_counter)
        # "x" cannot occur in hex, so pid and counter never run together ambiguously;
        # at most 3 + 6 + 1 + 2 + 1 characters: interface names stop at 15.
        tag = f"{pid:x}x{n % 256:x}"
        taken = _routed_subnets()
        for attempt in range(16384):
            index = (pid * 64 + n + attempt) % 16384
            third, fourth = divmod(index * 4, 256)
            net = f"{SUBNET_BASE[0]}.{SUBNET_BASE[1]}.{third}.{fourth}"
            if net not in taken:
                break
        else:
            raise NetlabError("no free /30 left in 10.231.0.0/16")
        return cls(ns=f"{NS_PREFIX}{pid}-{n}", host_if=f"tnl{tag}h", ns_if=f"tnl{tag}n",
                   host_ip=f"{SUBNET_BASE[0]}.{SUBNET_BASE[1]}.{third}.{fourth + 1}",
                   ns_ip=f"{SUBNET_BASE[0]}.{SUBNET_BASE[1]}.{third}.{fourth + 2}")


def _routed_subnets() -> set[str]:
    out = _run(["ip", "-4", "-o", "route", "show", "table", "all"], check=False).stdout
    return {m.group(1) for m in re.finditer(r"^(?:\S+ )?(10\.231\.\d+\.\d+)/30", out, re.M)}


def _build(names: _Names) -> None:
    """Namespace, veth pair, addresses, links up; undone by ``_remove``."""
    _run(["ip", "netns", "add", names.ns])
    _run(["ip", "link", "add", names.host_if, "type", "veth", "peer", "name", names.ns_if])
    _run(["ip", "link", "set", names.ns_if, "netns", names.ns])
    _run(["ip", "addr", "add", f"{names.host_ip}/30", "dev", names.host_if])
    _run(["ip", "link", "set", names.host_if, "up"])
    _run(["ip", "-n", names.ns, "addr", "add", f"{names.ns_ip}/30", "dev", names.ns_if])
    _run(["ip", "-n", names.ns, "link", "set", names.ns_if, "up"])
    _run(["ip", "-n", names.ns, "link", "set", "lo", "up"])


def _remove(names: _Names) -> None:
    """Delete the namespace (its veth end goes with it, and so the host end); tolerant of
    half-built or already-removed pieces."""
    _delete_namespace(names.ns)
    _run(["ip", "link", "delete", names.host_if], check=False)


def _delete_namespace(ns: str) -> None:
    # A process still inside would keep the namespace, and its veth, alive after the name
    # is gone; the only processes in these namespaces are ones a test started there.
    pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run(["ip", "netns", "delete", ns], check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces of this module whose test process is gone; return their names."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    removed = []
    for name in re.findall(rf"^({re.escape(NS_PREFIX)}(\d+)-\d+)", out, re.M):
        ns, pid = name[0], int(name[1])
        if pid == os.getpid() or _alive(pid):
            continue
        _delete_namespace(ns)
        removed.append(ns)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _nft_script(loss_percent: int) -> str:
    """A table dropping ``loss_percent`` % of packets each way, with counters."""
    rule = (f"numgen random mod 100 < {loss_percent} counter drop" if loss_percent
            else "counter")
    return (f"table inet {NFT_TABLE} {{\n"
            f"  chain in {{ type filter hook input priority 0; policy accept; {rule}; }}\n"
            f"  chain out {{ type filter hook output priority 0; policy accept; {rule}; }}\n"
            "}\n")


@dataclass(frozen=True)
class Link:
    """A live namespace + veth pair; the cloud listens on ``ns_ip`` inside ``ns``."""

    names: _Names

    @property
    def ns(self) -> str:
        """The namespace's name."""
        return self.names.ns

    @property
    def ns_ip(self) -> str:
        """The namespace side's address: where the cloud listens."""
        return self.names.ns_ip

    @property
    def host_ip(self) -> str:
        """The host side's address."""
        return self.names.host_ip

    def exec_prefix(self) -> list[str]:
        """Put this in front of a command line to run it inside the namespace."""
        return ["ip", "netns", "exec", self.ns]

    async def cut(self) -> None:
        """Take the namespace side of the veth down: nothing crosses until ``restore``."""
        await _arun(["ip", "-n", self.ns, "link", "set", self.names.ns_if, "down"])

    async def restore(self) -> None:
        """Bring the namespace side up again; TCP's retransmissions then get through."""
        await _arun(["ip", "-n", self.ns, "link", "set", self.names.ns_if, "up"])

    async def set_loss(self, percent: int) -> None:
        """Drop ``percent`` % of packets in each direction (replaces any earlier setting)."""
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be 0-100 %, not {percent}")
        await self.clear_loss()
        await _arun([*self.exec_prefix(), "nft", "-f", "-"], stdin=_nft_script(percent))

    async def clear_loss(self) -> None:
        """Remove the loss table (no error if there is none)."""
        await _arun([*self.exec_prefix(), "nft", "delete", "table", "inet", NFT_TABLE],
                    check=False)

    async def dropped_packets(self) -> int:
        """Packets the loss rules have dropped so far (both directions)."""
        proc = await _arun([*self.exec_prefix(), "nft", "-j", "list", "table", "inet",
                            NFT_TABLE], check=False)
        if proc.returncode != 0:
            return 0
        total = 0
        for item in json.loads(proc.stdout).get("nftables", []):
            rule = item.get("rule")
            if not rule:
                continue
            exprs = rule.get("expr", [])
            if any("drop" in e for e in exprs):
                total += sum(e["counter"]["packets"] for e in exprs if "counter" in e)
        return total

    def link_state(self) -> str:
        """``UP`` or ``DOWN`` as ``ip`` reports the namespace side (for messages)."""
        out = _run(["ip", "-n", self.ns, "-br", "link", "show", self.names.ns_if],
                   check=False).stdout.split()
        return out[1] if len(out) > 1 else "?"


async def _arun(argv: Sequence[str], *, check: bool = True,
                stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # Off the event loop: the tills, the proxy and the status sampler keep running.
    return await asyncio.to_thread(_run, argv, check=check, stdin=stdin)


@contextlib.asynccontextmanager
async def veth_namespace() -> AsyncIterator[Link]:
    """A fresh namespace + veth pair for one test, always removed afterwards."""
    sweep_stale()
    names = _Names.new()
    try:
        _build(names)
        yield Link(names)
    finally:
        _remove(names)


def leftovers() -> list[str]:
    """This process's namespaces still present (a test asserts there are none at the end)."""
    out = _run(["ip", "netns", "list"], check=False).stdout
    mine = f"{NS_PREFIX}{os.getpid()}-"
    return [line.split()[0] for line in out.splitlines() if line.startswith(mine)]
