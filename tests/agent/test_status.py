"""The §7 status document and its verdict, from hand-built snapshots."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.status import DeviceStatus, build_status, rfc3339
from outbox.models import OutboxStats, SinkStats
from outbox.relay import RelayStatus, SinkState

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
TOP_KEYS = {"status", "reasons", "version", "store_id", "started_at", "uptime_s", "outbox",
            "sinks", "devices", "disk"}
OUTBOX_KEYS = {"pending", "in_doubt", "dead", "oldest_pending_age_s", "bytes",
               "capacity_bytes", "quarantined"}
SINK_KEYS = {"name", "state", "pending", "dead", "last_success_at", "last_error",
             "next_attempt_at", "drain_eta_s", "in_doubt", "oldest_pending_age_s"}
DEVICE_KEYS = {"name", "kind", "state", "detail", "since"}


def stats(name: str, pending: int = 0, *, in_doubt: int = 0, dead: int = 0,
          quarantined: int = 0, age: float | None = None) -> SinkStats:
    return SinkStats(name, pending, in_doubt, dead, quarantined, 100 * pending, age)


def outbox(*sinks: SinkStats, capacity: int | None = 1 << 30) -> OutboxStats:
    return OutboxStats(events=sum(s.pending for s in sinks), bytes=4096,
                       capacity_bytes=capacity, sinks={s.sink: s for s in sinks})


def relay(name: str, state: SinkState = SinkState.ONLINE, *, rate: float = 0.0,
          error: str | None = None, success: float | None = None,
          next_at: float | None = None) -> RelayStatus:
    return RelayStatus(sink=name, state=state, last_success_at=success, last_error=error,
                       next_attempt_at=next_at, consecutive_failures=0, in_flight=0,
                       delivery_rate_per_s=rate)


def device(name: str = "receipt", state: str = "connected", *,
           detail: str | None = None) -> DeviceStatus:
    return DeviceStatus(name, "printer", state, detail, T0 - 60)


def status(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        version="1.2.3", store_id="store-7", started_at=T0, now=T0 + 125.9,
        outbox=outbox(stats("cloud")), accepting=True, accept_error=None,
        sinks=["cloud"], relays={"cloud": relay("cloud")}, devices=[device()],
        disk_free_bytes=10_000_000, alert_after_s=900.0)
    args.update(overrides)
    return build_status(**args)


def sink_doc(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in doc["sinks"] if s["name"] == name]
    [only] = found
    return only


def test_a_healthy_agent_reports_ok_with_no_reasons() -> None:
    doc = status()
    assert doc["status"] == "ok"
    assert doc["reasons"] == []


def test_the_document_has_exactly_the_contract_keys_plus_the_additions() -> None:
    doc = status(devices=[device()])
    assert set(doc) == TOP_KEYS
    assert set(doc["outbox"]) == OUTBOX_KEYS
    assert [set(s) for s in doc["sinks"]] == [SINK_KEYS]
    assert [set(d) for d in doc["devices"]] == [DEVICE_KEYS]
    assert doc["disk"] == {"free_bytes": 10_000_000}


def test_the_document_is_plain_json() -> None:
    doc = status(relays={"cloud": relay("cloud", SinkState.OFFLINE, error="connect: refused")})
    assert json.loads(json.dumps(doc)) == doc


def test_identity_and_uptime_fields() -> None:
    doc = status()
    assert doc["version"] == "1.2.3"
    assert doc["store_id"] == "store-7"
    assert doc["started_at"] == "2023-11-14T22:13:20.000Z"
    assert doc["uptime_s"] == 125
    assert isinstance(doc["uptime_s"], int)


def test_uptime_never_goes_negative_when_the_clock_steps_back() -> None:
    assert status(now=T0 - 10)["uptime_s"] == 0


def test_timestamps_are_rfc3339_utc_with_z() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339(T0 + 0.25) == "2023-11-14T22:13:20.250Z"
    assert rfc3339(None) is None


def test_outbox_block_sums_the_sinks() -> None:
    box = outbox(stats("cloud", 5, in_doubt=1, dead=2, quarantined=1, age=30.0),
                 stats("erp", 3, dead=1, age=400.12345))
    doc = status(outbox=box, sinks=["cloud", "erp"],
                 relays={"cloud": relay("cloud"), "erp": relay("erp")})
    assert doc["outbox"] == {"pending": 8, "in_doubt": 1, "dead": 3,
                             "oldest_pending_age_s": 400.123, "bytes": 4096,
                             "capacity_bytes": 1 << 30, "quarantined": 1}


def test_outbox_without_pending_and_without_capacity_shows_nulls() -> None:
    doc = status(outbox=outbox(stats("cloud"), capacity=None))
    assert doc["outbox"]["oldest_pending_age_s"] is None
    assert doc["outbox"]["capacity_bytes"] is None
    assert doc["outbox"]["pending"] == 0


def test_an_unknown_outbox_shows_nulls_not_zeros() -> None:
    doc = status(outbox=None, accepting=False, accept_error="database is locked")
    assert doc["outbox"] == dict.fromkeys(OUTBOX_KEYS)
    cloud = sink_doc(doc, "cloud")
    assert cloud["pending"] is None
    assert cloud["dead"] is None
    assert cloud["drain_eta_s"] is None
    assert set(cloud) == SINK_KEYS


def test_sink_fields_come_from_stats_and_relay() -> None:
    box = outbox(stats("cloud", 4, in_doubt=1, dead=2, age=12.5))
    r = relay("cloud", SinkState.BACKING_OFF, rate=0.5, error="HTTP 503",
              success=T0 + 1, next_at=T0 + 2.5)
    doc = status(outbox=box, relays={"cloud": r})
    assert sink_doc(doc, "cloud") == {
        "name": "cloud", "state": "backing_off", "pending": 4, "dead": 2,
        "last_success_at": "2023-11-14T22:13:21.000Z", "last_error": "HTTP 503",
        "next_attempt_at": "2023-11-14T22:13:22.500Z", "drain_eta_s": 10,
        "in_doubt": 1, "oldest_pending_age_s": 12.5}


@pytest.mark.parametrize("state", [SinkState.PAUSED, SinkState.OFFLINE])
def test_a_sink_that_is_not_delivering_has_no_drain_estimate(state: SinkState) -> None:
    """A paused (401) or unreachable sink drains nothing until it is back: an estimate from
    the last minute's rate (which the audit saw as 8-10 s on a paused sink) would mislead."""
    doc = status(outbox=outbox(stats("cloud", 3)),
                 relays={"cloud": relay("cloud", state, rate=0.5, next_at=T0 + 5)})
    assert sink_doc(doc, "cloud")["drain_eta_s"] is None
    assert sink_doc(doc, "cloud")["pending"] == 3


