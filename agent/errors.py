"""The one shape of a refused request, shared by the modules behind the API.

``agent.devices`` and ``agent.printing`` refuse with a ``RequestError`` (HTTP status,
snake_case code, message, details) without depending on ``agent.api``, which turns each one
into the contract's error body.
"""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A refused request: HTTP status, snake_case code, message, optional details."""

    def __init__(self, status: int, code: str, message: str,
                 details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
