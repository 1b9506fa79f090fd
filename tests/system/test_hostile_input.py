"""Hostile input against ``tillsync run`` (issue 7, deliverable 5): the agent keeps serving.

One agent process, started with the open-files limit systemd gives a service by default
(soft 1024, ``hostile.LIMITED_AGENT``), takes the whole barrage in this file, in order:

1. schema-driven fuzzing of every operation in ``agent/openapi.json`` with Schemathesis
   (positive and negative examples, the right token for each route): no 5xx, and every
   answer's status, content type and body conform to the document;
2. malformed bodies: broken JSON, wrong content types, 100 000-deep nesting, Unicode edge
   cases, undecodable gzip, and requests that are not HTTP at all: each gets a 4xx (a JSON
   error naming the field or reason, for anything that reached the API), the log does not
   fill with tracebacks;
3. huge bodies: 50 MB with a Content-Length, 50 MB chunked, a gzip bomb (512 MiB of zeros
   in ~0.5 MB): ``413`` within a second or two, long before the body was all sent, and no
   memory to show for it;
4. slow connections: 450 slowloris connections and 20 slow-body posts: ``/healthz`` and a
   till's sale are answered within 1 s throughout, the agent closes every slow connection
   itself (idle timeout, body timeout: 408) and gets back to its baseline descriptors;
5. a flood: 1 100 slowloris connections (more than the 1 024 descriptors the process may
   open) from another process, each back half a second after the agent drops it: the
   agent never runs out of descriptors and keeps answering ``/healthz`` and sales;
6. memory: after all of that, resident memory is within ``RSS_BOUND_KIB`` of its baseline.

After each step the process is the same pid, ``/healthz`` answers and a valid sale gets
``202``. The figures (latencies, RSS, descriptors, time to 413) are printed and recorded as
test properties. Every step also runs on its own (``-k``); the memory step runs whatever
steps did not run before it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from agent.api import BODY_TIMEOUT_S, MAX_BODY_BYTES
from agent.guard import IDLE_TIMEOUT_S, LINGER_S
from tests.system.harness import (
    REPO,
    STATUS_TOKEN,
    AgentProcess,
    sale,
    token_for,
    write_agent_config,
)
from tests.system.hostile import (
    LIMITED_AGENT,
    SERVICE_NOFILE_SOFT,
    SlowLoris,
    fd_count,
    nofile_soft,
    read_answer,
    request_head,
    rss_kib,
    slow_body,
    stream_body,
)

TILL, OTHER_TILL = "T01", "T02"
FUZZ_EXAMPLES = 30  # per operation and generation mode: ~15 s for the 16 operations
SLOWLORIS = 450  # with the slow bodies, under the connection limit (512): none dropped early
SLOW_BODIES = 20
FLOOD = 1100  # more than the process's 1024 descriptors
ATTACK_S = 5.0  # how long /healthz and a till are measured under the full attack
LATENCY_BOUND_S = 1.0
# Under the flood the attacker, the agent and this test share two cores, and a till's SYN
# can meet a full accept queue and wait for its 1 s retransmission. Before the connection
# limit the agent did not answer at all (accept() failed: no descriptors left).
FLOOD_LATENCY_BOUND_S = 2.0
FLOOD_MEDIAN_BOUND_S = 0.5
HUGE = 50 * 1024 * 1024
# Memory after the whole barrage, over the baseline. Below the 50 MB of one buffered huge
# body, let alone the 512 MiB gzip bomb, so an agent that buffers or inflates either fails;
# above the allocator's high-water mark from 1 100 connections at once (aiohttp's protocol,
# parser and transport take ~5 KiB each) plus Schemathesis's bodies of up to 256 KiB, which
# CPython's arenas keep rather than give back to the OS.
RSS_BOUND_KIB = 40 * 1024

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]


@dataclass
class Target:
    """The agent under attack and what it looked like before."""

    agent: AgentProcess
    pid: int
    host: str
    port: int
    baseline_rss_kib: int
    baseline_fds: int
    seq: int = 1000
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # step -> figures

    def next_sale(self, terminal: str = TILL) -> dict[str, Any]:
        """A valid sale not posted before."""
        self.seq += 1
        return sale(terminal, self.seq)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def target(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Target]:
    """GIVEN ``tillsync run`` with two tills and the systemd default open-files limit."""
    root = tmp_path_factory.mktemp("hostile")
    config = write_agent_config(root, sink_url=None, terminals=[TILL, OTHER_TILL])
    agent = AgentProcess(config, log_path=root / "agent.log", command=LIMITED_AGENT)
    await agent.start()
    assert agent.pid is not None
    pid = agent.pid
    assert nofile_soft(pid) == SERVICE_NOFILE_SOFT
    host, port = agent.base.removeprefix("http://").rsplit(":", 1)
    t = Target(agent, pid, host, int(port), 0, 0)
    # Warm up (lazy imports, first commit, status and metrics code) before the baseline.
    async with aiohttp.ClientSession() as http:
        for _ in range(20):
            assert (await post_sale(http, t))[0] == 202
        for path in ("/v1/status", "/metrics", "/v1/outbox"):
            async with http.get(agent.base + path, headers=bearer(STATUS_TOKEN)) as resp:
                assert resp.status == 200
    await asyncio.sleep(0.5)
    t.baseline_rss_kib, t.baseline_fds = rss_kib(pid), fd_count(pid)
    try:
        yield t
    finally:
        print(f"hostile figures: {json.dumps(t.steps)}")
        assert await agent.stop() == 0, agent.log_tail()


# -- helpers -------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


JSON_TILL = {**bearer(token_for(TILL)), "Content-Type": "application/json"}


async def post_sale(http: aiohttp.ClientSession, t: Target,
                    timeout_s: float = 10.0) -> tuple[int, float]:
    """Post a new valid sale as the till; its status and how long the answer took."""
    started = time.monotonic()
    async with http.post(t.agent.base + "/v1/transactions", json=t.next_sale(),
                         headers=bearer(token_for(TILL)),
                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        await resp.read()
        return resp.status, time.monotonic() - started


async def health(http: aiohttp.ClientSession, t: Target,
                 timeout_s: float = 10.0) -> tuple[int, float]:
    """``GET /healthz``: status and latency."""
    started = time.monotonic()
    async with http.get(t.agent.base + "/healthz",
                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        await resp.read()
        return resp.status, time.monotonic() - started


async def assert_still_serving(t: Target) -> None:
    """THEN the same process serves: same pid, /healthz 200, a valid sale 202."""
    assert t.agent.pid == t.pid, f"the agent died or restarted:\n{t.agent.log_tail()}"
    async with aiohttp.ClientSession() as http:
        assert (await health(http, t))[0] == 200
        assert (await post_sale(http, t))[0] == 202, t.agent.log_tail()


def log_lines(t: Target) -> int:
    """Lines in the agent's log so far."""
    return len(t.agent.log_path.read_text(errors="replace").splitlines())