def test_a_sink_without_relay_status_yet_is_online() -> None:
    doc = status(sinks=["cloud", "erp"], relays={"cloud": relay("cloud")},
                 outbox=outbox(stats("cloud")))
    erp = sink_doc(doc, "erp")
    assert erp["state"] == "online"
    assert erp["pending"] == 0
    assert erp["last_error"] is None
    assert doc["status"] == "ok"


def test_sinks_keep_config_order() -> None:
    doc = status(sinks=["zeta", "alpha", "mid"], relays={}, outbox=outbox())
    assert [s["name"] for s in doc["sinks"]] == ["zeta", "alpha", "mid"]


def test_a_sink_removed_from_config_with_owed_events_shows_offline() -> None:
    box = outbox(stats("cloud"), stats("old", 3, age=10.0), stats("gone"))
    doc = status(outbox=box, sinks=["cloud"])
    assert [s["name"] for s in doc["sinks"]] == ["cloud", "old"]
    old = sink_doc(doc, "old")
    assert old["state"] == "offline"
    assert old["pending"] == 3
    assert "not in the config" in old["last_error"]
    assert doc["status"] == "degraded"


def test_drain_eta_is_owed_over_rate_rounded_to_a_second() -> None:
    box = outbox(stats("cloud", 100, in_doubt=5))
    doc = status(outbox=box, relays={"cloud": relay("cloud", rate=4.0)})
    assert sink_doc(doc, "cloud")["drain_eta_s"] == 26  # 105 / 4 = 26.25


def test_drain_eta_is_zero_when_nothing_is_owed() -> None:
    doc = status(outbox=outbox(stats("cloud", dead=4)), relays={"cloud": relay("cloud")})
    assert sink_doc(doc, "cloud")["drain_eta_s"] == 0


def test_drain_eta_is_unknown_when_pending_but_no_rate_observed() -> None:
    doc = status(outbox=outbox(stats("cloud", 3)), relays={"cloud": relay("cloud", rate=0.0)})
    assert sink_doc(doc, "cloud")["drain_eta_s"] is None
    doc = status(outbox=outbox(stats("cloud", 3)), relays={})
    assert sink_doc(doc, "cloud")["drain_eta_s"] is None


def test_drain_eta_is_at_least_one_second_while_anything_is_owed() -> None:
    doc = status(outbox=outbox(stats("cloud", 1)), relays={"cloud": relay("cloud", rate=50.0)})
    assert sink_doc(doc, "cloud")["drain_eta_s"] == 1


