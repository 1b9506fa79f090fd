"""The local API (CONTRACT §4) against a real agent on 127.0.0.1: auth, Host, every code."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.api import openapi_document
from agent.canonical import dedupe_key, idempotency_key
from agent.standin.cloud import StandinCloud
from outbox import NewEvent, Outbox
from tests.agent.conftest import STATUS_TOKEN, StartAgent, sale, write_config

OPENAPI = json.loads(openapi_document())


def schema_of(name: str) -> dict[str, Any]:
    """A component schema with its references resolvable."""
    return {"$ref": f"#/components/schemas/{name}", "components": OPENAPI["components"]}


def valid(instance: Any, name: str) -> None:
    """Check ``instance`` against a component of openapi.json (3.0 nullable handled)."""
    jsonschema.validate(instance, _nullable(schema_of(name)))


def _nullable(node: Any) -> Any:
    # OpenAPI 3.0 "nullable: true" is not JSON Schema; translate it for the validator.
    if isinstance(node, dict):
        out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
        if node.get("nullable"):
            return {"anyOf": [out, {"type": "null"}]}
        return out
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


# -- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "who", "expected"), [
    ("GET", "/healthz", None, 200),
    ("GET", "/readyz", None, 200),
    ("GET", "/v1/status", None, 401),
    ("GET", "/v1/status", "T01", 403),
    ("GET", "/v1/status", "status", 200),
    ("GET", "/metrics", None, 401),
    ("GET", "/metrics", "T01", 403),
    ("GET", "/metrics", "status", 200),
    ("GET", "/v1/outbox", "T01", 403),
    ("GET", "/v1/outbox", "status", 200),
    ("POST", "/v1/outbox/retry-dead", "T02", 403),
    ("POST", "/v1/transactions", None, 401),
    ("POST", "/v1/transactions", "status", 403),
    ("GET", "/v1/devices", "T01", 200),
    ("GET", "/v1/devices", "status", 200),
    ("GET", "/openapi.json", "T01", 200),
])
async def test_each_endpoint_admits_exactly_its_callers(start_agent: StartAgent, method: str,
                                                        path: str, who: str | None,
                                                        expected: int):
    agent = await start_agent()
    if method == "GET":
        code, body = await agent.get(path, who=who)
    else:
        headers = agent.auth(who) if who else {}
        async with agent.http.post(agent.url + path, json=sale(), headers=headers) as resp:
            code, body = resp.status, await resp.json()
    assert code == expected, body
    if code >= 400:
        assert set(body["error"]) == {"code", "message", "details"}
        assert body["error"]["code"] == {401: "unauthorized", 403: "forbidden"}[code]


async def test_an_unknown_token_is_refused_and_the_status_token_is_never_echoed(
        start_agent: StartAgent):
    agent = await start_agent()
    async with agent.http.get(agent.url + "/v1/status",
                              headers={"Authorization": "Bearer not-a-token"}) as resp:
        text = await resp.text()
        assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert STATUS_TOKEN not in text


async def test_a_terminal_may_only_post_its_own_sales(start_agent: StartAgent):
    agent = await start_agent()
    code, body = await agent.post("/v1/transactions", sale("T02"), who="T01")
    assert code == 403 and body["error"]["code"] == "terminal_mismatch"
    assert (await agent.status())["outbox"]["pending"] == 0
    code, _ = await agent.post("/v1/transactions", sale("T02"), who="T02")
    assert code == 202


@pytest.mark.parametrize(("host", "expected"), [
    ("evil.example.com", 421), ("evil.example.com:8765", 421), ("127.0.0.1", 200),
    ("localhost", 200), ("LOCALHOST:1234", 200), ("[::1]:8765", 200), ("", 421),
])
async def test_the_host_header_must_name_this_agent(start_agent: StartAgent, host: str,
                                                    expected: int):
    """DNS rebinding: a browser page on evil.example.com resolving to 127.0.0.1."""
    agent = await start_agent()
    code, body = await agent.get("/v1/status", headers={"Host": host})
    assert code == expected, body
    if code == 421:
        assert body["error"]["code"] == "host_not_allowed"


# -- accepting events ------------------------------------------------------------------------


async def test_a_sale_is_202_after_commit_and_200_with_the_same_body_when_resent(
        start_agent: StartAgent):
    agent = await start_agent()
    code, first = await agent.post("/v1/transactions", sale())
    assert code == 202
    valid(first, "Queued")
    assert first["status"] == "queued" and first["sinks"] == []
    # Committed before the answer: a fresh reader sees it on disk.
    with sqlite3.connect(f"file:{agent.config.outbox.path}?mode=ro", uri=True) as db:
        assert db.execute("SELECT COUNT(*) FROM events").fetchone() == (1,)
    resent = dict(reversed(list(sale().items())))  # same content, other key order
    code, again = await agent.post("/v1/transactions", resent)
    assert code == 200 and again == first


async def test_same_ids_with_other_content_is_a_conflict(start_agent: StartAgent):
    agent = await start_agent()
    assert (await agent.post("/v1/transactions", sale()))[0] == 202
    code, body = await agent.post("/v1/transactions",
                                  sale(total="3.98", customer={"id": "C-1"}))
    assert code == 409 and body["error"]["code"] == "conflict"
    valid(body, "Error")


def adjustment(**changes: Any) -> dict[str, Any]:
    """A valid inventory adjustment (docs/events.md) with its optional fields sent as null."""
    body: dict[str, Any] = {
        "adjustment_id": "T01-ADJ-000042", "terminal_id": "T01", "sku": "5449000000996",
        "reason": "damaged", "delta": "-2", "occurred_at": "2026-11-22T18:40:00+01:00",
        "note": None, "custom_fields": None,
    }
    body.update(changes)
    return body


def without_nulls(value: Any) -> Any:
    """``value`` with every null object member left out, at any depth."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def events_in(agent: Any) -> int:
    """How many events the agent's database holds, read beside the agent."""
    with sqlite3.connect(f"file:{agent.config.outbox.path}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT COUNT(*) FROM events").fetchone()[0])