def record(t: Target, step: str, figures: dict[str, Any],
           record_property: Callable[[str, object], None]) -> None:
    """Keep ``figures`` for the summary, print them and attach them to the test report."""
    t.steps[step] = figures
    print(f"{step}: {json.dumps(figures)}")
    for name, value in figures.items():
        record_property(f"{step}.{name}", value)


# -- 1. schema-driven fuzzing -------------------------------------------------------------

# The event stream never ends a response (text/event-stream held open); every other route
# of openapi.json is fuzzed.
NOT_FUZZED = {"/v1/events/stream"}


def schemathesis_run(base: str, examples: int) -> tuple[Counter[str], list[str]]:
    """Fuzz every operation of agent/openapi.json against ``base``; (answers, failures)."""
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    schema = schemathesis.openapi.from_path(REPO / "agent" / "openapi.json")
    answers: Counter[str] = Counter()
    failures: list[str] = []
    session = requests.Session()

    def fuzzer(operation: Any, mode: Any, headers: dict[str, str]) -> Callable[[], None]:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: Any) -> None:
            response = case.call(base_url=base, session=session, headers=headers, timeout=10)
            answers[f"{operation.label} {mode.value} {response.status_code}"] += 1
            case.validate_response(response, checks=checks)

        return fuzz  # type: ignore[no-any-return]

    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in NOT_FUZZED:
            continue
        roles = {name for requirement in operation.definition.raw.get("security", [])
                 for name in requirement}
        token = token_for(TILL) if "terminal" in roles else STATUS_TOKEN
        headers = bearer(token) if roles else {}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz = fuzzer(operation, mode, headers)
            try:
                fuzz()
            except Unsatisfiable:
                # Negative mode on an operation with no parameters and no body: there is
                # nothing to make invalid (/healthz, /readyz). Positive mode must run.
                if mode is GenerationMode.POSITIVE:
                    failures.append(f"{operation.label}: no example could be generated")
            except Exception as err:  # a check failed: schemathesis's report, shrunk
                failures.append(f"{operation.label} ({mode.value}): {err}")
    return answers, failures


