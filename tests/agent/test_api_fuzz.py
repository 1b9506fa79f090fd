"""Fuzz the running agent from its own openapi.json: no 5xx, no crash, no leaked secret.

The agent runs as a real subprocess (``python -m agent run``); Hypothesis generates bodies
from the Transaction and InventoryAdjustment schemas of openapi.json and plain junk.
(hypothesis-jsonschema would do the schema walk, but its release fails on the Hypothesis
in use here, so ``from_openapi`` below covers the subset openapi.json uses.)
``TILLSYNC_FUZZ_EXAMPLES`` raises the number of examples (default 60 each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import openapi_document
from agent.config import load_config
from tests.agent.conftest import STATUS_TOKEN, TOKENS, write_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("TILLSYNC_FUZZ_EXAMPLES", "60"))
OPENAPI = json.loads(openapi_document())
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


def from_openapi(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values shaped by ``schema`` (objects, arrays, patterns, enums), now and then wrong."""
    if "oneOf" in schema:
        return st.one_of([from_openapi(s) for s in schema["oneOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        fields = {k: from_openapi(v) for k, v in props.items()}
        base = st.fixed_dictionaries({k: v for k, v in fields.items() if k in required},
                                     optional={k: v for k, v in fields.items()
                                               if k not in required})
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            return st.dictionaries(st.text(max_size=8), from_openapi(extra), max_size=4)
        return base
    if kind == "array":
        return st.lists(from_openapi(schema["items"]), min_size=schema.get("minItems", 0),
                        max_size=4)
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(max_size=schema.get("maxLength", 40))
    if kind == "integer":
        return st.integers()
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    return st.none() | st.text(max_size=10)


def component(name: str) -> dict[str, Any]:
    """A schema from openapi.json, references inlined, OpenAPI 3.0 ``nullable`` dropped."""
    schemas = OPENAPI["components"]["schemas"]

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(schemas[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items() if k not in ("nullable", "format")}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return dict(inline(schemas[name]))


@pytest.fixture(scope="module")
def agent_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    config = write_config(root)
    log_path = root / "agent.log"
    # A file, not a pipe: nobody reads a pipe while the fuzzing runs, and once 64 KiB of log
    # filled it (a burst of logged 500s did) the agent would stop answering.
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config",
                                 str(config)], cwd=REPO, stderr=log)
    url = f"http://127.0.0.1:{load_config(config).api.port}"
    try:
        for _ in range(200):
            try:
                if request(url, "GET", "/readyz", who=None)[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        yield url
        assert proc.poll() is None, "the agent died during fuzzing"
        assert request(url, "GET", "/healthz", who=None)[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        err = log_path.read_text(errors="replace")
        assert proc.returncode == 0
        for token in (STATUS_TOKEN, *TOKENS.values()):
            assert token not in err  # secrets are never logged


def request(url: str, method: str, path: str, body: bytes | None = None,
            who: str | None = "T01") -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if who:
        headers["Authorization"] = f"Bearer {STATUS_TOKEN if who == 'status' else TOKENS[who]}"
    req = urllib.request.Request(url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def check_answer(code: int, body: Any) -> None:
    assert code < 500, body
    if code >= 400:
        assert set(body["error"]) == {"code", "message", "details"}


@FUZZ
@given(body=from_openapi(component("Transaction")), terminal=st.sampled_from(sorted(TOKENS)))
def test_schema_shaped_transactions_never_break_the_agent(agent_url: str, body: dict[str, Any],
                                                          terminal: str) -> None:
    code, answer = request(agent_url, "POST", "/v1/transactions",
                           json.dumps(body).encode(), who=terminal)
    check_answer(code, answer)
    assert code in (200, 202, 403, 409, 422)


@FUZZ
@given(body=from_openapi(component("InventoryAdjustment")))
def test_schema_shaped_adjustments_never_break_the_agent(agent_url: str,
                                                         body: dict[str, Any]) -> None:
    code, answer = request(agent_url, "POST", "/v1/inventory-adjustments",
                           json.dumps(body).encode())
    check_answer(code, answer)
    assert code in (200, 202, 403, 409, 422)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=2000),
                     st.recursive(st.none() | st.booleans() | st.floats() | st.text(),
                                  lambda inner: st.lists(inner) | st.dictionaries(st.text(),
                                                                                  inner),
                                  max_leaves=30).map(lambda v: json.dumps(v).encode())),
       path=st.sampled_from(["/v1/transactions", "/v1/inventory-adjustments"]))
def test_junk_bodies_get_a_4xx_json_error(agent_url: str, raw: bytes, path: str) -> None:
    code, answer = request(agent_url, "POST", path, raw)
    check_answer(code, answer)
    assert 400 <= code < 500


@FUZZ
@given(query=st.dictionaries(st.sampled_from(["state", "sink", "after", "limit"]),
                             st.text(max_size=12), max_size=4),
       event_id=st.text(max_size=24))
def test_admin_parameters_never_break_the_agent(agent_url: str, query: dict[str, str],
                                                event_id: str) -> None:
    qs = urllib.parse.urlencode(query)
    check_answer(*request(agent_url, "GET", f"/v1/outbox?{qs}", who="status"))
    quoted = urllib.parse.quote(event_id, safe="")
    if quoted:
        check_answer(*request(agent_url, "GET", f"/v1/outbox/{quoted}", who="status"))
