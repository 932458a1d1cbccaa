"""The cloud's exception tree. Every error carries its data as attributes.

``CloudError`` derives from ``shared.errors.SlmopsError``; callers of ``cloud`` never see a bare
``aiosqlite`` or ``nats`` error from our API (they are translated at the boundary).
"""

from __future__ import annotations

from slmops.shared.errors import SlmopsError

__all__ = ["CloudError", "LeaseLost", "StateError"]


class CloudError(SlmopsError):
    """Base class of every error the cloud service raises on purpose."""


class StateError(CloudError):
    """The cloud's SQLite state could not be read or written."""

    def __init__(self, path: str, operation: str, reason: str) -> None:
        self.path = path
        self.operation = operation
        self.reason = reason
        super().__init__(f"cloud state {path}: {operation} failed: {reason}")


class LeaseLost(CloudError):
    """This instance no longer holds the single-active lease; it must stop processing."""

    def __init__(self, key: str, holder: str, reason: str) -> None:
        self.key = key
        self.holder = holder
        self.reason = reason
        super().__init__(f"lease {key!r} lost by {holder!r}: {reason}")
