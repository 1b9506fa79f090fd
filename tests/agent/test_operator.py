"""Operator commands (status, outbox, keys rotate) against a real agent and a stand-in cloud."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from rich.console import Console

from agent.config import load_config
from agent.init import init_setup
from agent.operator import (
    OperatorError,
    humanize_bytes,
    humanize_seconds,
    keys_rotate_command,
    outbox_command,
    render_status,
    status_command,
)
from agent.readiness import wait_until_ready
from agent.runtime import serve
from agent.standin.cloud import Fault, StandinCloud
from outbox import NewEvent, Outbox
from tests.agent import conftest
from tests.polling import until
from tests.stub_server import serving

REPO = Path(__file__).resolve().parents[2]


# -- a real setup: `tillsync init`, a free port, a sink at the stand-in cloud ---------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Setup:
    config_path: Path
    status_token: str
    terminal: str
    terminal_token: str
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return load_config(self.config_path).outbox.path


def make_setup(directory: Path, sink_url: str | None) -> Setup:
    """Write a config with `init_setup`, then point it at a free port and the stand-in cloud."""
    result = init_setup(directory)
    port = free_port()
    text = result.config_path.read_text()
    text, n = re.subn(r"(?m)^listen\s*=.*$", f'listen = "127.0.0.1:{port}"', text)
    assert n == 1, "init's config has one listen line"
    if sink_url is not None:
        text += (f'\n[[sinks]]\nname = "cloud"\ntype = "webhook"\nurl = "{sink_url}"\n'
                 "backoff_base_s = 0.05\nbackoff_cap_s = 0.5\npause_recheck_s = 60\n")
    result.config_path.write_text(text)
    terminal, token = next(iter(result.terminal_tokens.items()))
    return Setup(result.config_path, result.status_token, terminal, token, port)


def sale(terminal: str, seq: int) -> dict[str, Any]:
    """A valid sale whose custom field looks like rich markup (it must print verbatim)."""
    return conftest.sale(terminal, seq, transaction_id=f"{terminal}-sale-{seq}",
                         custom_fields={"gift_message": "Happy birthday [bold]"})


@contextlib.asynccontextmanager
async def running(setup: Setup) -> AsyncIterator[None]:
    """Run the agent in-process until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(load_config(setup.config_path), stop=stop))
    try:
        await wait_until_ready(setup.url, timeout_s=10, failed=lambda: conftest.exited(task))
        yield
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)


async def post_sale(setup: Setup, seq: int) -> str:
    """Post one sale as the setup's terminal; returns its event id."""
    async with aiohttp.ClientSession() as http, http.post(
            setup.url + "/v1/transactions", json=sale(setup.terminal, seq),
            headers={"Authorization": f"Bearer {setup.terminal_token}"}) as resp:
        body = await resp.json()
        assert resp.status == 202, body
        return str(body["event_id"])


async def agent_status(setup: Setup) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(
            setup.url + "/v1/status",
            headers={"Authorization": f"Bearer {setup.status_token}"}) as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def make_dead(setup: Setup, cloud: StandinCloud, seq: int) -> str:
    """Post a sale the cloud refuses with 400: its delivery is dead-lettered."""
    before = (await agent_status(setup))["outbox"]["dead"]
    cloud.faults.append(Fault.status(400))
    event_id = await post_sale(setup, seq)

    async def dead() -> bool:
        return bool((await agent_status(setup))["outbox"]["dead"] == before + 1)

    await until(dead, 10.0)
    return event_id


def console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=200), out


@pytest.fixture
async def cloud() -> AsyncIterator[StandinCloud]:
    async with StandinCloud() as server:
        yield server


@pytest.fixture
def setup(tmp_path: Path, cloud: StandinCloud) -> Setup:
    return make_setup(tmp_path / "etc", cloud.url)


def api(setup: Setup) -> dict[str, Any]:
    return {"url": setup.url, "token": setup.status_token, "config_path": None}


def direct(setup: Setup) -> dict[str, Any]:
    return {"url": None, "token": None, "config_path": setup.config_path}


async def outbox(action: str, where: dict[str, Any], *, state: str | None = None,
                 event_id: int | None = None, all_dead: bool = False,
                 as_json: bool = False) -> str:
    con, out = console()
    code = await outbox_command(action, **where, state=state, event_id=event_id,
                                all_dead=all_dead, as_json=as_json, console=con)
    assert code == 0
    return out.getvalue()


def one_line(err: pytest.ExceptionInfo[OperatorError]) -> str:
    message = str(err.value)
    assert message and "\n" not in message
    return message


