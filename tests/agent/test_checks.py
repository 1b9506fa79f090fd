"""`tillsync check` against real files, a real agent and real servers on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from pathlib import Path

import pytest
from aiohttp import web
from rich.console import Console

from agent.checks import run_checks
from agent.config import load_config
from agent.standin.cloud import StandinCloud
from tests.agent.test_operator import Setup, free_port, make_setup, post_sale, running
from tests.tlscerts import self_signed

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def check(setup: Setup, timeout_s: float = 2.0) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = await run_checks(setup.config_path, console=Console(file=out, width=300),
                            timeout_s=timeout_s)
    return code, out.getvalue().splitlines()


def line(lines: list[str], level: str, name: str) -> str:
    found = [ln for ln in lines if re.match(rf"{level}\s+{re.escape(name)}\s", ln)]
    assert len(found) == 1, "\n".join(lines)
    return found[0]


def add_sink(setup: Setup, name: str, url: str, extra: str = "") -> None:
    with setup.config_path.open("a") as f:
        f.write(f'\n[[sinks]]\nname = "{name}"\ntype = "webhook"\nurl = "{url}"\n{extra}\n')


@pytest.fixture
async def cloud() -> AsyncIterator[StandinCloud]:
    async with StandinCloud() as server:
        yield server


@pytest.fixture
def setup(tmp_path: Path, cloud: StandinCloud) -> Setup:
    return make_setup(tmp_path / "etc", cloud.url)


async def used(setup: Setup, cloud: StandinCloud) -> None:
    """Run the agent once so the database exists with a delivered sale in it."""
    async with running(setup):
        await post_sale(setup, 1)
        await cloud.wait_for_effects(1)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- a good setup -------------------------------------------------------------------------


async def test_a_good_setup_passes_with_one_line_per_check(setup: Setup,
                                                           cloud: StandinCloud) -> None:
    await used(setup, cloud)
    before = digest(setup.db)
    code, lines = await check(setup)
    assert code == 0, "\n".join(lines)
    assert str(setup.config_path) in line(lines, "ok", "config")
    assert "(mode 0600)" in line(lines, "ok", "key")
    assert "quick_check ok, 1 data key unwraps" in line(lines, "ok", "database")
    assert "writable" in line(lines, "(ok|warn)", "outbox dir")
    assert "answered HTTP" in line(lines, "ok", "sink cloud")
    assert "of sink cloud" in line(lines, "ok", "clock")
    assert "free" in line(lines, "ok", "listen")
    assert all(re.match(r"(ok|warn|skip) ", ln) for ln in lines), lines
    # Only looked: the database file is byte for byte what the agent left.
    assert digest(setup.db) == before


async def test_a_missing_database_is_fine_because_the_agent_creates_it(setup: Setup) -> None:
    code, lines = await check(setup)
    assert code == 0, "\n".join(lines)
    assert "does not exist yet" in line(lines, "ok", "database")
    assert not setup.db.exists()


async def test_checking_a_running_agent_passes_and_warns_that_its_port_is_taken(
        setup: Setup, cloud: StandinCloud) -> None:
    async with running(setup):
        await post_sale(setup, 1)
        await cloud.wait_for_effects(1)
        code, lines = await check(setup)
        # The check never took the agent's place as writer: sales still go through.
        await post_sale(setup, 2)
        await cloud.wait_for_effects(2)
    assert code == 0, "\n".join(lines)
    listen = line(lines, "warn", "listen")
    assert "in use (is the agent running?)" in listen
    assert "a tillsync agent answers there" in listen
    line(lines, "ok", "database")


async def test_each_device_is_probed_through_its_driver(setup: Setup) -> None:
    """GIVEN a printer emulator on loopback, an unreachable printer and a disabled one THEN
    check says ok, FAIL (naming the device) and skip, and exits 1 for the failure."""
    from drivers.emulators.escpos_printer import EscposPrinterEmulator

    printer = EscposPrinterEmulator()
    await printer.start()
    try:
        with setup.config_path.open("a") as f:
            f.write(f'\n[[devices]]\nname = "receipt"\ntype = "escpos"\n'
                    f'url = "tcp://127.0.0.1:{printer.port}"\n'
                    f'\n[[devices]]\nname = "kitchen"\ntype = "escpos"\n'
                    f'url = "tcp://127.0.0.1:{closed_port()}"\n'
                    f'\n[[devices]]\nname = "spare"\ntype = "escpos"\n'
                    f'url = "tcp://127.0.0.1:9"\nenabled = false\n')
        code, lines = await check(setup)
    finally:
        await printer.stop()
    assert code == 1
    assert "answers" in line(lines, "ok", "device receipt")
    assert "check the cable" in line(lines, "FAIL", "device kitchen")
    assert "disabled" in line(lines, "skip", "device spare")


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- failures -----------------------------------------------------------------------------


async def test_a_config_error_is_one_line_that_also_says_what_to_do(setup: Setup) -> None:
    text = re.sub(r"(?m)^\[store\]$", "[store]\ncolour = 'blue'", setup.config_path.read_text())
    setup.config_path.write_text(text)
    code, lines = await check(setup)
    assert code == 1
    assert lines == [f"FAIL  config       {setup.config_path}: store.colour: unknown key (got"
                     " 'blue') — fix it, then run `tillsync check` again"]


async def test_each_config_problem_is_one_line_and_only_the_first_repeats_the_advice(
        setup: Setup) -> None:
    text = re.sub(r"(?m)^\[store\]$", "[store]\ncolour = 'blue'\nsize = 3",
                  setup.config_path.read_text())
    setup.config_path.write_text(text)
    code, lines = await check(setup)
    assert code == 1 and len(lines) == 2, lines
    assert all(ln.startswith("FAIL  config") for ln in lines), lines
    assert [ln.count("run `tillsync check` again") for ln in lines] == [1, 0]


async def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "agent.toml"
    out = io.StringIO()
    code = await run_checks(missing, console=Console(file=out, width=300))
    assert code == 1
    assert out.getvalue().splitlines() == [f"FAIL  config       {missing}: no such file (create"
                                           " one with `tillsync init`, or pass --config)"]


# -- the config file's readers ------------------------------------------------------------


async def test_a_config_with_inline_tokens_readable_by_others_is_warned_about(
        setup: Setup) -> None:
    code, lines = await check(setup)
    assert line(lines, "ok", "config")  # init writes it 0600
    setup.config_path.chmod(0o644)
    code, lines = await check(setup)
    assert code == 0, "\n".join(lines)  # a warning: the agent still runs
    warn = line(lines, "warn", "config")
    assert f"{setup.config_path}: readable by other users (mode 0644) and holds secrets" \
           " inline (api.status_token, api.terminals[0].token, api.terminals[1].token and" \
           " 1 more)" in warn
    assert f"chmod 600 {setup.config_path}" in warn
    assert setup.status_token not in warn


async def test_a_readable_config_without_inline_secrets_is_fine(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    text = setup.config_path.read_text()
    text = re.sub(r'(?m)^status_token = ".*"$', 'status_token = "${TS_CHECK_TOKEN}"', text)
    text = re.sub(r'(?m)^token = ".*"$', 'token_file = "terminal.token"', text, count=1)
    text = re.sub(r'(?m)^token = "(.*)"$',
                  lambda m: f'token_sha256 = "{hashlib.sha256(m[1].encode()).hexdigest()}"',
                  text)
    setup.config_path.write_text(text)
    (setup.config_path.parent / "terminal.token").write_text("a-terminal-token-0123456789\n")
    setup.config_path.chmod(0o644)
    monkeypatch.setenv("TS_CHECK_TOKEN", "a-status-token-0123456789")
    code, lines = await check(setup)
    assert code == 0, "\n".join(lines)
    assert str(setup.config_path) in line(lines, "ok", "config")


async def test_a_world_readable_key_fails_with_the_fix(setup: Setup) -> None:
    key = load_key_path(setup)
    key.chmod(0o644)
    code, lines = await check(setup)
    assert code == 1
    fail = line(lines, "FAIL", "key")
    assert "readable by group or other" in fail and f"chmod 600 {key}" in fail


async def test_a_key_that_is_not_32_bytes_fails(setup: Setup) -> None:
    key = load_key_path(setup)
    key.write_text(base64.b64encode(b"short").decode())
    code, lines = await check(setup)
    assert code == 1
    fail = line(lines, "FAIL", "key")
    assert "holds 5 bytes, expected 32 — restore the key file from backup" in fail


@pytest.mark.parametrize(("content", "why"), [(b"\x00garbage\xff", "is not base64"),
                                             (b"", "is empty")])
async def test_a_broken_key_beside_a_database_says_restore_it_never_make_a_new_one(
        setup: Setup, cloud: StandinCloud, content: bytes, why: str) -> None:
    await used(setup, cloud)
    key = load_key_path(setup)
    key.write_bytes(content)
    code, lines = await check(setup)
    assert code == 1
    fail = line(lines, "FAIL", "key")
    assert f"{key}: {why} — restore the key file from backup; do not make a new key" in fail
    assert str(setup.db) in fail and "tillsync init" not in fail


@pytest.mark.parametrize("mode", [0o755, 0o700])
async def test_a_key_path_that_is_a_directory_says_so(setup: Setup, mode: int) -> None:
    key = load_key_path(setup)
    key.unlink()
    key.mkdir(mode=mode)
    code, lines = await check(setup)
    assert code == 1
    fail = line(lines, "FAIL", "key")
    assert fail.endswith(f"{key}: is a directory, not a key file — set outbox.key_file to the"
                         " file holding the key")


async def test_a_missing_key_beside_a_database_says_restore_it_not_create_one(
        setup: Setup, cloud: StandinCloud) -> None:
    await used(setup, cloud)
    load_key_path(setup).unlink()
    code, lines = await check(setup)
    assert code == 1
    fail = line(lines, "FAIL", "key")
    assert "restore the key file from backup" in fail and "do not run `tillsync init`" in fail


async def test_a_key_from_another_install_fails_the_database_check(
        setup: Setup, cloud: StandinCloud) -> None:
    await used(setup, cloud)
    key = load_key_path(setup)
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    code, lines = await check(setup)
    assert code == 1
    line(lines, "ok", "key")  # a valid key in itself, just not this database's
    fail = line(lines, "FAIL", "database")
    assert "does not match the database" in fail and "restore the key file" in fail


async def test_a_damaged_database_fails(setup: Setup, cloud: StandinCloud) -> None:
    await used(setup, cloud)
    with setup.db.open("r+b") as f:
        f.write(b"this is no longer an SQLite file" * 4)
    code, lines = await check(setup)
    assert code == 1
    fail = line(lines, "FAIL", "database")
    assert str(setup.db) in fail and "restore from backup" in fail


async def test_a_database_with_a_damaged_page_fails_quick_check(
        setup: Setup, cloud: StandinCloud) -> None:
    async with running(setup):
        for seq in range(1, 41):
            await post_sale(setup, seq)
        await cloud.wait_for_effects(40)
    data = bytearray(setup.db.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    assert len(data) >= 4 * page
    data[2 * page:3 * page] = b"\xa5" * page  # a b-tree page of garbage
    setup.db.write_bytes(bytes(data))
    code, lines = await check(setup)
    assert code == 1
    assert "database" in line(lines, "FAIL", "database")


async def test_a_sink_at_a_closed_port_fails_naming_it(setup: Setup) -> None:
    port = free_port()
    add_sink(setup, "erp", f"http://127.0.0.1:{port}/events?token=s3cret")
    code, lines = await check(setup)
    assert code == 1
    fail = line(lines, "FAIL", "sink erp")
    assert f"127.0.0.1:{port} refused the connection" in fail
    assert "s3cret" not in fail  # a query may hold a credential: never printed
    line(lines, "ok", "sink cloud")


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
async def test_an_outbox_directory_where_no_file_can_be_created_fails(setup: Setup) -> None:
    """/proc passes os.access for root, yet takes no new file: only creating one tells."""
    text = re.sub(r'(?m)^path = ".*"$', 'path = "/proc/outbox.db"',
                  setup.config_path.read_text())
    setup.config_path.write_text(text)
    code, lines = await check(setup)
    assert code == 1
    fail = line(lines, "FAIL", "outbox dir")
    assert fail.endswith("/proc: cannot create files there (no such file or directory), so"
                         " `tillsync run` would fail — set outbox.path to a file in a directory"
                         " on a writable disk, e.g. /var/lib/tillsync/outbox.db")


async def test_a_writable_outbox_directory_is_left_as_it_was(setup: Setup) -> None:
    before = sorted(setup.db.parent.iterdir())
    _, lines = await check(setup)
    assert "writable" in line(lines, "(ok|warn)", "outbox dir")
    assert sorted(setup.db.parent.iterdir()) == before  # the probe file is gone again


async def test_a_listen_port_held_by_another_program_fails(setup: Setup) -> None:
    import socket

    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", setup.port))
        other.listen()
        code, lines = await check(setup)
    assert code == 1
    fail = line(lines, "FAIL", "listen")
    assert fail.endswith(f"127.0.0.1:{setup.port} is in use by another program (no tillsync"
                         " agent answers /healthz there), so `tillsync run` would fail — stop"
                         " that program, or set api.listen to a free port")


async def test_a_sink_whose_host_does_not_resolve_fails(setup: Setup) -> None:
    add_sink(setup, "erp", "https://no-such-host.invalid/events")
    code, lines = await check(setup)
    assert code == 1
    assert "no-such-host.invalid does not resolve" in line(lines, "FAIL", "sink erp")


# -- TLS and clock ------------------------------------------------------------------------


async def serve_once(handler: Handler, ssl_context: ssl.SSLContext | None = None,
                     ) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context).start()
    return runner, port


async def test_an_untrusted_certificate_fails_and_its_ca_bundle_fixes_it(
        setup: Setup, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=405)

    runner, port = await serve_once(answer, context)
    try:
        add_sink(setup, "erp", f"https://127.0.0.1:{port}/events")
        code, lines = await check(setup)
        assert code == 1
        fail = line(lines, "FAIL", "sink erp")
        assert "TLS failed" in fail and "certificate" in fail

        text = setup.config_path.read_text()
        setup.config_path.write_text(text + f'ca_bundle = "{cert}"\n')
        code, lines = await check(setup)
        assert code == 0, "\n".join(lines)
        assert "answered HTTP 405" in line(lines, "ok", "sink erp")
    finally:
        await runner.cleanup()


@pytest.fixture
async def guarded_sink() -> AsyncIterator[tuple[int, list[dict[str, str]]]]:
    """A sink that wants "Bearer right": 401 for anything else, 405 (HEAD) when it is right;
    yields its port and the headers of every request it got."""
    seen: list[dict[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        if request.headers.get("Authorization") != "Bearer right":
            return web.Response(status=401)
        return web.Response(status=405)

    runner, port = await serve_once(answer)
    try:
        yield port, seen
    finally:
        await runner.cleanup()


async def test_the_sink_probe_sends_the_sinks_token_and_passes_when_it_is_accepted(
        tmp_path: Path, guarded_sink: tuple[int, list[dict[str, str]]]) -> None:
    port, seen = guarded_sink
    setup = make_setup(tmp_path / "etc", None)
    add_sink(setup, "erp", f"http://127.0.0.1:{port}/events",
             'token = "right"\nsigning_secret = "shh"')
    code, lines = await check(setup)
    assert code == 0, "\n".join(lines)
    assert "answered HTTP 405" in line(lines, "ok", "sink erp")
    [headers] = seen
    assert headers["Authorization"] == "Bearer right"
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", headers["Tillsync-Signature"])


@pytest.mark.parametrize(("token", "expected"), [
    ('token = "wrong"', "the sink refused the credentials (HTTP 401) — check the token of sink"
                        " erp; until it is right the agent would pause this sink"),
    ("", "the sink wants credentials (HTTP 401) and sink erp has no token — set token (or"
         " token_file) in its [[sinks]] entry; until then the agent would pause this sink"),
])
async def test_a_sink_refusing_the_credentials_fails(
        tmp_path: Path, guarded_sink: tuple[int, list[dict[str, str]]], token: str,
        expected: str) -> None:
    port, _ = guarded_sink
    setup = make_setup(tmp_path / "etc", None)
    add_sink(setup, "erp", f"http://127.0.0.1:{port}/events", token)
    code, lines = await check(setup)
    assert code == 1
    fail = line(lines, "FAIL", "sink erp")
    assert fail.endswith(f"http://127.0.0.1:{port}/events: {expected} (its events wait, none"
                         " are lost)"), fail
    assert "wrong" not in fail


@pytest.mark.parametrize(("status", "level"), [(403, "warn"), (407, "FAIL"), (404, "ok"),
                                               (405, "ok"), (500, "ok")])
async def test_only_a_credentials_refusal_fails_other_answers_are_reachable(
        tmp_path: Path, status: int, level: str) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status)

    runner, port = await serve_once(answer)
    try:
        setup = make_setup(tmp_path / "etc", None)
        add_sink(setup, "erp", f"http://127.0.0.1:{port}/events", 'token = "t"')
        code, lines = await check(setup)
    finally:
        await runner.cleanup()
    assert f"HTTP {status}" in line(lines, level, "sink erp")
    assert code == (1 if level == "FAIL" else 0), "\n".join(lines)


@pytest.mark.parametrize(("skew_s", "level"), [(-600, "FAIL"), (90, "warn")])
async def test_a_clock_off_from_the_first_sink_is_reported(tmp_path: Path, skew_s: float,
                                                         level: str) -> None:
    async def answer(request: web.Request) -> web.Response:
        # The server's clock is off by -skew, so ours looks skew seconds ahead (or behind).
        return web.Response(status=404, headers={"Date": formatdate(time.time() - skew_s,
                                                                       usegmt=True)})

    runner, port = await serve_once(answer)
    try:
        setup = make_setup(tmp_path / "etc", f"http://127.0.0.1:{port}/events")
        code, lines = await check(setup)
    finally:
        await runner.cleanup()
    assert code == (1 if level == "FAIL" else 0), "\n".join(lines)
    clock = line(lines, level, "clock")
    way = "ahead of" if skew_s > 0 else "behind"
    shown = re.search(rf"clock is (\d+) s {way} sink cloud's", clock)
    assert shown and abs(int(shown.group(1)) - abs(skew_s)) <= 2, clock


def load_key_path(setup: Setup) -> Path:
    return load_config(setup.config_path).outbox.key_file