def sale_with_nulls() -> dict[str, Any]:
    """A sale sending every kind of optional field as null: top level, nested, in a line."""
    body = sale(original_transaction_id=None, customer={"id": "C-778", "email": None},
                custom_fields=None)
    body["lines"][0]["description"] = None
    body["tenders"][0]["reference"] = None
    return body


@pytest.mark.parametrize("first_with_nulls", [True, False])
async def test_an_optional_field_sent_as_null_or_left_out_is_the_same_sale(
        start_agent: StartAgent, first_with_nulls: bool):
    """GIVEN a sale accepted with optional fields sent as null (or left out) WHEN the same
    sale is resent with them left out (or sent as null) THEN 200 with the first answer, one
    event, and the stored event is still exactly the first body (CONTRACT §6); it was 409."""
    agent = await start_agent()
    with_nulls = sale_with_nulls()
    first_body, resend = ((with_nulls, without_nulls(with_nulls)) if first_with_nulls
                          else (without_nulls(with_nulls), with_nulls))
    code, first = await agent.post("/v1/transactions", first_body)
    assert code == 202, first
    for body in (resend, first_body, resend):
        code, again = await agent.post("/v1/transactions", body)
        assert (code, again) == (200, first)
    code, record = await agent.get(f"/v1/outbox/{first['event_id']}")
    assert code == 200 and record["payload"]["data"] == first_body
    assert events_in(agent) == 1