def test_in_doubt_deliveries_alone_count_toward_the_drain_eta() -> None:
    doc = status(outbox=outbox(stats("cloud", 0, in_doubt=6)),
                 relays={"cloud": relay("cloud", rate=2.0)})
    assert sink_doc(doc, "cloud")["drain_eta_s"] == 3


def test_an_outbox_that_cannot_accept_is_failing_with_its_error() -> None:
    doc = status(accepting=False, accept_error="outbox full (1.0 GiB)")
    assert doc["status"] == "failing"
    assert doc["reasons"] == ["outbox not accepting events: outbox full (1.0 GiB)"]


def test_failing_without_an_error_text_still_gives_a_reason() -> None:
    doc = status(accepting=False, accept_error=None)
    assert doc["status"] == "failing"
    assert doc["reasons"] == ["outbox not accepting events"]


def test_failing_outranks_degraded_and_lists_every_reason() -> None:
    doc = status(accepting=False, accept_error="I/O error",
                 relays={"cloud": relay("cloud", SinkState.PAUSED, error="HTTP 401")})
    assert doc["status"] == "failing"
    assert doc["reasons"] == ["outbox not accepting events: I/O error",
                              "sink cloud paused: HTTP 401"]


@pytest.mark.parametrize("state", [SinkState.BACKING_OFF, SinkState.OFFLINE, SinkState.PAUSED])
def test_a_sink_not_online_degrades(state: SinkState) -> None:
    doc = status(relays={"cloud": relay("cloud", state, error="connect: refused")})
    assert doc["status"] == "degraded"
    assert doc["reasons"] == [f"sink cloud {state.value}: connect: refused"]


def test_a_sink_not_online_without_an_error_names_only_its_state() -> None:
    doc = status(relays={"cloud": relay("cloud", SinkState.OFFLINE)})
    assert doc["reasons"] == ["sink cloud offline"]


@pytest.mark.parametrize("state", ["disconnected", "error"])
def test_a_device_not_connected_degrades(state: str) -> None:
    doc = status(devices=[device("receipt", state, detail="paper out")])
    assert doc["status"] == "degraded"
    assert doc["reasons"] == [f"device receipt {state}: paper out"]


def test_a_disabled_device_does_not_degrade() -> None:
    doc = status(devices=[device("receipt", "disabled")])
    assert doc["status"] == "ok"
    assert doc["devices"][0]["state"] == "disabled"


def test_a_connected_device_with_a_warning_detail_stays_ok() -> None:
    doc = status(devices=[device("receipt", "connected", detail="paper near end")])
    assert doc["status"] == "ok"
    assert doc["devices"] == [{"name": "receipt", "kind": "printer", "state": "connected",
                               "detail": "paper near end", "since": "2023-11-14T22:12:20.000Z"}]


def test_a_device_never_seen_has_no_since() -> None:
    doc = status(devices=[DeviceStatus("scale", "scale", "disconnected", None, None)])
    assert doc["devices"][0]["since"] is None
    assert doc["reasons"] == ["device scale disconnected"]


def test_oldest_pending_beyond_the_alert_age_degrades() -> None:
    doc = status(outbox=outbox(stats("cloud", 2, age=1234.4)), alert_after_s=900.0)
    assert doc["status"] == "degraded"
    assert doc["reasons"] == ["oldest pending 1234 s > 900 s"]


def test_oldest_pending_exactly_at_the_alert_age_is_still_ok() -> None:
    doc = status(outbox=outbox(stats("cloud", 2, age=900.0)), alert_after_s=900.0)
    assert doc["status"] == "ok"


def test_the_alert_age_uses_the_oldest_over_all_sinks() -> None:
    box = outbox(stats("cloud", 1, age=5.0), stats("erp", 1, age=1000.0))
    doc = status(outbox=box, sinks=["cloud", "erp"],
                 relays={"cloud": relay("cloud"), "erp": relay("erp")})
    assert doc["reasons"] == ["oldest pending 1000 s > 900 s"]


def test_every_degrading_condition_is_listed() -> None:
    box = outbox(stats("cloud", 2, age=2000.0))
    doc = status(outbox=box, relays={"cloud": relay("cloud", SinkState.OFFLINE, error="dns")},
                 devices=[device("receipt", "error", detail="cover open"),
                          device("drawer", "disabled")])
    assert doc["status"] == "degraded"
    assert doc["reasons"] == ["sink cloud offline: dns", "device receipt error: cover open",
                              "oldest pending 2000 s > 900 s"]