async def step_fuzz(t: Target) -> dict[str, Any]:
    """Run Schemathesis; return the figures (failures included)."""
    started = time.monotonic()
    answers, failures = await asyncio.to_thread(schemathesis_run, t.agent.base,
                                                FUZZ_EXAMPLES)
    statuses: Counter[str] = Counter()
    for key, n in answers.items():
        statuses[key.rsplit(" ", 1)[1]] += n
    return {"requests": sum(answers.values()), "operations": len({k.rsplit(" ", 2)[0]
                                                                   for k in answers}),
            "statuses": dict(sorted(statuses.items())), "failures": failures,
            "seconds": round(time.monotonic() - started, 1)}


async def test_schema_driven_fuzzing_gets_no_5xx_and_only_documented_answers(
        target: Target, record_property: Callable[[str, object], None]):
    """GIVEN the running agent and its own openapi.json WHEN Schemathesis sends ~30 positive
    and ~30 negative examples to every operation, with the right token for each route THEN
    no answer is a 5xx, every status, content type and body conforms to the document, and
    the agent still serves."""
    figures = await step_fuzz(target)
    record(target, "fuzz", figures, record_property)
    assert not figures["failures"], "\n\n".join(figures["failures"])
    assert figures["operations"] == 16, figures  # all 17 but the event stream
    assert figures["requests"] >= 15 * FUZZ_EXAMPLES, figures
    assert not any(status.startswith("5") for status in figures["statuses"]), figures
    await assert_still_serving(target)


# -- 2. malformed bodies ------------------------------------------------------------------


def _sale_text(t: Target, **changes: Any) -> str:
    return json.dumps({**t.next_sale(), **changes}, ensure_ascii=False)