async def test_a_changed_value_is_still_a_conflict_when_nulls_differ_too(
        start_agent: StartAgent):
    agent = await start_agent()
    assert (await agent.post("/v1/transactions", sale_with_nulls()))[0] == 202
    changed = without_nulls(sale_with_nulls())
    changed["customer"]["id"] = "C-779"
    code, body = await agent.post("/v1/transactions", changed)
    assert code == 409 and body["error"]["code"] == "conflict"
    # "" is a value, not "not given"; a custom field's 1 is not 1.0 nor true.
    code, body = await agent.post("/v1/transactions", {**sale_with_nulls(), "custom_fields": {}})
    assert code == 409
    for value in (1, 1.0, True):
        accepted = sale(seq=2, custom_fields={"n": 1})
        code, _ = await agent.post("/v1/transactions", accepted)
        assert code in (200, 202)
        code, body = await agent.post("/v1/transactions", sale(seq=2, custom_fields={"n": value}))
        assert code == (200 if type(value) is int else 409), (value, body)


async def test_an_adjustment_resent_without_its_null_fields_is_the_same_adjustment(
        start_agent: StartAgent):
    agent = await start_agent()
    code, first = await agent.post("/v1/inventory-adjustments", adjustment())
    assert code == 202, first
    code, again = await agent.post("/v1/inventory-adjustments", without_nulls(adjustment()))
    assert (code, again) == (200, first)
    code, body = await agent.post("/v1/inventory-adjustments",
                                  without_nulls(adjustment(delta="-3")))
    assert code == 409 and body["error"]["code"] == "conflict"


async def test_a_sale_accepted_before_the_upgrade_is_recognised_with_or_without_its_nulls(
        start_agent: StartAgent, tmp_path: Path):
    """GIVEN an outbox written by the previous version (the event appended with the payload
    bytes and fingerprint it made) WHEN the agent now gets the same sale, with its null
    field or without it THEN 200 with the first answer, and no second event."""
    write_config(tmp_path)  # the key the agent will use
    body = sale(original_transaction_id=None)
    txn_id = body["transaction_id"]
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    old_payload = f'{{"store_id":"store-042","kind":"transaction","data":{data}}}'.encode()
    store = await Outbox.open(tmp_path / "outbox.db", tmp_path / "outbox.key")
    try:
        appended = await store.append(NewEvent(
            stream="T01", kind="transaction", payload=old_payload, sinks=(),
            idempotency_key=idempotency_key("store-042", "transaction", "T01", txn_id),
            dedupe_key=dedupe_key("transaction", "T01", txn_id)))
    finally:
        await store.close()
    first = {"event_id": str(appended.event_id), "idempotency_key": appended.idempotency_key,
             "status": "queued", "sinks": []}
    agent = await start_agent()
    for resend in (without_nulls(body), body):
        code, again = await agent.post("/v1/transactions", resend)
        assert (code, again) == (200, first)
    code, record = await agent.get(f"/v1/outbox/{appended.event_id}")
    assert code == 200 and record["payload"]["data"] == body
    assert events_in(agent) == 1


async def test_a_conflict_says_how_to_correct_each_kind_of_event(start_agent: StartAgent):
    agent = await start_agent()
    assert (await agent.post("/v1/transactions", sale()))[0] == 202
    code, body = await agent.post("/v1/transactions", sale(customer={"id": "C-1"}))
    assert code == 409
    message = body["error"]["message"]
    assert message.startswith("transaction T01-20261122-000001 of terminal T01")
    assert "void" in message and "new transaction_id" in message
    assert (await agent.post("/v1/inventory-adjustments", adjustment()))[0] == 202
    code, body = await agent.post("/v1/inventory-adjustments", adjustment(delta="-3"))
    assert code == 409
    message = body["error"]["message"]
    assert message.startswith("inventory adjustment T01-ADJ-000042 of terminal T01")
    assert "new adjustment_id" in message and "adjustment for the difference" in message
    for sale_word in ("sale", "void"):
        assert sale_word not in message