# -- status -------------------------------------------------------------------------------


async def test_status_shows_the_store_the_outbox_and_each_sink_in_a_table(
        setup: Setup, cloud: StandinCloud) -> None:
    async with running(setup):
        await post_sale(setup, 1)
        await cloud.wait_for_effects(1)
        con, out = console()
        assert await status_command(setup.url, setup.status_token, as_json=False,
                                    console=con) == 0
    text = out.getvalue()
    store_id = load_config(setup.config_path).store.id
    assert re.search(r"status\s+ok", text)
    assert store_id in text and "uptime" in text and "disk free" in text
    assert re.search(r"cloud\s+│\s+online\s+│\s+0\s+│\s+0\s+│\s+\d+ s ago", text), text
    assert "pending 0" in text and "why not ok" not in text


async def test_status_json_prints_the_status_document(setup: Setup) -> None:
    async with running(setup):
        con, out = console()
        assert await status_command(setup.url, setup.status_token, as_json=True,
                                    console=con) == 0
    doc = json.loads(out.getvalue())
    assert doc["status"] == "ok"
    assert [s["name"] for s in doc["sinks"]] == ["cloud"]
    assert set(doc["outbox"]) >= {"pending", "in_doubt", "dead", "oldest_pending_age_s"}


async def test_a_degraded_agent_exits_zero_and_the_table_lists_the_reasons(
        setup: Setup, cloud: StandinCloud) -> None:
    async with running(setup):
        cloud.faults.append(Fault.status(401))  # a credential problem pauses the sink
        await post_sale(setup, 1)

        async def paused() -> bool:
            return bool((await agent_status(setup))["sinks"][0]["state"] == "paused")

        await until(paused, 10.0)
        con, out = console()
        assert await status_command(setup.url, setup.status_token, as_json=False,
                                    console=con) == 0
    text = out.getvalue()
    assert re.search(r"status\s+degraded", text)
    assert "why not ok:" in text and "• sink cloud paused" in text
    assert re.search(r"cloud\s+│\s+paused\s+│\s+1\s+│", text), text


async def test_a_wrong_status_token_fails_with_one_line(setup: Setup) -> None:
    async with running(setup):
        with pytest.raises(OperatorError) as err:
            await status_command(setup.url, "not-the-token", as_json=False,
                                 console=console()[0])
    assert "the status token was refused" in one_line(err)


async def test_a_terminal_token_is_not_accepted_as_the_status_token(setup: Setup) -> None:
    async with running(setup):
        with pytest.raises(OperatorError) as err:
            await status_command(setup.url, setup.terminal_token, as_json=True,
                                 console=console()[0])
    assert "use the status token" in one_line(err)


async def test_an_unreachable_agent_fails_with_one_line_naming_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(OperatorError) as err:
        await status_command(url, "t", as_json=False, console=console()[0])
    message = one_line(err)
    assert message.startswith(f"cannot reach the agent at {url}: ")
    assert "is `tillsync run` running?" in message


