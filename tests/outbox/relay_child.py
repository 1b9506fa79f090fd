"""Child process for ``test_relay_kill.py``: a real relay that the parent SIGKILLs at random.

``python tests/outbox/relay_child.py DB KEY_FILE URL`` opens the outbox (running its
recovery), starts a ``Relay`` for the sink ``cloud`` posting to ``URL``, and prints
``started`` once the relay runs. It then delivers until the store owes the sink nothing
(``pending == 0`` and ``in_doubt == 0``), stops the relay, closes the store, prints
``drained`` and exits 0, unless the parent kills it first.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from outbox import Outbox
from outbox.relay import Relay
from outbox.sinks import SinkPolicy, WebhookSettings, WebhookSink

SINK = "cloud"
POLICY = SinkPolicy(concurrency=8, backoff_base_s=0.01, backoff_cap_s=0.1)
TIMEOUT_S = 5.0
POLL_S = 0.02


async def relay_until_drained(db: Path, key_file: Path, url: str) -> None:
    """Run the relay until nothing is owed to the sink; see the module docstring."""
    store = await Outbox.open(db, key_file)
    try:
        relay = Relay(store, WebhookSink(SINK, WebhookSettings(url=url, timeout_s=TIMEOUT_S),
                                         POLICY))
        await relay.start()
        print("started", flush=True)
        try:
            while True:
                stats = (await store.stats()).sinks.get(SINK)
                if stats is None or (stats.pending == 0 and stats.in_doubt == 0):
                    break
                await asyncio.sleep(POLL_S)
        finally:
            await relay.stop(grace_s=TIMEOUT_S)
    finally:
        await store.close()
    print("drained", flush=True)


def main(argv: list[str]) -> None:
    """Parse ``DB KEY_FILE URL`` and relay until drained."""
    db, key_file, url = argv
    asyncio.run(relay_until_drained(Path(db), Path(key_file), url))


if __name__ == "__main__":
    main(sys.argv[1:])