async def test_invalid_events_get_one_detail_per_bad_field(start_agent: StartAgent):
    agent = await start_agent()
    bad = sale(currency="EURO", total="9.99")
    bad["lines"][0]["unit_price"] = 1.99  # a float, not a decimal string
    code, body = await agent.post("/v1/transactions", bad)
    assert code == 422
    valid(body, "Error")
    fields = {d["field"] for d in body["error"]["details"]}
    assert {"currency", "lines[0].unit_price"} <= fields
    assert (await agent.status())["outbox"]["pending"] == 0


async def test_a_card_number_anywhere_is_refused_and_never_stored(start_agent: StartAgent):
    agent = await start_agent()
    body = sale(custom_fields={"note": "card 4111 1111 1111 1111 declined"})
    code, answer = await agent.post("/v1/transactions", body)
    assert code == 422 and answer["error"]["code"] == "card_number_not_allowed"
    assert "4111" not in json.dumps(answer)
    db = Path(agent.config.outbox.path)
    for path in db.parent.glob(db.name + "*"):
        assert b"4111" not in path.read_bytes()


async def test_malformed_json_and_oversized_bodies_get_their_codes(start_agent: StartAgent):
    agent = await start_agent()
    code, body = await agent.post("/v1/transactions", b'{"transaction_id": ')
    assert code == 422 and body["error"]["code"] == "invalid_json"
    huge = json.dumps(sale(custom_fields={"x": "y" * (300 * 1024)})).encode()
    code, body = await agent.post("/v1/transactions", huge)
    assert code == 413 and body["error"]["code"] == "too_large"
    valid(body, "Error")


async def test_a_full_outbox_answers_507_and_keeps_what_it_has(start_agent: StartAgent,
                                                               cloud: StandinCloud):
    await cloud.close_port()  # nothing is delivered, so nothing may be released for room
    agent = await start_agent(outbox_extra="capacity_bytes = 3000", sink_url=cloud.url)
    accepted = []
    for seq in range(1, 40):
        code, body = await agent.post("/v1/transactions", sale(seq=seq))
        if code == 507:
            assert body["error"]["code"] == "outbox_full"
            break
        assert code == 202, body
        accepted.append(body["event_id"])
    else:
        pytest.fail("the outbox never filled")
    status = await agent.status()
    assert status["status"] == "failing"
    for event_id in accepted:
        code, record = await agent.get(f"/v1/outbox/{event_id}")
        assert code == 200 and record["payload"]["data"]["type"] == "sale"


async def test_unknown_paths_and_methods_answer_json_errors(start_agent: StartAgent):
    agent = await start_agent()
    code, body = await agent.get("/v1/nothing-here")
    assert code == 404 and body["error"]["code"] == "not_found"
    async with agent.http.delete(agent.url + "/v1/status", headers=agent.auth("status")) as r:
        assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(("method", "path", "expected", "allow"), [
    ("GET", "/v1/transactions", 405, "POST"),
    ("DELETE", "/v1/transactions", 405, "POST"),
    ("GET", "/v1/print", 405, "POST"),
    ("POST", "/v1/status", 405, "GET"),
    ("GET", "/v1/nope", 404, None),
    ("GET", "/v1/outbox/retry-dead", 405, "POST"),
    ("DELETE", "/v1/outbox/retry-dead", 405, "POST"),
])
async def test_any_valid_token_gets_404_or_405_with_allow_and_no_token_gets_401(
        start_agent: StartAgent, method: str, path: str, expected: int, allow: str | None):
    """GIVEN a path that does not exist, or a method its path does not take WHEN a terminal
    or the status token asks THEN both get the router's 404, or 405 naming the allowed
    methods, in the contract's error body (a terminal token got 403 "needs the status token");
    without a valid token it is 401, as for every route, so no caller without a token learns
    which paths exist."""
    agent = await start_agent()
    for who in ("T01", "status"):
        async with agent.http.request(method, agent.url + path, headers=agent.auth(who)) as r:
            code, body, allowed = r.status, await r.json(), r.headers.get("Allow")
        assert code == expected, (who, body)
        valid(body, "Error")
        assert body["error"]["code"] == {404: "not_found", 405: "method_not_allowed"}[code]
        if allow is None:
            assert allowed is None
        else:
            assert allowed is not None and allow in allowed.split(","), allowed
            assert allow in body["error"]["message"]
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        async with agent.http.request(method, agent.url + path, headers=headers) as r:
            code, body = r.status, await r.json()
        assert code == 401 and body["error"]["code"] == "unauthorized", body