async def test_a_server_that_is_not_a_tillsync_agent_is_refused_not_shown_as_a_status(
        ) -> None:
    """A service answering 200 with other JSON must not pass for an agent with nothing to
    report (a table of dashes and exit 0): status and `outbox stats` both refuse it."""
    from aiohttp import web

    async def other(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async with serving(other) as url:
        for as_json in (False, True):
            con, out = console()
            with pytest.raises(OperatorError) as err:
                await status_command(url, "t", as_json=as_json, console=con)
            assert one_line(err) == (f"{url}/v1/status answered, but not with a tillsync status"
                                     " (no 'status', 'outbox', 'sinks' in it) — check that"
                                     " --url points at the tillsync agent")
            assert out.getvalue() == ""
        with pytest.raises(OperatorError) as err:
            await outbox_command("stats", url=url, token="t", config_path=None, state=None,
                                 event_id=None, all_dead=False, as_json=False,
                                 console=console()[0])
        assert "not with a tillsync status" in one_line(err)


async def tillsync(*args: str) -> tuple[int, str, str]:
    """Run the real command line in a child process (the agent runs in this one)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, cwd=REPO, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(child.communicate(), timeout=60)
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_the_cli_exits_1_with_one_line_for_a_refused_token_or_no_agent(
        setup: Setup) -> None:
    async with running(setup):
        code, out, err = await tillsync("status", "--url", setup.url, "--token", "wrong")
        assert (code, out) == (1, "")
        assert err.startswith("tillsync: the status token was refused") and err.count("\n") == 1
        code, out, err = await tillsync("status", "--url", setup.url, "--token",
                                        setup.status_token, "--json")
        assert code == 0 and json.loads(out)["status"] == "ok"
    code, out, err = await tillsync("status", "--url", setup.url, "--token", "t")
    assert (code, out) == (1, "")
    assert err.startswith(f"tillsync: cannot reach the agent at {setup.url}: connection refused")
    assert err.count("\n") == 1 and "Traceback" not in err


async def test_an_agent_address_without_scheme_is_taken_as_http(setup: Setup) -> None:
    async with running(setup):
        con, out = console()
        await status_command(f"127.0.0.1:{setup.port}", setup.status_token, as_json=True,
                             console=con)
    assert json.loads(out.getvalue())["status"] == "ok"


def test_the_status_table_humanises_ages_and_marks_unknowns() -> None:
    now = 1_800_000_000.0
    doc = {
        "status": "failing", "reasons": ["outbox not accepting events: the outbox is full"],
        "version": "1.0", "store_id": "s1", "uptime_s": 7500,
        "outbox": {"pending": 12, "in_doubt": 1, "dead": 0, "oldest_pending_age_s": 185.2,
                   "bytes": 3 << 20, "capacity_bytes": 1 << 30, "quarantined": 0},
        "sinks": [{"name": "erp", "state": "offline", "pending": 12, "dead": 0,
                   "last_success_at": "2027-01-15T07:55:00.000Z",
                   "last_error": "connect: [Errno 111] refused",
                   "next_attempt_at": "2027-01-15T08:00:30.000Z", "drain_eta_s": None,
                   "in_doubt": 1}],
        "devices": [{"name": "receipt", "kind": "escpos", "state": "disconnected",
                     "detail": "no driver", "since": None}],
        "disk": {"free_bytes": 5 << 30},
    }
    con, out = console()
    render_status(doc, con, now=now)  # 2027-01-15T08:00:00Z
    text = out.getvalue()
    assert re.search(r"status\s+failing", text)
    assert re.search(r"uptime\s+2 h 5 min", text)
    assert re.search(r"oldest pending\s+3 min", text)
    assert "3.0 MiB of 1.0 GiB" in text and "5.0 GiB" in text
    assert "5 min ago" in text and "in 30 s" in text and "unknown" in text
    assert "[Errno 111]" in text  # markup-looking text is shown as it is
    assert "• outbox not accepting events: the outbox is full" in text
    assert re.search(r"receipt\s+│\s+escpos\s+│\s+disconnected", text)


@pytest.mark.parametrize(("seconds", "shown"), [
    (None, "–"), (0, "0 s"), (59.4, "59 s"), (60, "1 min"), (185, "3 min"), (3600, "1 h"),
    (7500, "2 h 5 min"), (86400, "1 d"), (90000, "1 d 1 h")])
def test_durations_are_humanised(seconds: float | None, shown: str) -> None:
    assert humanize_seconds(seconds) == shown


def test_sizes_are_humanised_in_binary_units() -> None:
    assert [humanize_bytes(n) for n in (None, 512, 1536, 5 << 30)] == [
        "–", "512 B", "1.5 KiB", "5.0 GiB"]


# -- outbox through the API ---------------------------------------------------------------


async def test_a_dead_delivery_is_listed_shown_and_retried_through_the_api(
        setup: Setup, cloud: StandinCloud) -> None:
    async with running(setup):
        await post_sale(setup, 1)
        await cloud.wait_for_effects(1)
        event_id = await make_dead(setup, cloud, 2)

        text = await outbox("list", api(setup), state="dead")
        assert re.search(rf"{event_id}\s+│\s+cloud\s+│\s+dead\s+│\s+{setup.terminal}\s+│"
                         r"\s+transaction\s+│\s+1\s+│", text), text
        assert "400" in text
        assert len(re.findall(r"│\s+dead\s+│", text)) == 1

        everything = await outbox("list", api(setup))
        assert "delivered" in everything and "dead" in everything

        shown = await outbox("show", api(setup), event_id=int(event_id))
        assert "Ballpoint pen" in shown and '"transaction_id"' in shown
        assert "Happy birthday [bold]" in shown  # payload text is never read as markup
        assert re.search(r"cloud\s+│\s+dead\s+│\s+1", shown)

        retried = await outbox("retry", api(setup), event_id=int(event_id))
        assert "requeued 1 dead delivery of event" in retried
        await cloud.wait_for_effects(2)
        assert "no dead deliveries" in await outbox("list", api(setup), state="dead")


async def test_retry_all_dead_requeues_every_dead_delivery(setup: Setup,
                                                           cloud: StandinCloud) -> None:
    async with running(setup):
        await make_dead(setup, cloud, 1)
        await make_dead(setup, cloud, 2)
        text = await outbox("retry", api(setup), all_dead=True)
        assert "requeued 2 dead deliveries in the outbox" in text
        await cloud.wait_for_effects(2)
        again = json.loads(await outbox("retry", api(setup), all_dead=True, as_json=True))
        assert again == {"requeued": 0}


async def test_every_outbox_action_prints_json_a_script_can_parse(
        setup: Setup, cloud: StandinCloud) -> None:
    async with running(setup):
        event_id = await make_dead(setup, cloud, 1)
        listing = json.loads(await outbox("list", api(setup), as_json=True))
        event = json.loads(await outbox("show", api(setup), event_id=int(event_id),
                                        as_json=True))
        stats = json.loads(await outbox("stats", api(setup), as_json=True))
        retried = json.loads(await outbox("retry", api(setup), event_id=int(event_id),
                                          as_json=True))
    assert listing["next_after"] is None
    assert [(d["event_id"], d["sink"], d["state"]) for d in listing["deliveries"]] == [
        (event_id, "cloud", "dead")]
    assert event["event_id"] == event_id
    assert event["payload"]["data"]["lines"][0]["description"] == "Ballpoint pen"
    assert stats["outbox"]["dead"] == 1
    assert [(s["name"], s["dead"]) for s in stats["sinks"]] == [("cloud", 1)]
    assert retried == {"requeued": 1}


async def test_stats_prints_the_totals_and_one_row_per_sink(setup: Setup,
                                                            cloud: StandinCloud) -> None:
    async with running(setup):
        await make_dead(setup, cloud, 1)
        text = await outbox("stats", api(setup))
    assert "pending 0 · in doubt 0 · dead 1" in text
    assert re.search(r"cloud\s+│\s+online\s+│\s+0\s+│\s+0\s+│\s+1\s+│", text), text


async def test_showing_or_retrying_an_unknown_event_fails_with_one_line(setup: Setup) -> None:
    async with running(setup):
        for action in ("show", "retry"):
            with pytest.raises(OperatorError) as err:
                await outbox(action, api(setup), event_id=999)
            assert "no event 999" in one_line(err)


async def test_retry_needs_an_event_id_or_all_dead(setup: Setup) -> None:
    with pytest.raises(OperatorError) as err:
        await outbox("retry", api(setup))
    assert "--all-dead" in one_line(err)


# -- outbox directly on the database ------------------------------------------------------


async def test_config_mode_refuses_while_the_agent_runs(setup: Setup) -> None:
    async with running(setup):
        for action in ("list", "stats"):
            with pytest.raises(OperatorError) as err:
                await outbox(action, direct(setup))
            assert "the agent is running" in one_line(err)
            assert "drop --config to go through its API" in str(err.value)
        with pytest.raises(OperatorError) as err:
            await keys_rotate_command(**direct(setup), console=console()[0])
        assert "the agent is running" in one_line(err)
        # The refused command left the agent's store alone: it still takes sales.
        await post_sale(setup, 1)


async def test_config_mode_lists_shows_and_retries_once_the_agent_stopped(
        setup: Setup, cloud: StandinCloud) -> None:
    async with running(setup):
        await post_sale(setup, 1)
        await cloud.wait_for_effects(1)
        event_id = await make_dead(setup, cloud, 2)
        through_api = json.loads(await outbox("list", api(setup), as_json=True))
        shown_api = json.loads(await outbox("show", api(setup), event_id=int(event_id),
                                            as_json=True))

    # The same JSON whichever way the command went.
    assert json.loads(await outbox("list", direct(setup), as_json=True)) == through_api
    assert json.loads(await outbox("show", direct(setup), event_id=int(event_id),
                                   as_json=True)) == shown_api

    text = await outbox("list", direct(setup), state="dead")
    assert re.search(rf"{event_id}\s+│\s+cloud\s+│\s+dead\s+│", text), text
    shown = await outbox("show", direct(setup), event_id=int(event_id))
    assert "Ballpoint pen" in shown
    stats = json.loads(await outbox("stats", direct(setup), as_json=True))
    assert stats["outbox"]["dead"] == 1 and stats["sinks"][0]["state"] is None
    retried = await outbox("retry", direct(setup), event_id=int(event_id))
    assert f"requeued 1 dead delivery of event {event_id}; the agent sends it again when it" \
           " starts" in retried
    assert "no dead deliveries" in await outbox("list", direct(setup), state="dead")

    # The next start delivers the requeued event.
    async with running(setup):
        await cloud.wait_for_effects(2)


async def test_an_empty_pending_list_points_at_deliveries_in_doubt(setup: Setup) -> None:
    """GIVEN a delivery that was being sent when the agent died (so it is in doubt after
    recovery) WHEN the operator lists pending deliveries THEN the answer does not just say
    "no pending deliveries": it says one is in doubt and how to list it."""
    config = load_config(setup.config_path)
    store = await Outbox.open(config.outbox.path, config.outbox.key_file, create_key=True)
    try:
        await store.append(NewEvent(stream="T01", kind="transaction", payload=b"{}",
                                    sinks=("cloud",), idempotency_key="k-1"))
        assert len(await store.claim("cloud", 1)) == 1
    finally:
        await store.close()  # the claim stays in flight, as after a crash mid-attempt
    text = await outbox("list", direct(setup), state="pending")
    assert "no pending deliveries" in text
    assert "1 in doubt" in text and "tillsync outbox list --state in_doubt" in text
    assert "in_doubt" in await outbox("list", direct(setup), state="in_doubt")


async def test_a_long_list_stops_at_the_limit_and_says_where_to_go_on(
        setup: Setup, cloud: StandinCloud, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.operator.PAGE_SIZE", 1)  # make the API client page
    async with running(setup):
        ids = [await post_sale(setup, seq) for seq in (1, 2, 3)]
        await cloud.wait_for_effects(3)
        con, out = console()
        await outbox_command("list", **api(setup), state=None, event_id=None, all_dead=False,
                             as_json=True, console=con, limit=2)
        through_api = json.loads(out.getvalue())
        con, out = console()
        await outbox_command("list", **api(setup), state=None, event_id=None, all_dead=False,
                             as_json=False, console=con, limit=2)
        table = out.getvalue()
    assert [d["event_id"] for d in through_api["deliveries"]] == ids[:2]
    assert through_api["next_after"] == int(ids[1])
    assert f"first 2 shown, more after event {ids[1]}" in table
    con, out = console()
    await outbox_command("list", **direct(setup), state=None, event_id=None, all_dead=False,
                         as_json=True, console=con, limit=2)
    assert json.loads(out.getvalue()) == through_api
    con, out = console()
    await outbox_command("list", **direct(setup), state=None, event_id=None, all_dead=False,
                         as_json=True, console=con, limit=3)
    assert json.loads(out.getvalue())["next_after"] is None


async def test_config_mode_refuses_a_missing_database_without_creating_it(tmp_path: Path) -> None:
    setup = make_setup(tmp_path / "etc", None)
    with pytest.raises(OperatorError) as err:
        await outbox("list", direct(setup))
    assert "no outbox database" in one_line(err)
    assert not setup.db.exists()


def key_id_in(text: str) -> int:
    found = re.search(r"data key (\d+) now seals new records", text)
    assert found, text
    return int(found.group(1))


# -- keys rotate --------------------------------------------------------------------------


async def test_keys_rotate_through_the_api_and_directly_keeps_old_events_readable(
        setup: Setup, cloud: StandinCloud) -> None:
    async with running(setup):
        first = await post_sale(setup, 1)
        await cloud.wait_for_effects(1)
        con, out = console()
        assert await keys_rotate_command(**api(setup), console=con) == 0
        through_api = key_id_in(out.getvalue())
        await post_sale(setup, 2)
        await cloud.wait_for_effects(2)

    con, out = console()
    assert await keys_rotate_command(**direct(setup), console=con) == 0
    directly = key_id_in(out.getvalue())
    assert directly == through_api + 1

    # Events sealed under the first key still open; new ones go out under the newest.
    assert "Ballpoint pen" in await outbox("show", direct(setup), event_id=int(first))
    async with running(setup):
        await post_sale(setup, 3)
        await cloud.wait_for_effects(3)
    assert cloud.duplicates() == {}


async def test_keys_rotate_with_a_wrong_token_fails_with_one_line(setup: Setup) -> None:
    async with running(setup):
        with pytest.raises(OperatorError) as err:
            await keys_rotate_command(url=setup.url, token="nope", config_path=None,
                                      console=console()[0])
    assert "the status token was refused" in one_line(err)
