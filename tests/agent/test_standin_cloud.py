"""The stand-in cloud, exercised by a real aiohttp client over 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.standin.cloud import Fault, StandinCloud, http_date, sign

TOKEN = "tok-123"
SECRET = "whsec-test"


def event(txn: str = "T01-000001", terminal: str = "T01", *, key: str | None = None,
          event_id: str | None = None, total: str = "3.98") -> tuple[str, bytes]:
    """A contract §6 envelope and its key, serialised once (resends reuse these bytes)."""
    key = key or f"key-{terminal}-{txn}"
    envelope = {
        "id": event_id or f"ev-{txn}",
        "idempotency_key": key,
        "store_id": "S1",
        "kind": "transaction",
        "accepted_at": "2026-11-22T10:15:01+01:00",
        "data": {"transaction_id": txn, "terminal_id": terminal, "type": "sale",
                 "total": total, "currency": "EUR"},
    }
    return key, json.dumps(envelope, separators=(",", ":")).encode()


@pytest.fixture
async def cloud() -> AsyncIterator[StandinCloud]:
    async with StandinCloud() as c:
        yield c


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(session: aiohttp.ClientSession, url: str, key: str | None, body: bytes, *,
               headers: Mapping[str, str] | None = None, timeout_s: float = 5.0,
               ) -> tuple[int, Any, Mapping[str, str]]:
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        all_headers["Idempotency-Key"] = key
    async with session.post(url, data=body, headers=all_headers,
                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


# -- idempotency semantics -----------------------------------------------------------------


async def test_first_request_commits_and_a_replay_returns_the_stored_response(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    status, first, headers = await post(session, cloud.url, key, body)
    assert status == 201
    assert "Idempotent-Replayed" not in headers
    assert first["idempotency_key"] == key and first["event_id"] == "ev-T01-000001"

    status, again, headers = await post(session, cloud.url, key, body)
    assert status == 201
    assert headers["Idempotent-Replayed"] == "true"
    assert again == first

    assert cloud.effects_by_key == {key: 1}
    assert len(cloud.effects) == 1 and cloud.effects[0].body == body
    assert cloud.effects[0].envelope["data"]["total"] == "3.98"
    assert [r.outcome for r in cloud.requests] == ["committed", "replayed"]
    assert len(cloud.replays) == 1
    assert cloud.duplicates() == {}


async def test_the_same_key_with_a_different_body_is_refused_with_422_and_recorded(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    _, changed = event(total="4.00")
    assert (await post(session, cloud.url, key, body))[0] == 201
    status, error, _ = await post(session, cloud.url, key, changed)
    assert status == 422
    assert error["error"]["code"] == "idempotency_key_reused"
    assert len(cloud.effects) == 1
    assert [(m.key, m.original_body, m.new_body) for m in cloud.body_mismatches] == [
        (key, body, changed)]


async def test_a_missing_idempotency_key_is_refused_with_400(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    _, body = event()
    status, error, _ = await post(session, cloud.url, None, body)
    assert status == 400
    assert error["error"]["code"] == "idempotency_key_missing"
    assert cloud.effects == []
    assert cloud.requests[0].outcome == "missing_key"


async def test_a_body_that_is_not_a_json_object_is_refused_with_400_and_not_saved(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    assert (await post(session, cloud.url, key, b"{not json"))[0] == 400
    assert (await post(session, cloud.url, key, b"[1, 2]"))[0] == 400
    # Validation failures are not saved (Stripe), so the key is still free for the real body.
    assert (await post(session, cloud.url, key, body))[0] == 201
    assert len(cloud.effects) == 1


async def test_a_wrong_or_missing_bearer_token_is_refused_with_401(
        session: aiohttp.ClientSession) -> None:
    key, body = event()
    async with StandinCloud(token=TOKEN) as cloud:
        assert (await post(session, cloud.url, key, body))[0] == 401
        wrong = {"Authorization": "Bearer nope"}
        status, error, headers = await post(session, cloud.url, key, body, headers=wrong)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert error["error"]["type"] == "authentication_error"
        right = {"Authorization": f"Bearer {TOKEN}"}
        assert (await post(session, cloud.url, key, body, headers=right))[0] == 201
        # Rotating the credential on the live server is how a test expires it.
        cloud.token = "rotated"
        assert (await post(session, cloud.url, key, body, headers=right))[0] == 401
        assert len(cloud.effects) == 1


async def test_a_good_signature_passes_and_a_tampered_body_or_stale_timestamp_fails(
        session: aiohttp.ClientSession) -> None:
    key, body = event()
    async with StandinCloud(signing_secret=SECRET) as cloud:
        now = int(time.time())
        good = {"Tillsync-Signature": sign(SECRET, body, now)}
        tampered = body.replace(b"3.98", b"0.01")
        status, error, _ = await post(session, cloud.url, key, tampered, headers=good)
        assert status == 401 and error["error"]["code"] == "invalid_signature"
        stale = {"Tillsync-Signature": sign(SECRET, body, now - 301)}
        assert (await post(session, cloud.url, key, body, headers=stale))[0] == 401
        assert (await post(session, cloud.url, key, body))[0] == 401
        skewed = {"Tillsync-Signature": sign(SECRET, body, now + 240)}
        assert (await post(session, cloud.url, key, body, headers=skewed))[0] == 201
        assert (await post(session, cloud.url, key, body, headers=good))[0] == 201
        assert cloud.effects_by_key == {key: 1}
        assert [r.outcome for r in cloud.requests] == [
            "bad_signature", "bad_signature", "bad_signature", "committed", "replayed"]


# -- faults, as a real client sees them ----------------------------------------------------


async def test_a_status_fault_answers_without_committing_and_the_retry_commits(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    cloud.faults.extend([Fault.status(500), Fault.status(429, retry_after="0"),
                         Fault.status(401), Fault.status(422)])
    for expected in (500, 429, 401, 422):
        status, error, headers = await post(session, cloud.url, key, body)
        assert status == expected and error["error"]["type"] == "injected_fault"
    assert headers.get("Retry-After") is None
    assert cloud.effects == []
    assert (await post(session, cloud.url, key, body))[0] == 201
    assert [r.status for r in cloud.requests] == [500, 429, 401, 422, 201]


async def test_commit_then_drop_disconnects_the_client_but_commits_the_effect(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    cloud.faults.append(Fault.commit_then_drop())
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, cloud.url, key, body)
    assert cloud.effects_by_key == {key: 1}
    assert (cloud.requests[0].status, cloud.requests[0].outcome) == (None, "committed_dropped")
    # The resend with the same key and bytes gets the saved answer, not a second effect.
    status, _, headers = await post(session, cloud.url, key, body)
    assert status == 201 and headers["Idempotent-Replayed"] == "true"
    assert cloud.effects_by_key == {key: 1}


async def test_drop_before_commit_disconnects_the_client_and_commits_nothing(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    cloud.faults.append(Fault.drop_before_commit())
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, cloud.url, key, body)
    assert cloud.effects == []
    status, _, headers = await post(session, cloud.url, key, body)
    assert status == 201 and "Idempotent-Replayed" not in headers


async def test_commit_then_status_answers_the_error_but_the_retry_gets_the_saved_201(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    cloud.faults.append(Fault.commit_then_status(502))
    assert (await post(session, cloud.url, key, body))[0] == 502
    status, _, headers = await post(session, cloud.url, key, body)
    assert status == 201 and headers["Idempotent-Replayed"] == "true"
    assert cloud.effects_by_key == {key: 1}


async def test_a_slow_request_holds_its_key_so_a_retry_gets_409_and_the_effect_lands_later(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    cloud.faults.append(Fault.slow(0.6))
    with pytest.raises(TimeoutError):
        await post(session, cloud.url, key, body, timeout_s=0.2)
    assert cloud.effects == []
    status, error, _ = await post(session, cloud.url, key, body)
    assert status == 409 and error["error"]["code"] == "request_in_progress"
    async with session.get(cloud.lookup_url(key)) as resp:
        assert resp.status == 409
    # The client gave up, the server did not: the abandoned request still commits.
    (effect,) = await cloud.wait_for_effects(1, timeout_s=2.0)
    assert effect.at - effect.arrived_at >= 0.5
    status, _, headers = await post(session, cloud.url, key, body)
    assert status == 201 and headers["Idempotent-Replayed"] == "true"
    assert cloud.effects_by_key == {key: 1}


async def test_sticky_down_auth_failing_and_latency_apply_to_every_request(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    cloud.down_status = 503
    for _ in range(2):
        assert (await post(session, cloud.url, key, body))[0] == 503
    cloud.down_status = None
    cloud.auth_failing = True
    assert (await post(session, cloud.url, key, body))[0] == 401
    async with session.get(cloud.lookup_url(key)) as resp:
        assert resp.status == 401
    cloud.auth_failing = False
    cloud.latency_s = 0.15
    started = time.monotonic()
    assert (await post(session, cloud.url, key, body))[0] == 201
    assert time.monotonic() - started >= 0.15
    assert [r.outcome for r in cloud.requests] == [
        "down", "down", "unauthorized", "unauthorized", "committed"]


async def test_close_port_refuses_connections_and_open_port_serves_on_the_same_port_again(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    url, port = cloud.url, cloud.port
    assert (await post(session, url, "warm-up", body))[0] == 201  # leaves a pooled connection
    await cloud.close_port()
    assert not cloud.listening
    # The pooled connection was cut too: it fails as a disconnect (or a refusal, if the
    # client already noticed); a new connection is refused.
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, url, key, body)
    with pytest.raises(aiohttp.ClientConnectorError):
        await post(session, url, key, body)
    assert cloud.effects_by_key == {"warm-up": 1}
    await cloud.open_port()
    assert cloud.listening and cloud.port == port and cloud.url == url
    assert (await post(session, url, key, body))[0] == 201
    assert cloud.effects_by_key == {"warm-up": 1, key: 1}


# -- Retry-After watchdog ------------------------------------------------------------------


async def test_a_retry_after_violation_is_recorded_when_a_request_arrives_too_early(
        session: aiohttp.ClientSession) -> None:
    now = [1_800_000_000.0]
    async with StandinCloud(clock=lambda: now[0]) as cloud:
        key, body = event()
        cloud.faults.append(Fault.status(429, retry_after=2))
        assert (await post(session, cloud.url, key, body))[0] == 429
        assert cloud.retry_after_not_before == now[0] + 2
        now[0] += 1.0
        assert (await post(session, cloud.url, "other-key", body))[0] == 201
        (violation,) = cloud.retry_after_violations
        assert violation.key == "other-key" and violation.early_by_s == pytest.approx(1.0)


async def test_no_retry_after_violation_is_recorded_for_a_request_after_the_deadline(
        session: aiohttp.ClientSession) -> None:
    now = [1_800_000_000.0]
    async with StandinCloud(clock=lambda: now[0]) as cloud:
        key, body = event()
        cloud.faults.append(Fault.status(503, retry_after=http_date(now[0] + 30)))
        status, _, headers = await post(session, cloud.url, key, body)
        assert status == 503 and headers["Retry-After"].endswith(" GMT")
        assert cloud.retry_after_not_before == now[0] + 30
        now[0] += 30.0
        assert (await post(session, cloud.url, key, body))[0] == 201
        assert cloud.retry_after_violations == []


async def test_a_retry_after_of_non_ascii_digits_is_answered_and_not_enforced(
        session: aiohttp.ClientSession) -> None:
    """A Retry-After of "¹" (a digit to str.isdigit, not to int) is malformed: the 429 goes
    out as scripted and no deadline is held against the client."""
    async with StandinCloud() as cloud:
        key, body = event()
        cloud.faults.append(Fault.status(429, retry_after="¹"))
        assert (await post(session, cloud.url, key, body))[0] == 429
        assert cloud.retry_after_not_before is None and cloud.retry_after_given == []
        assert (await post(session, cloud.url, key, body))[0] == 201


async def test_retry_after_is_enforced_in_real_time_too(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    cloud.down_status, cloud.down_retry_after = 503, "1"
    assert (await post(session, cloud.url, key, body))[0] == 503
    cloud.down_status = None
    assert (await post(session, cloud.url, key, body))[0] == 201
    assert len(cloud.retry_after_violations) == 1
    await asyncio.sleep(1.05)
    async with session.get(cloud.lookup_url(key)) as resp:
        assert resp.status == 200
    assert len(cloud.retry_after_violations) == 1


# -- oracles -------------------------------------------------------------------------------


async def test_duplicates_detects_two_keys_for_one_transaction_identity(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    _, body_a = event(key="key-a")
    _, body_b = event(key="key-b")  # same sale, key minted anew: the bug this oracle catches
    _, other = event(txn="T01-000002")
    for key, body in (("key-a", body_a), ("key-b", body_b), ("key-c", other)):
        assert (await post(session, cloud.url, key, body))[0] == 201
    assert cloud.effects_by_key == {"key-a": 1, "key-b": 1, "key-c": 1}
    assert cloud.duplicates() == {"T01/T01-000001": 2}


async def test_a_custom_identity_function_decides_what_counts_as_the_same_sale(
        session: aiohttp.ClientSession) -> None:
    async with StandinCloud(identity=lambda env: str(env["id"])) as cloud:
        _, body_a = event(event_id="ev-1")
        _, body_b = event(txn="T01-000002", event_id="ev-1")
        assert (await post(session, cloud.url, "a", body_a))[0] == 201
        assert (await post(session, cloud.url, "b", body_b))[0] == 201
        assert cloud.duplicates() == {"ev-1": 2}


async def test_lookup_returns_the_committed_effect_or_404(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    async with session.get(cloud.lookup_url(key)) as resp:
        assert resp.status == 404
    assert (await post(session, cloud.url, key, body))[0] == 201
    async with session.get(cloud.lookup_url(key)) as resp:
        assert resp.status == 200
        found = await resp.json()
    assert found["idempotency_key"] == key and found["event_id"] == "ev-T01-000001"
    assert found["envelope"] == json.loads(body)
    assert cloud.effects_by_key == {key: 1}


async def test_lookup_faults_are_separate_from_delivery_faults(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    # aiohttp resends an idempotent GET once by itself after a disconnect, so it takes two
    # drops for the caller to see the error.
    drop = Fault.drop_before_commit()
    cloud.lookup_faults.extend([Fault.status(503), drop, drop])
    assert (await post(session, cloud.url, key, body))[0] == 201
    async with session.get(cloud.lookup_url(key)) as resp:
        assert resp.status == 503
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(cloud.lookup_url(key)) as resp:
            await resp.read()
    async with session.get(cloud.lookup_url(key)) as resp:
        assert resp.status == 200
    assert [r.outcome for r in cloud.requests] == [
        "committed", "fault", "dropped", "dropped", "found"]


async def test_a_key_older_than_the_ttl_is_forgotten_so_a_resend_is_a_second_effect(
        session: aiohttp.ClientSession) -> None:
    now = [1_800_000_000.0]
    async with StandinCloud(key_ttl_s=24 * 3600, clock=lambda: now[0]) as cloud:
        key, body = event()
        assert (await post(session, cloud.url, key, body))[0] == 201
        now[0] += 23 * 3600
        assert (await post(session, cloud.url, key, body))[1] is not None
        assert cloud.requests[-1].outcome == "replayed"
        now[0] += 49 * 3600  # a 72-hour outage in all
        # Check-then-create still works: lookup reads the effect log, not the key cache.
        async with session.get(cloud.lookup_url(key)) as resp:
            assert resp.status == 200
        # A blind resend after the TTL executes again, as Stripe would: a real duplicate.
        status, _, headers = await post(session, cloud.url, key, body)
        assert status == 201 and "Idempotent-Replayed" not in headers
        assert cloud.effects_by_key == {key: 2}
        assert cloud.duplicates() == {"T01/T01-000001": 2}


async def test_order_by_stream_lists_event_ids_per_terminal_in_first_effect_order(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    sent = [event("T01-2", "T01"), event("T02-1", "T02"), event("T01-1", "T01"),
            event("T01-2", "T01")]
    for key, body in sent:
        await post(session, cloud.url, key, body)
    assert cloud.order_by_stream() == {"T01": ["ev-T01-2", "ev-T01-1"], "T02": ["ev-T02-1"]}
    by_kind = cloud.order_by_stream(lambda env: str(env["kind"]))
    assert by_kind == {"transaction": ["ev-T01-2", "ev-T02-1", "ev-T01-1"]}


async def test_wait_for_effects_wakes_on_commit_and_times_out_when_none_come(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    waiter = asyncio.create_task(cloud.wait_for_effects(1, timeout_s=2.0))
    await asyncio.sleep(0)
    await post(session, cloud.url, key, body)
    assert [e.key for e in await waiter] == [key]
    with pytest.raises(TimeoutError, match="1 effects"):
        await cloud.wait_for_effects(2, timeout_s=0.1)


async def test_concurrent_requests_with_one_key_commit_exactly_once(
        cloud: StandinCloud, session: aiohttp.ClientSession) -> None:
    key, body = event()
    cloud.faults.append(Fault.slow(0.2))
    statuses = await asyncio.gather(*(post(session, cloud.url, key, body) for _ in range(5)))
    assert sorted(s for s, _, _ in statuses) == [201, 409, 409, 409, 409]
    assert cloud.effects_by_key == {key: 1}


# -- standalone ----------------------------------------------------------------------------


async def test_the_module_runs_standalone_prints_its_url_and_stops_on_sigint(
        session: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.standin.cloud", "--port", "0", "--token", TOKEN,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/events")
        key, body = event()
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await post(session, url, key, body, headers=auth))[0] == 201
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    assert b"committed eff_000001" in await proc.stderr.read()


async def test_the_standalone_help_explains_the_options() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.standin.cloud", "--help", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    for option in (b"--port", b"--token", b"--secret", b"--key-ttl", b"--report",
                   b"Idempotency-Key"):
        assert option in out


async def test_the_standalone_report_option_writes_effects_and_requests_on_sigterm(
        session: aiohttp.ClientSession, tmp_path: Path) -> None:
    report = tmp_path / "cloud.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.standin.cloud", "--port", "0", "--report", str(report),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        key, body = event()
        _, other = event(total="9.99")
        before = time.time()
        assert (await post(session, url, key, body))[0] == 201
        assert (await post(session, url, key, body))[0] == 201  # the replay
        assert (await post(session, url, key, other))[0] == 422
        assert not report.exists()  # written at exit, once
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    doc = json.loads(report.read_text())
    [effect] = doc["effects"]
    assert effect["key"] == key and effect["identity"] == "T01/T01-000001"
    assert effect["envelope"]["data"]["total"] == "3.98"
    assert effect["at"] >= before
    assert [r["outcome"] for r in doc["requests"]] == ["committed", "replayed", "key_reused"]
    assert [r["status"] for r in doc["requests"]] == [201, 201, 422]
    assert [m["key"] for m in doc["body_mismatches"]] == [key]
    assert doc["retry_after_given"] == [] and doc["retry_after_violations"] == []
    assert doc["retry_after_slack_s"] > 0
