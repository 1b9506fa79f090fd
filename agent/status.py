"""The status document of CONTRACT §7 and its verdict, built from plain snapshots.

``build_status`` is a pure function: the caller gathers the outbox counters, the relays'
snapshots and the devices' states, and decides whether the outbox can accept events; this
module only shapes them and judges. Keys of §7 are never renamed or removed; extra keys
(``reasons``, ``outbox.quarantined``, per-sink ``in_doubt`` and ``oldest_pending_age_s``)
are additions the contract allows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from outbox.models import OutboxStats, SinkStats
from outbox.relay import RelayStatus, SinkState

DEVICE_STATES = ("connected", "disconnected", "error", "disabled")

# Shown for a sink that still holds deliveries in the outbox but has no relay: it was
# removed from the config, so nothing will deliver what it is owed.
NOT_CONFIGURED = "not in the config: nothing delivers to it"


@dataclass(frozen=True)
class DeviceStatus:
    """One device as status shows it; ``since`` is when it entered ``state``."""

    name: str
    kind: str
    state: str  # one of DEVICE_STATES
    detail: str | None
    since: float | None


def rfc3339(ts: float | None) -> str | None:
    """Format a Unix time as an RFC 3339 UTC timestamp ending in "Z" (None stays None)."""
    if ts is None:
        return None
    stamp = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def build_status(*, version: str, store_id: str, started_at: float, now: float,
                 outbox: OutboxStats | None, accepting: bool, accept_error: str | None,
                 sinks: Sequence[str], relays: Mapping[str, RelayStatus],
                 devices: Sequence[DeviceStatus], disk_free_bytes: int | None,
                 alert_after_s: float) -> dict[str, Any]:
    """Build the ``GET /v1/status`` document with its verdict and the reasons for it."""
    sink_docs = [_sink(name, outbox, relays.get(name), configured=name in sinks)
                 for name in _sink_names(sinks, relays, outbox)]
    device_docs = [device_json(d) for d in devices]

    failing: list[str] = []
    if not accepting:
        failing.append(f"outbox not accepting events: {accept_error}" if accept_error
                       else "outbox not accepting events")
    degraded: list[str] = []
    for doc in sink_docs:
        if doc["state"] != SinkState.ONLINE.value:
            degraded.append(_reason(f"sink {doc['name']} {doc['state']}", doc["last_error"]))
    for device in devices:
        if device.state not in ("connected", "disabled"):
            degraded.append(_reason(f"device {device.name} {device.state}", device.detail))
    oldest = outbox.oldest_pending_age_s if outbox is not None else None
    if oldest is not None and oldest > alert_after_s:
        degraded.append(f"oldest pending {oldest:.0f} s > {alert_after_s:g} s")

    verdict = "failing" if failing else "degraded" if degraded else "ok"
    return {
        "status": verdict,
        "reasons": failing + degraded,
        "version": version,
        "store_id": store_id,
        "started_at": rfc3339(started_at),
        "uptime_s": max(0, int(now - started_at)),
        "outbox": _outbox(outbox),
        "sinks": sink_docs,
        "devices": device_docs,
        "disk": {"free_bytes": disk_free_bytes},
    }


def _sink_names(sinks: Sequence[str], relays: Mapping[str, RelayStatus],
                outbox: OutboxStats | None) -> list[str]:
    # Configured sinks in config order, then any other sink that has a relay or still owes
    # something: a sink dropped from the config keeps its deliveries, and hiding them would
    # leave the outbox totals unexplained.
    names = list(dict.fromkeys(sinks))
    extra = set(relays)
    if outbox is not None:
        extra |= {name for name, s in outbox.sinks.items()
                  if s.pending or s.in_doubt or s.dead or s.quarantined}
    return names + sorted(extra - set(names))


def _sink(name: str, outbox: OutboxStats | None, relay: RelayStatus | None, *,
          configured: bool) -> dict[str, Any]:
    stats: SinkStats | None = None
    if outbox is not None:
        stats = outbox.sinks.get(name) or SinkStats(name, 0, 0, 0, 0, 0, None)
    if relay is not None:
        state = SinkState(relay.state).value
        last_error = relay.last_error
    elif configured:
        state, last_error = SinkState.ONLINE.value, None  # its relay has not reported yet
    else:
        state, last_error = SinkState.OFFLINE.value, NOT_CONFIGURED
    return {
        "name": name,
        "state": state,
        "pending": stats.pending if stats else None,
        "dead": stats.dead if stats else None,
        "last_success_at": rfc3339(relay.last_success_at) if relay else None,
        "last_error": last_error,
        "next_attempt_at": rfc3339(relay.next_attempt_at) if relay else None,
        "drain_eta_s": _drain_eta(stats, relay),
        "in_doubt": stats.in_doubt if stats else None,
        "oldest_pending_age_s": _age(stats.oldest_pending_age_s) if stats else None,
    }


def _drain_eta(stats: SinkStats | None, relay: RelayStatus | None) -> int | None:
    if stats is None:
        return None
    # In-doubt deliveries are retried like pending ones, so they are part of what is owed.
    owed = stats.pending + stats.in_doubt
    if owed == 0:
        return 0
    if relay is not None and relay.state in (SinkState.PAUSED, SinkState.OFFLINE):
        return None  # nothing drains until it is back: last minute's rate says nothing
    rate = relay.delivery_rate_per_s if relay else 0.0
    if rate <= 0:
        return None
    # At least one second: 0 would read as "nothing left".
    return max(1, round(owed / rate))


def _outbox(outbox: OutboxStats | None) -> dict[str, Any]:
    if outbox is None:
        # Unknown (the store is not open): null rather than 0, which would claim "empty".
        return dict.fromkeys(("pending", "in_doubt", "dead", "oldest_pending_age_s", "bytes",
                              "capacity_bytes", "quarantined"))
    return {
        "pending": outbox.pending,
        "in_doubt": outbox.in_doubt,
        "dead": outbox.dead,
        "oldest_pending_age_s": _age(outbox.oldest_pending_age_s),
        "bytes": outbox.bytes,
        "capacity_bytes": outbox.capacity_bytes,
        "quarantined": outbox.quarantined,
    }


def device_json(device: DeviceStatus) -> dict[str, Any]:
    """Return one device as status and /v1/devices show it."""
    return {
        "name": device.name,
        "kind": device.kind,
        "state": device.state,
        "detail": device.detail,
        "since": rfc3339(device.since),
    }


def _age(seconds: float | None) -> float | None:
    # Milliseconds are all the precision an age needs; fewer digits keep the JSON readable.
    return round(seconds, 3) if seconds is not None else None


def _reason(what: str, detail: str | None) -> str:
    return f"{what}: {detail}" if detail else what
