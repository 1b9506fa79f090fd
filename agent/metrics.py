"""Prometheus metrics of CONTRACT §7, in a registry of their own.

Counters and the delivery histogram are fed as things happen (``event_received``,
``event_rejected``, ``attempt``); the gauges are refreshed from a status document
(``update``), so ``/metrics`` and ``/v1/status`` never disagree about a sink's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from outbox.classify import Action

PREFIX = "tillsync_"

# From a fast LAN answer to the longest HTTP timeout a sink is expected to use.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _TrackedGauge:
    """A labelled gauge that forgets the label sets a refresh no longer mentions."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self._labels: set[tuple[str, ...]] = set()

    def replace(self, values: Mapping[tuple[str, ...], float]) -> None:
        for labels, value in values.items():
            self.gauge.labels(*labels).set(value)
        for labels in self._labels - values.keys():
            self.gauge.remove(*labels)
        self._labels = set(values)


class Metrics:
    """The agent's metrics; each instance owns its registry, so tests and agents never mix."""

    def __init__(self, version: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._received = Counter(
            PREFIX + "events_received", "Events accepted from terminals, by kind.",
            ["kind"], registry=r)
        self._rejected = Counter(
            PREFIX + "events_rejected", "Events refused by the local API, by error code.",
            ["reason"], registry=r)
        self._pending = _TrackedGauge(Gauge(
            PREFIX + "outbox_pending",
            "Deliveries owed to a sink, in flight included, in doubt not (see outbox_in_doubt).",
            ["sink"], registry=r))
        self._in_doubt = _TrackedGauge(Gauge(
            PREFIX + "outbox_in_doubt",
            "Deliveries owed to a sink whose last attempt may have reached it unanswered.",
            ["sink"], registry=r))
        self._dead = _TrackedGauge(Gauge(
            PREFIX + "outbox_dead", "Dead-lettered deliveries of a sink, kept for an operator.",
            ["sink"], registry=r))
        self._oldest = _TrackedGauge(Gauge(
            PREFIX + "outbox_oldest_pending_age_seconds",
            "Age of the oldest event still owed to a sink (0 when none).",
            ["sink"], registry=r))
        self._deliveries = Counter(
            PREFIX + "deliveries", "Delivery attempts, by sink and outcome.",
            ["sink", "outcome"], registry=r)
        self._duration = Histogram(
            PREFIX + "delivery_duration_seconds", "Duration of delivery attempts, by sink.",
            ["sink"], buckets=DELIVERY_BUCKETS, registry=r)
        self._sink_up = _TrackedGauge(Gauge(
            PREFIX + "sink_up", "1 when the sink is online, 0 when backing off, offline or paused.",
            ["sink"], registry=r))
        self._device_up = _TrackedGauge(Gauge(
            PREFIX + "device_up", "1 when the device is connected.",
            ["device", "kind"], registry=r))
        build = Gauge(PREFIX + "build_info", "The running tillsync version; always 1.",
                      ["version"], registry=r)
        build.labels(version).set(1)

    def event_received(self, kind: str) -> None:
        """Count one event accepted from a terminal."""
        self._received.labels(kind).inc()

    def event_rejected(self, reason: str) -> None:
        """Count one event refused, by the API error code (e.g. "validation_failed")."""
        self._rejected.labels(reason).inc()

    def attempt(self, sink: str, action: Action, seconds: float) -> None:
        """Record one delivery attempt; fits the relay's ``AttemptObserver``."""
        self._deliveries.labels(sink, Action(action).value).inc()
        self._duration.labels(sink).observe(seconds)

    def update(self, status: Mapping[str, Any]) -> None:
        """Refresh the gauges from a ``build_status()`` document."""
        pending: dict[tuple[str, ...], float] = {}
        in_doubt: dict[tuple[str, ...], float] = {}
        dead: dict[tuple[str, ...], float] = {}
        oldest: dict[tuple[str, ...], float] = {}
        up: dict[tuple[str, ...], float] = {}
        for sink in status.get("sinks", ()):
            key = (sink["name"],)
            up[key] = 1.0 if sink["state"] == "online" else 0.0
            self._touch_sink(sink["name"])
            # None means the counts are unknown (outbox not open): the series goes absent
            # rather than report a made-up 0.
            if sink.get("pending") is not None:
                pending[key] = sink["pending"]
                in_doubt[key] = sink.get("in_doubt") or 0
                oldest[key] = sink.get("oldest_pending_age_s") or 0.0
            if sink.get("dead") is not None:
                dead[key] = sink["dead"]
        self._pending.replace(pending)
        self._in_doubt.replace(in_doubt)
        self._dead.replace(dead)
        self._oldest.replace(oldest)
        self._sink_up.replace(up)
        self._device_up.replace({
            (d["name"], d["kind"]): 1.0 if d["state"] == "connected" else 0.0
            for d in status.get("devices", ())})

    def render(self) -> tuple[bytes, str]:
        """Return the exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _touch_sink(self, sink: str) -> None:
        # Series that exist at 0 from the start let rate() and increase() see the first
        # attempt; a series born at 1 looks like no change.
        for action in Action:
            self._deliveries.labels(sink, action.value)
        self._duration.labels(sink)