async def test_a_route_the_token_may_not_call_is_still_403(start_agent: StartAgent):
    agent = await start_agent()
    code, body = await agent.get("/v1/outbox/1", who="T01")
    assert code == 403 and body["error"]["code"] == "forbidden"
    code, body = await agent.post("/v1/outbox/retry-dead", {}, who="T01")
    assert code == 403 and body["error"]["code"] == "forbidden"


async def test_an_event_id_of_non_ascii_digits_is_404_not_a_crash(start_agent: StartAgent):
    """GIVEN ids that str.isdigit() calls digits but int() refuses ("¹") or reads as a number
    ("٣") WHEN shown or retried THEN 404 not_found, as for any id never issued (Hypothesis
    found the "¹" as a 500)."""
    agent = await start_agent()
    for raw in ("%C2%B9", "%D9%A3"):
        code, body = await agent.get(f"/v1/outbox/{raw}")
        assert code == 404 and body["error"]["code"] == "not_found", body
        code, body = await agent.post(f"/v1/outbox/{raw}/retry", b"", who="status")
        assert code == 404 and body["error"]["code"] == "not_found", body


# -- status, admin, documents ----------------------------------------------------------------


async def test_status_and_admin_answers_match_openapi(start_agent: StartAgent,
                                                      cloud: StandinCloud):
    cloud.faults.append(__import__("agent.standin.cloud", fromlist=["Fault"]).Fault.status(400))
    agent = await start_agent(sink_url=cloud.url)
    code, queued = await agent.post("/v1/transactions", sale())
    assert code == 202 and queued["sinks"] == ["cloud"]
    for _ in range(100):
        status = await agent.status()
        if status["outbox"]["dead"] == 1:
            break
        await asyncio.sleep(0.05)
    valid(status, "Status")
    assert status["status"] == "ok" and status["sinks"][0]["dead"] == 1
    code, page = await agent.get("/v1/outbox?state=dead")
    assert code == 200 and [d["event_id"] for d in page["deliveries"]] == [queued["event_id"]]
    for item in page["deliveries"]:
        valid(item, "Delivery")
    code, record = await agent.get(f"/v1/outbox/{queued['event_id']}")
    valid(record, "EventRecord")
    assert record["payload"]["data"] == sale()  # decrypted, as the terminal sent it
    code, retried = await agent.post(f"/v1/outbox/{queued['event_id']}/retry", {},
                                     who="status")
    assert code == 200 and retried == {"requeued": 1}
    effects = await cloud.wait_for_effects(1, timeout_s=10)
    assert json.loads(effects[0].body)["data"] == sale()


async def test_openapi_json_is_served_as_kept_in_the_repo(start_agent: StartAgent):
    agent = await start_agent()
    code, served = await agent.get("/openapi.json", who="T01")
    assert code == 200 and served == OPENAPI
    routes = {(m.upper(), p) for p, item in OPENAPI["paths"].items() for m in item}
    app_routes = {(r.method, r.resource.canonical) for r in agent_app_routes()}
    assert routes == app_routes


def agent_app_routes() -> list[Any]:
    from agent.api import build_app

    class _Stub:
        pass

    return [r for r in build_app(_Stub()).router.routes()  # type: ignore[arg-type]
            if r.method != "HEAD" and r.resource is not None]