def _with_line(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``body`` with its one line changed."""
    return {**body, "lines": [{**body["lines"][0], **changes}]}


@dataclass
class Bad:
    """A malformed request and the refusal it must get."""

    name: str
    body: bytes
    status: int = 422
    code: str = "invalid_json"
    # (field, code) that one details entry must carry; code None: any code for that field
    detail: tuple[str, str | None] | None = None
    path: str = "/v1/transactions"
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON_TILL))


def malformed_cases(t: Target) -> list[Bad]:
    """Bodies no till should send, each with the answer it must get."""
    deep_array = b"[" * 100_000 + b"]" * 100_000  # 200 kB: under the body limit
    deep_object = b'{"a":' * 30_000 + b"1" + b"}" * 30_000
    deep_custom = _sale_text(t)[:-1] + ', "custom_fields": {"x": ' + "[" * 50_000 + "]" * 50_000
    deep_custom += "}}"
    lone_surrogate = _sale_text(t).replace('"Ballpoint pen"', '"pen \\udc00"')
    form = {**JSON_TILL, "Content-Type": "application/x-www-form-urlencoded"}
    return [
        Bad("empty", b"", detail=("", "syntax_error")),
        Bad("truncated", _sale_text(t)[:40].encode(), detail=("", "syntax_error")),
        Bad("not json", b"hello till", detail=("", "syntax_error")),
        Bad("null", b"null", detail=("", "not_an_object")),
        Bad("array", b"[]", detail=("", "not_an_object")),
        Bad("trailing comma", _sale_text(t)[:-1].encode() + b",}", detail=("", "syntax_error")),
        Bad("NaN total", _sale_text(t).replace('"total": "', '"total": NaN, "x": "').encode(),
            detail=("", "syntax_error")),
        Bad("duplicate key", _sale_text(t)[:-1].encode() + b', "total": "0.00"}'),
        Bad("100k nested arrays", deep_array, detail=("", "too_deep")),
        Bad("30k nested objects", deep_object, detail=("", "too_deep")),
        Bad("deep custom field", deep_custom.encode(), detail=("", "too_deep")),
        Bad("deep nesting, adjustment", deep_array, path="/v1/inventory-adjustments",
            detail=("", "too_deep")),
        Bad("deep nesting, print", deep_array, path="/v1/print"),
        Bad("invalid UTF-8", _sale_text(t).encode().replace(b"Ballpoint", b"Ball\xff\xfe"),
            detail=("", "not_utf8")),
        Bad("overlong UTF-8 slash", _sale_text(t).encode().replace(b"pen", b"pe\xc0\xaf"),
            detail=("", "not_utf8")),
        Bad("UTF-8 BOM", b"\xef\xbb\xbf" + _sale_text(t).encode(), detail=("", "syntax_error")),
        Bad("UTF-16 body", _sale_text(t).encode("utf-16"), detail=("", "not_utf8")),
        Bad("lone surrogate escape", lone_surrogate.encode(), detail=("", "unpaired_surrogate")),
        Bad("NUL in id", _sale_text(t, transaction_id="T01-\x00-1").encode(),
            code="validation_failed", detail=("transaction_id", "invalid_format")),
        Bad("right-to-left override in id", _sale_text(t, transaction_id="T01-\u202e1").encode(),
            code="validation_failed", detail=("transaction_id", "invalid_format")),
        Bad("zero-width space in id", _sale_text(t, transaction_id="T01\u200b-9").encode(),
            code="validation_failed", detail=("transaction_id", "invalid_format")),
        Bad("full-width digits in total", _sale_text(t, total="\uff13.\uff19\uff18").encode(),
            code="validation_failed", detail=("total", None)),
        Bad("Arabic-Indic digits in a quantity",
            json.dumps(_with_line(t.next_sale(), quantity="\u0662")).encode(),
            code="validation_failed", detail=("lines[0].quantity", None)),
        Bad("form body", b"transaction_id=T01-1&total=3.98", headers=form,
            detail=("", "syntax_error")),
        Bad("XML body", b"<sale><total>3.98</total></sale>",
            headers={**JSON_TILL, "Content-Type": "application/xml"},
            detail=("", "syntax_error")),
        Bad("multipart body", b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--x--",
            headers={**JSON_TILL, "Content-Type": "multipart/form-data; boundary=x"},
            detail=("", "syntax_error")),
        Bad("undecodable gzip", b"\x1f\x8b\x08\x00not gzip at all",
            headers={**JSON_TILL, "Content-Encoding": "gzip"}, detail=("", "unreadable_body")),
        Bad("undecodable deflate", b"not deflate",
            headers={**JSON_TILL, "Content-Encoding": "deflate"},
            detail=("", "unreadable_body")),
        Bad("another till's sale", _sale_text(t, terminal_id=OTHER_TILL).encode(), status=403,
            code="terminal_mismatch", detail=("terminal_id", "terminal_mismatch")),
    ]


# Requests that are not HTTP a server should parse at all. aiohttp answers them itself,
# before routing, with a plain-text 400 (docs/security.md), and closes the connection.
NOT_HTTP = {
    "TLS hello on the plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),
    "binary garbage": b"\x00\xff\xfe garbage \r\n\r\n",
    "bad method": b"G\x01T /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "header line over 8 KiB": (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
                               + b"a" * 20_000 + b"\r\n\r\n"),
    "200 headers": (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n"),
    "URI over 8 KiB": b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    "Content-Length and chunked": request_head("POST", "/v1/transactions", {
        **JSON_TILL, "Content-Length": "5", "Transfer-Encoding": "chunked"}) + b"0\r\n\r\n",
    "bad chunk size": request_head("POST", "/v1/transactions", {
        **JSON_TILL, "Transfer-Encoding": "chunked"}) + b"zz\r\nabc\r\n0\r\n\r\n",
    "negative Content-Length": request_head("POST", "/v1/transactions", {
        **JSON_TILL, "Content-Length": "-1"}),
    "Content-Encoding br (no decoder)": request_head("POST", "/v1/transactions", {
        **JSON_TILL, "Content-Encoding": "br", "Content-Length": "4"}) + b"xxxx",
}


async def raw_exchange(t: Target, data: bytes) -> tuple[int, bytes, bool]:
    """Send ``data`` on a new connection; (status, body, whether the agent then closed)."""
    reader, writer = await asyncio.open_connection(t.host, t.port)
    try:
        writer.write(data)
        status, body = await read_answer(reader, 5.0)
        try:
            closed = await asyncio.wait_for(reader.read(1), 5.0) == b""
        except ConnectionError:
            closed = True
        return status, body, closed
    finally:
        writer.close()


async def step_malformed(t: Target) -> dict[str, Any]:
    """Send every malformed case; return the answers and the figures."""
    lines_before = log_lines(t)
    answers: dict[str, Any] = {}
    wrong: list[str] = []
    async with aiohttp.ClientSession() as http:
        for bad in malformed_cases(t):
            try:
                async with http.post(t.agent.base + bad.path, data=bad.body,
                                     headers=bad.headers) as resp:
                    text = await resp.text()
                    status, content_type = resp.status, resp.content_type
            except aiohttp.ClientError as err:
                wrong.append(f"{bad.name}: no answer: {err!r}")
                continue
            answers[bad.name] = status
            try:
                error = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                wrong.append(f"{bad.name}: {status} {content_type} not a JSON error: "
                             f"{text[:200]}")
                continue
            fields = {(d.get("field"), d.get("code")) for d in error["details"]}
            if (status != bad.status or error["code"] != bad.code
                    or content_type != "application/json"):
                wrong.append(f"{bad.name}: {status} {error['code']}, expected {bad.status}"
                             f" {bad.code}: {text[:300]}")
            elif bad.detail is not None and bad.detail[1] is None:
                if bad.detail[0] not in {f for f, _ in fields}:
                    wrong.append(f"{bad.name}: no details entry for {bad.detail[0]}: {text}")
            elif bad.detail is not None and bad.detail not in fields:
                wrong.append(f"{bad.name}: no details entry {bad.detail}: {text[:300]}")
            if t.agent.pid != t.pid:
                wrong.append(f"{bad.name}: the agent died")
                break
        for name, data in NOT_HTTP.items():
            status, body, closed = await raw_exchange(t, data)
            answers[name] = status
            if status != 400 or not closed:
                wrong.append(f"{name}: {status} {body[:200]!r}, closed={closed}")
    return {"answers": answers, "wrong": wrong,
            "log_lines_added": log_lines(t) - lines_before,
            "malformed_requests": len(answers)}


async def test_malformed_bodies_get_a_4xx_naming_the_reason_and_never_crash(
        target: Target, record_property: Callable[[str, object], None]):
    """GIVEN the running agent WHEN a till sends broken JSON, bodies of the wrong content
    type, 100 000-deep nesting, Unicode edge cases (invalid and overlong UTF-8, BOM, UTF-16,
    lone surrogates, NUL, bidi and zero-width characters, non-ASCII digits), undecodable
    gzip, and a client sends bytes that are not HTTP THEN each API request gets its 4xx
    JSON error naming the field or reason, each non-HTTP one a 400 and a closed connection,
    no 5xx, the log grows by a few lines rather than a traceback each, and the same process
    still serves."""
    figures = await step_malformed(target)
    record(target, "malformed", figures, record_property)
    assert not figures["wrong"], "\n".join(figures["wrong"])
    assert all(400 <= s < 500 for s in figures["answers"].values()), figures["answers"]
    # ~40 malformed requests; before ClientFaultLog each protocol error logged ~15 lines.
    assert figures["log_lines_added"] <= 5, target.agent.log_tail(60)
    await assert_still_serving(target)


async def test_unicode_a_till_may_send_is_kept_exactly(target: Target):
    """GIVEN the running agent WHEN a sale's free text holds emoji, combining marks,
    right-to-left text and a zero-width joiner THEN it is accepted (202) and the admin API
    returns it exactly as sent: hostile-looking is not invalid."""
    description = ("Stift \U0001f58a\ufe0f e\u0301 \u05e2\u05d1\u05e8\u05d9\u05ea"
                   " \u202e\U0001f468\u200d\U0001f373")
    body = {**_with_line(target.next_sale(), description=description),
            "custom_fields": {"note": "a \u2028 line separator, a \ufeff BOM, \U0010ffff"}}
    async with aiohttp.ClientSession() as http:
        async with http.post(target.agent.base + "/v1/transactions", json=body,
                             headers=bearer(token_for(TILL))) as resp:
            assert resp.status == 202, await resp.text()
            event_id = (await resp.json())["event_id"]
        async with http.get(f"{target.agent.base}/v1/outbox/{event_id}",
                            headers=bearer(STATUS_TOKEN)) as resp:
            assert resp.status == 200
            data = (await resp.json())["payload"]["data"]
    assert data["lines"][0]["description"] == description
    assert data["custom_fields"] == body["custom_fields"]


async def test_a_valid_body_is_read_as_json_whatever_its_content_type(target: Target):
    """GIVEN the running agent WHEN a till posts a valid sale labelled text/plain (as
    ``curl -d`` without ``-H`` or a naive client does) THEN it is taken like JSON (202), as
    docs/security.md says: only the bearer token authorises a write, and a browser cannot
    send one cross-site without a CORS preflight, which the agent refuses (401, no
    Access-Control-* header)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(target.agent.base + "/v1/transactions",
                             data=json.dumps(target.next_sale()),
                             headers={**bearer(token_for(TILL)),
                                      "Content-Type": "text/plain"}) as resp:
            assert resp.status == 202, await resp.text()
        async with http.options(target.agent.base + "/v1/transactions", headers={
                "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization"}) as resp:
            assert resp.status == 401  # a preflight carries no token
            assert not any(h.lower().startswith("access-control-") for h in resp.headers)


# -- 3. huge bodies -----------------------------------------------------------------------


async def step_huge(t: Target) -> dict[str, Any]:
    """Stream the huge bodies; return how each was answered and the memory around them."""
    rss_before = rss_kib(t.pid)
    chunk = b"[" * 65536
    bomb = gzip.compress(b"\0" * (512 * 1024 * 1024), 6)
    runs = {
        "50 MB Content-Length": dict(headers=JSON_TILL, chunks=HUGE // len(chunk)),
        "50 MB chunked": dict(headers=JSON_TILL, chunks=HUGE // len(chunk), chunked=True),
        "50 MB to /v1/print": dict(headers=JSON_TILL, chunks=HUGE // len(chunk),
                                   path="/v1/print"),
        "50 MB without a token": dict(headers={"Content-Type": "application/json"},
                                      chunks=HUGE // len(chunk)),
    }
    results: dict[str, dict[str, Any]] = {}
    for name, kwargs in runs.items():
        r = await stream_body(t.host, t.port, chunk=chunk, **kwargs)
        results[name] = {"status": r.status, "code": _code(r.body),
                         "answered_after_s": round(r.answered_after_s, 3),
                         "sent_when_answered": r.sent_when_answered}
    r = await stream_body(t.host, t.port, {**JSON_TILL, "Content-Encoding": "gzip"},
                          chunks=1, chunk=bomb)
    results["gzip bomb (512 MiB in)"] = {
        "status": r.status, "code": _code(r.body), "answered_after_s": round(
            r.answered_after_s, 3), "sent_when_answered": r.sent_when_answered,
        "compressed_bytes": len(bomb)}
    await asyncio.sleep(LINGER_S + 0.5)  # the agent drops what it still reads, then closes
    return {"results": results, "rss_before_kib": rss_before,
            "rss_after_kib": rss_kib(t.pid)}


def _code(body: bytes) -> str | None:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


async def test_huge_bodies_are_refused_fast_without_being_buffered(
        target: Target, record_property: Callable[[str, object], None]):
    """GIVEN the running agent WHEN clients stream 50 MB bodies (with a Content-Length,
    chunked, to /v1/print, without a token) and a gzip bomb that inflates to 512 MiB THEN
    each gets its JSON 413 (401 without a token) within 2 s, while most of the body was still
    unsent, and the agent's resident memory grows by less than 16 MiB."""
    figures = await step_huge(target)
    record(target, "huge", figures, record_property)
    for name, result in figures["results"].items():
        expected = (401, "unauthorized") if "without a token" in name else (413, "too_large")
        assert (result["status"], result["code"]) == expected, (name, result)
        assert result["answered_after_s"] < 2.0, (name, result)
        if name.startswith("50 MB"):
            # Read up to the limit, then answered: what was sent by then is the limit plus
            # what the sockets' buffers took, far from the 50 MB an agent that buffers
            # bodies would have read first.
            assert result["sent_when_answered"] < HUGE // 4, (name, result)
            assert result["sent_when_answered"] > MAX_BODY_BYTES or "token" in name
    growth = figures["rss_after_kib"] - figures["rss_before_kib"]
    assert growth < 16 * 1024, figures
    await assert_still_serving(target)


# -- 4. slow connections ------------------------------------------------------------------


async def measure_service(t: Target, seconds: float, *, retries: int = 0,
                          ) -> dict[str, Any]:
    """For ``seconds``, alternate ``/healthz`` and a till's sale, each on a new connection
    (as a monitoring probe and a till that connects per sale do), sampling the agent's
    descriptors. With ``retries``, an attempt that got no answer at all (refused or reset
    before any byte, as a till also treats it) is tried again that many times; the latency
    then counts from the first attempt."""
    latency: dict[str, list[float]] = {"health": [], "sale": []}
    failures: list[str] = []
    retried = 0
    fds: list[int] = [fd_count(t.pid)]
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for kind, call, expected in (("health", health, 200), ("sale", post_sale, 202)):
                started = time.monotonic()
                for attempt in range(retries + 1):
                    try:
                        status, _ = await call(http, t, timeout_s=5)
                    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as err:
                        if attempt < retries:
                            retried += 1
                            continue
                        failures.append(f"{kind}: {type(err).__name__}: {err}")
                    except (aiohttp.ClientError, TimeoutError) as err:
                        failures.append(f"{kind}: {type(err).__name__}: {err}")
                    else:
                        latency[kind].append(time.monotonic() - started)
                        if status != expected:
                            failures.append(f"{kind}: {status}")
                    break
            fds.append(fd_count(t.pid))
            await asyncio.sleep(0.1)
    return {"health_checks": len(latency["health"]), "sales": len(latency["sale"]),
            "health_max_s": round(max(latency["health"], default=99.0), 3),
            "sale_max_s": round(max(latency["sale"], default=99.0), 3),
            "health_median_s": round(statistics.median(latency["health"] or [99.0]), 3),
            "sale_median_s": round(statistics.median(latency["sale"] or [99.0]), 3),
            "retried": retried, "failures": failures[:10], "fds_max_during": max(fds)}


async def fds_back_to(t: Target, target_fds: int, timeout_s: float = 5.0) -> int:
    """Wait for the agent's descriptor count to fall to ``target_fds``; return the last."""
    deadline = time.monotonic() + timeout_s
    fds = fd_count(t.pid)
    while fds > target_fds and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        fds = fd_count(t.pid)
    return fds


async def step_slowloris(t: Target) -> dict[str, Any]:
    """500 slowloris connections and 20 slow bodies; service measured meanwhile; then
    wait for the agent to close them all."""
    loris = SlowLoris(t.host, t.port, SLOWLORIS, interval_s=1.0, reconnect=False)
    await loris.start()
    bodies = [asyncio.create_task(slow_body(t.host, t.port, token_for(TILL)))
              for _ in range(SLOW_BODIES)]
    service = await measure_service(t, ATTACK_S)
    all_closed = await loris.wait_all_closed(IDLE_TIMEOUT_S)
    body_results = await asyncio.gather(*bodies)
    await loris.close()
    return {
        **service, "slowloris": SLOWLORIS, "closed_by_agent": loris.stats.closed_by_agent,
        "all_closed_by_agent": all_closed,
        "max_lifetime_s": round(max(loris.stats.lifetimes_s, default=99.0), 2),
        "answers_to_slowloris": dict(Counter(loris.stats.answers)),
        "slow_bodies": dict(Counter(r.status for r in body_results)),
        "slow_body_codes": sorted({_code(r.body) or "-" for r in body_results}),
        "slow_body_answered_max_s": round(max(r.answered_after_s or 99.0
                                              for r in body_results), 2),
        "slow_body_closed_max_s": round(max(r.closed_after_s or 99.0
                                            for r in body_results), 2),
        "fds_baseline": t.baseline_fds, "fds_after": await fds_back_to(t, t.baseline_fds + 2),
    }


async def test_slow_connections_are_closed_by_the_agent_and_never_starve_a_till(
        target: Target, record_property: Callable[[str, object], None]):
    """GIVEN the running agent WHEN 450 connections trickle request headers a line a second
    and never finish, and 20 posts trickle their bodies a byte at a time THEN meanwhile
    /healthz and a till's sale on new connections are all answered within 1 s; the agent
    itself closes every slowloris connection within its idle timeout and answers every slow
    body 408 request_timeout after its body timeout, then closes it; afterwards its open
    descriptors are back to the baseline."""
    figures = await step_slowloris(target)
    record(target, "slowloris", figures, record_property)
    assert not figures["failures"], figures
    assert figures["health_checks"] >= 10 and figures["sales"] >= 10, figures
    assert figures["health_max_s"] < LATENCY_BOUND_S, figures
    assert figures["sale_max_s"] < LATENCY_BOUND_S, figures
    assert figures["all_closed_by_agent"], figures
    assert figures["max_lifetime_s"] <= IDLE_TIMEOUT_S + 1.5, figures
    assert figures["slow_bodies"] == {408: SLOW_BODIES}, figures
    assert figures["slow_body_codes"] == ["request_timeout"], figures
    assert figures["slow_body_answered_max_s"] <= BODY_TIMEOUT_S + 1.5, figures
    assert figures["slow_body_closed_max_s"] <= BODY_TIMEOUT_S + LINGER_S + 1.5, figures
    assert figures["fds_after"] <= figures["fds_baseline"] + 2, figures
    await assert_still_serving(target)


async def step_flood(t: Target) -> dict[str, Any]:
    """1 100 slow connections that come back half a second after each drop, for
    ``ATTACK_S``, from a process of their own; service measured meanwhile."""
    flood = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.system.hostile", t.host, str(t.port), str(FLOOD),
        str(ATTACK_S + 1), "0.5", cwd=REPO, stdout=asyncio.subprocess.PIPE)
    try:
        assert flood.stdout is not None
        opened = json.loads(await asyncio.wait_for(flood.stdout.readline(), 30))
        service = await measure_service(t, ATTACK_S, retries=1)
        end = json.loads(await asyncio.wait_for(flood.stdout.readline(), 30))
        assert await flood.wait() == 0
    finally:
        if flood.returncode is None:
            flood.kill()
            await flood.wait()
    log = t.agent.log_path.read_text(errors="replace")
    return {**service, "flood": FLOOD, **opened, "connections_opened": end["opened"],
            "dropped_by_agent": end["dropped_by_agent"],
            "limit_logged": "connections open (the limit)" in log,
            "emfile_logged": "Too many open files" in log,
            "nofile_soft": SERVICE_NOFILE_SOFT,
            "fds_after": await fds_back_to(t, t.baseline_fds + 2)}


async def test_a_flood_of_slow_connections_never_exhausts_descriptors(
        target: Target, record_property: Callable[[str, object], None]):
    """GIVEN the agent with the 1 024 descriptors systemd allows a service WHEN 1 100
    connections trickle headers and come back half a second after each drop THEN the agent
    keeps its connections under its limit (dropping the oldest idle ones, logging why) and
    never runs out of descriptors; /healthz and a till's sale are all answered, counting one
    retry of an attempt the agent dropped before answering (as tills retry), each within
    2 s and half of them within 0.5 s (attacker, agent and test share two cores);
    afterwards its descriptors are back to the baseline."""
    figures = await step_flood(target)
    record(target, "flood", figures, record_property)
    assert not figures["failures"], figures
    assert figures["health_checks"] >= 10 and figures["sales"] >= 10, figures
    assert figures["health_max_s"] < FLOOD_LATENCY_BOUND_S, figures
    assert figures["sale_max_s"] < FLOOD_LATENCY_BOUND_S, figures
    assert figures["health_median_s"] < FLOOD_MEDIAN_BOUND_S, figures
    assert figures["sale_median_s"] < FLOOD_MEDIAN_BOUND_S, figures
    assert figures["connections_opened"] > FLOOD, figures  # dropped, and back
    assert figures["fds_max_during"] < SERVICE_NOFILE_SOFT - 64, figures
    assert not figures["emfile_logged"], target.agent.log_tail()
    assert figures["limit_logged"], target.agent.log_tail()
    assert figures["fds_after"] <= target.baseline_fds + 2, figures
    await assert_still_serving(target)


# -- 5. memory ----------------------------------------------------------------------------


async def test_memory_stays_bounded_after_the_whole_barrage(
        target: Target, record_property: Callable[[str, object], None]):
    """GIVEN the agent after the fuzzing, malformed, huge-body and slow-connection steps
    (run here if they were not run before) THEN its resident memory is within 40 MiB of
    what it was before the first hostile byte, and it still serves."""
    steps = {"fuzz": step_fuzz, "malformed": step_malformed, "huge": step_huge,
             "slowloris": step_slowloris, "flood": step_flood}
    for name, step in steps.items():
        if name not in target.steps:
            target.steps[name] = {"run_by": "memory test", **await step(target)}
    await asyncio.sleep(1.0)
    rss = rss_kib(target.pid)
    figures = {"rss_baseline_kib": target.baseline_rss_kib, "rss_after_kib": rss,
               "growth_kib": rss - target.baseline_rss_kib, "bound_kib": RSS_BOUND_KIB}
    record(target, "memory", figures, record_property)
    assert figures["growth_kib"] < RSS_BOUND_KIB, figures
    await assert_still_serving(target)


async def test_the_limits_are_documented():
    """GIVEN docs/security.md THEN it states the limits this file tests, with their values."""
    text = (REPO / "docs" / "security.md").read_text()
    for figure in (f"{IDLE_TIMEOUT_S:g} s", f"{BODY_TIMEOUT_S:g} s", "256 KiB", "512"):
        assert figure in text, figure

