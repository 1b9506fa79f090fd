"""Fixtures for outbox tests: real SQLite files in tmp_path, a controllable clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from outbox import NewEvent, Outbox


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "outbox.db", tmp_path / "outbox.key"


OpenStore = Callable[..., Awaitable[Outbox]]


@pytest.fixture
async def open_store(paths: tuple[Path, Path], clock: Clock) -> AsyncIterator[OpenStore]:
    """Open stores on the test's files; every store opened is closed at the end."""
    opened: list[Outbox] = []

    async def _open(**kwargs: object) -> Outbox:
        kwargs.setdefault("create_key", True)
        kwargs.setdefault("clock", clock)
        store = await Outbox.open(paths[0], paths[1], **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield _open
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> Outbox:
    return await open_store()


def event(stream: str = "T01", seq: int = 1, *, payload: bytes | None = None,
          sinks: tuple[str, ...] = ("cloud",), kind: str = "transaction",
          dedupe: bool = True) -> NewEvent:
    """A sale-like event whose payload and keys derive from (stream, seq)."""
    body = payload if payload is not None else f'{{"sale":"{stream}-{seq}"}}'.encode()
    return NewEvent(stream=stream, kind=kind, payload=body, sinks=sinks,
                    idempotency_key=f"key-{stream}-{seq}",
                    dedupe_key=f"{stream}/{seq}" if dedupe else None)
