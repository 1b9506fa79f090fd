"""The control agent: ``tillsync`` patched to acknowledge a sale *before* the outbox commit.

Used only by the chaos suite's control run. ``Outbox.append`` is replaced by a write-behind
buffer: it answers at once with a made-up receipt and appends the event a quarter of a second
later, the way the crashed in-memory buffers of the pain points did. A SIGKILL inside that
window loses sales the tills were told were safe, and the checker must notice.

Run as ``python tests/system/ack_early_agent.py run --config agent.toml``.
"""

from __future__ import annotations

import asyncio
import sys
import time

from agent.cli import main
from outbox.models import Appended, NewEvent
from outbox.store import Outbox

WRITE_BEHIND_S = 0.25
_real_append = Outbox.append
_pending: set[asyncio.Task[Appended]] = set()


async def _acknowledge_first(self: Outbox, event: NewEvent) -> Appended:
    async def later() -> Appended:
        await asyncio.sleep(WRITE_BEHIND_S)
        return await _real_append(self, event)

    task = asyncio.create_task(later())
    _pending.add(task)
    task.add_done_callback(_pending.discard)
    return Appended(event_id=0, idempotency_key=event.idempotency_key, sinks=event.sinks,
                    accepted_at=time.time(), created=True)


Outbox.append = _acknowledge_first  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
