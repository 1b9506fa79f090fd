"""Prometheus metrics, read back through prometheus_client's own text parser."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import Metrics
from agent.status import DeviceStatus, build_status
from outbox.classify import Action
from outbox.models import OutboxStats, SinkStats
from outbox.relay import RelayStatus, SinkState

T0 = 1_700_000_000.0

EXPECTED_FAMILIES = {
    "tillsync_events_received": "counter",
    "tillsync_events_rejected": "counter",
    "tillsync_outbox_pending": "gauge",
    "tillsync_outbox_in_doubt": "gauge",
    "tillsync_outbox_dead": "gauge",
    "tillsync_outbox_oldest_pending_age_seconds": "gauge",
    "tillsync_deliveries": "counter",
    "tillsync_delivery_duration_seconds": "histogram",
    "tillsync_sink_up": "gauge",
    "tillsync_device_up": "gauge",
    "tillsync_build_info": "gauge",
}


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, _ = metrics.render()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def names_with(metrics: Metrics, name: str) -> set[frozenset[tuple[str, str]]]:
    return {labels for (n, labels) in samples(metrics) if n == name}


def relay(name: str, state: SinkState = SinkState.ONLINE) -> RelayStatus:
    return RelayStatus(name, state, None, None, None, 0, 0, 0.0)


def doc(sinks: dict[str, SinkStats], states: dict[str, SinkState],
        devices: list[DeviceStatus] | None = None,
        box: bool = True) -> dict[str, Any]:
    outbox = OutboxStats(0, 0, None, sinks) if box else None
    return build_status(version="1", store_id="s", started_at=T0, now=T0, outbox=outbox,
                        accepting=True, accept_error=None, sinks=list(states),
                        relays={n: relay(n, st) for n, st in states.items()},
                        devices=devices or [], disk_free_bytes=None, alert_after_s=900)


def test_every_contract_metric_is_exposed_with_its_type_and_help() -> None:
    metrics = Metrics("1.2.3")
    metrics.event_received("transaction")
    metrics.event_rejected("conflict")
    metrics.attempt("cloud", Action.DELIVERED, 0.1)
    metrics.update(doc({"cloud": SinkStats("cloud", 1, 0, 0, 0, 10, 3.0)},
                       {"cloud": SinkState.ONLINE},
                       [DeviceStatus("receipt", "printer", "connected", None, T0)]))
    body, _ = metrics.render()
    # prometheus_client adds a *_created gauge per counter and histogram (text format 0.0.4).
    families = {f.name: f for f in text_string_to_metric_families(body.decode())
                if not f.name.endswith("_created")}
    assert {name: f.type for name, f in families.items()} == EXPECTED_FAMILIES
    assert all(f.documentation for f in families.values())


def test_render_uses_the_prometheus_content_type() -> None:
    body, content_type = Metrics("1").render()
    assert content_type.startswith("text/plain; version=")
    assert isinstance(body, bytes)


def test_build_info_carries_the_version_with_value_one() -> None:
    assert value(Metrics("1.2.3"), "tillsync_build_info", version="1.2.3") == 1.0


def test_received_and_rejected_events_are_counted_by_label() -> None:
    metrics = Metrics("1")
    for _ in range(3):
        metrics.event_received("transaction")
    metrics.event_received("print")
    metrics.event_rejected("validation_failed")
    metrics.event_rejected("validation_failed")
    metrics.event_rejected("outbox_full")
    assert value(metrics, "tillsync_events_received_total", kind="transaction") == 3
    assert value(metrics, "tillsync_events_received_total", kind="print") == 1
    assert value(metrics, "tillsync_events_rejected_total", reason="validation_failed") == 2
    assert value(metrics, "tillsync_events_rejected_total", reason="outbox_full") == 1


def test_attempts_count_by_outcome_and_time_the_sink() -> None:
    metrics = Metrics("1")
    metrics.attempt("cloud", Action.DELIVERED, 0.004)
    metrics.attempt("cloud", Action.DELIVERED, 0.2)
    metrics.attempt("cloud", Action.RETRY, 31.0)
    metrics.attempt("erp", Action.DEAD, 0.05)
    metrics.attempt("erp", Action.PAUSE, 1.0)
    total = "tillsync_deliveries_total"
    assert value(metrics, total, sink="cloud", outcome="delivered") == 2
    assert value(metrics, total, sink="cloud", outcome="retry") == 1
    assert value(metrics, total, sink="erp", outcome="dead") == 1
    assert value(metrics, total, sink="erp", outcome="pause") == 1
    hist = "tillsync_delivery_duration_seconds"
    assert value(metrics, hist + "_count", sink="cloud") == 3
    assert value(metrics, hist + "_sum", sink="cloud") == 31.204
    assert value(metrics, hist + "_bucket", sink="cloud", le="0.005") == 1
    assert value(metrics, hist + "_bucket", sink="cloud", le="0.25") == 2
    assert value(metrics, hist + "_bucket", sink="cloud", le="30.0") == 2
    assert value(metrics, hist + "_bucket", sink="cloud", le="+Inf") == 3


def test_duration_buckets_span_five_milliseconds_to_thirty_seconds() -> None:
    metrics = Metrics("1")
    metrics.attempt("cloud", Action.DELIVERED, 0.1)
    les = {dict(labels)["le"] for labels in
           names_with(metrics, "tillsync_delivery_duration_seconds_bucket")}
    bounds = sorted(float(le) for le in les if le != "+Inf")
    assert bounds[0] == 0.005
    assert bounds[-1] == 30.0


def test_attempt_fits_the_relay_observer_signature() -> None:
    from outbox.relay import AttemptObserver

    observer: AttemptObserver = Metrics("1").attempt
    observer("cloud", Action.RETRY, 0.5)


def test_update_sets_sink_gauges_from_the_status_document() -> None:
    metrics = Metrics("1")
    metrics.update(doc(
        {"cloud": SinkStats("cloud", 7, 1, 2, 0, 700, 42.5),
         "erp": SinkStats("erp", 0, 0, 0, 0, 0, None)},
        {"cloud": SinkState.BACKING_OFF, "erp": SinkState.ONLINE}))
    assert value(metrics, "tillsync_outbox_pending", sink="cloud") == 7
    assert value(metrics, "tillsync_outbox_in_doubt", sink="cloud") == 1
    assert value(metrics, "tillsync_outbox_dead", sink="cloud") == 2
    assert value(metrics, "tillsync_outbox_oldest_pending_age_seconds", sink="cloud") == 42.5
    assert value(metrics, "tillsync_sink_up", sink="cloud") == 0
    assert value(metrics, "tillsync_outbox_pending", sink="erp") == 0
    assert value(metrics, "tillsync_outbox_in_doubt", sink="erp") == 0
    assert value(metrics, "tillsync_outbox_oldest_pending_age_seconds", sink="erp") == 0
    assert value(metrics, "tillsync_sink_up", sink="erp") == 1


def test_update_sets_device_gauges_with_kind() -> None:
    metrics = Metrics("1")
    metrics.update(doc({}, {}, [
        DeviceStatus("receipt", "printer", "connected", None, T0),
        DeviceStatus("scale", "scale", "error", "no answer", T0),
        DeviceStatus("drawer", "drawer", "disabled", None, None)]))
    assert value(metrics, "tillsync_device_up", device="receipt", kind="printer") == 1
    assert value(metrics, "tillsync_device_up", device="scale", kind="scale") == 0
    assert value(metrics, "tillsync_device_up", device="drawer", kind="drawer") == 0


def test_update_starts_delivery_series_of_a_sink_at_zero() -> None:
    metrics = Metrics("1")
    metrics.update(doc({}, {"cloud": SinkState.ONLINE}))
    for action in Action:
        assert value(metrics, "tillsync_deliveries_total", sink="cloud",
                     outcome=action.value) == 0
    assert value(metrics, "tillsync_delivery_duration_seconds_count", sink="cloud") == 0


def test_sinks_and_devices_that_disappear_lose_their_series() -> None:
    metrics = Metrics("1")
    both = {"cloud": SinkStats("cloud", 1, 0, 0, 0, 1, 1.0),
            "erp": SinkStats("erp", 1, 0, 0, 0, 1, 1.0)}
    metrics.update(doc(both, {"cloud": SinkState.ONLINE, "erp": SinkState.ONLINE},
                       [DeviceStatus("receipt", "printer", "connected", None, T0),
                        DeviceStatus("scale", "scale", "connected", None, T0)]))
    metrics.update(doc({"cloud": both["cloud"]}, {"cloud": SinkState.ONLINE},
                       [DeviceStatus("receipt", "printer", "connected", None, T0)]))
    for gauge in ("tillsync_outbox_pending", "tillsync_outbox_in_doubt", "tillsync_outbox_dead",
                  "tillsync_outbox_oldest_pending_age_seconds", "tillsync_sink_up"):
        assert names_with(metrics, gauge) == {frozenset({("sink", "cloud")})}
    assert names_with(metrics, "tillsync_device_up") == {
        frozenset({("device", "receipt"), ("kind", "printer")})}


def test_a_device_whose_kind_changes_keeps_only_the_new_series() -> None:
    metrics = Metrics("1")
    metrics.update(doc({}, {}, [DeviceStatus("till", "printer", "connected", None, T0)]))
    metrics.update(doc({}, {}, [DeviceStatus("till", "scale", "connected", None, T0)]))
    assert names_with(metrics, "tillsync_device_up") == {
        frozenset({("device", "till"), ("kind", "scale")})}


def test_unknown_outbox_counts_drop_the_count_series_but_keep_sink_up() -> None:
    metrics = Metrics("1")
    metrics.update(doc({"cloud": SinkStats("cloud", 3, 0, 1, 0, 3, 9.0)},
                       {"cloud": SinkState.ONLINE}))
    metrics.update(doc({}, {"cloud": SinkState.OFFLINE}, box=False))
    assert names_with(metrics, "tillsync_outbox_pending") == set()
    assert names_with(metrics, "tillsync_outbox_in_doubt") == set()
    assert names_with(metrics, "tillsync_outbox_dead") == set()
    assert names_with(metrics, "tillsync_outbox_oldest_pending_age_seconds") == set()
    assert value(metrics, "tillsync_sink_up", sink="cloud") == 0


def test_a_sink_that_comes_back_online_reports_up_again() -> None:
    metrics = Metrics("1")
    metrics.update(doc({}, {"cloud": SinkState.PAUSED}))
    metrics.update(doc({}, {"cloud": SinkState.ONLINE}))
    assert value(metrics, "tillsync_sink_up", sink="cloud") == 1


def test_two_instances_do_not_share_state() -> None:
    first, second = Metrics("1.0"), Metrics("2.0")
    first.event_received("transaction")
    first.update(doc({}, {"cloud": SinkState.ONLINE}))
    assert value(second, "tillsync_events_received_total", kind="transaction") is None
    assert names_with(second, "tillsync_sink_up") == set()
    assert value(second, "tillsync_build_info", version="1.0") is None
    assert value(second, "tillsync_build_info", version="2.0") == 1


def test_metrics_never_touch_the_global_registry() -> None:
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)
    Metrics("1").event_received("transaction")
    assert set(REGISTRY._names_to_collectors) == before
    assert not any(name.startswith("tillsync_") for name in before)
