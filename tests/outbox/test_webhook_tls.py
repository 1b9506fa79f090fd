"""The webhook sink's TLS: always verified, against the system's CAs plus ``ca_bundle``'s.

Real HTTPS servers on 127.0.0.1 with a throwaway certificate; the system CA store is the
machine's own (``ssl.create_default_context``), whatever it holds.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from outbox.classify import Answered, NoAnswer
from outbox.errors import SinkSetupError
from outbox.models import Delivery
from outbox.sinks import WebhookSettings, WebhookSink
from outbox.sinks.webhook import tls_context
from tests.tlscerts import self_signed


def delivery() -> Delivery:
    return Delivery(event_id=1, sink="cloud", stream="T01", kind="transaction",
                    idempotency_key="key-1", payload=b'{"total":"3.98"}', attempts=0,
                    in_doubt=False, created_at=time.time(), expires_at=None)


@pytest.fixture
async def https_server(tmp_path: Path) -> AsyncIterator[tuple[str, Path, list[bytes]]]:
    """An HTTPS endpoint on 127.0.0.1 answering 200; yields (url, its CA file, bodies)."""
    cert, key = self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    bodies: list[bytes] = []

    async def take(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/events", take)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}/events", cert, bodies
    finally:
        await runner.cleanup()


async def deliver_once(url: str, ca_bundle: str | None) -> Answered | NoAnswer:
    sink = WebhookSink("cloud", WebhookSettings(url=url, ca_bundle=ca_bundle))
    await sink.start()
    try:
        result = await sink.deliver(delivery())
    finally:
        await sink.close()
    assert isinstance(result, Answered | NoAnswer)
    return result


async def test_an_unknown_certificate_is_refused_and_its_ca_bundle_admits_it(
        https_server: tuple[str, Path, list[bytes]]) -> None:
    url, ca_file, bodies = https_server

    refused = await deliver_once(url, ca_bundle=None)
    assert isinstance(refused, NoAnswer), refused
    assert refused.failure == "tls" and not refused.sent, refused
    assert "certificate" in refused.detail.lower(), refused.detail
    assert bodies == []  # nothing went over the unverified connection

    admitted = await deliver_once(url, ca_bundle=str(ca_file))
    assert isinstance(admitted, Answered) and admitted.status == 200, admitted
    assert len(bodies) == 1 and b'"total":"3.98"' in bodies[0]


def test_a_ca_bundle_adds_to_the_system_cas_instead_of_replacing_them(tmp_path: Path) -> None:
    """Config documents ``ca_bundle`` as CAs trusted *besides* the system's: a sink given one
    must still reach a cloud with a publicly issued certificate."""
    cert, _ = self_signed(tmp_path)
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]

    context = tls_context(str(cert))

    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == system + 1


@pytest.mark.parametrize("content", [None, b"not a certificate\n"],
                         ids=["missing file", "not PEM"])
async def test_an_unusable_ca_bundle_stops_the_sink_naming_the_file(
        tmp_path: Path, content: bytes | None) -> None:
    bundle = tmp_path / "ca.pem"
    if content is not None:
        bundle.write_bytes(content)
    sink = WebhookSink("erp", WebhookSettings(url="https://127.0.0.1:1/events",
                                              ca_bundle=str(bundle)))

    with pytest.raises(SinkSetupError) as caught:
        await sink.start()

    message = str(caught.value)
    assert message.startswith(f"sink erp: ca_bundle {bundle} cannot be used"), message
    assert "config" in caught.value.hint
