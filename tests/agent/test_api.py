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
from agent.standin.cloud import StandinCloud
from tests.agent.conftest import STATUS_TOKEN, StartAgent, sale

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
