"""The edge node's exception tree. Every error keeps its data as attributes.

``EdgeError`` derives from ``shared.errors.SlmopsError``; bundle problems are reported with
``shared.errors.BundleError`` (it carries a machine-readable ``code``).
"""

from __future__ import annotations

from slmops.shared.errors import SlmopsError

__all__ = [
    "DataDirInUse",
    "EdgeError",
    "FeedbackConflict",
    "InvalidInput",
    "NoModel",
    "NodeClosed",
    "StoreError",
    "UnknownPrediction",
]


class EdgeError(SlmopsError):
    """Base of the errors the edge node raises on purpose."""


class NoModel(EdgeError):
    """No model is installed yet (or it was withdrawn: ``reason`` says so), so the node cannot
    predict."""

    def __init__(self, reason: str = "no model installed yet") -> None:
        super().__init__(reason)


class Busy(EdgeError):
    """Every generation slot and queue place is taken: try again after ``retry_after`` s."""

    def __init__(self, running: int, waiting: int, retry_after: int) -> None:
        super().__init__(
            f"busy: {running} generations running and {waiting} waiting (the limit); "
            f"retry after {retry_after} s"
        )
        self.running, self.waiting, self.retry_after = running, waiting, retry_after


class NodeClosed(EdgeError):
    """The node is shutting down or was never started."""

    def __init__(self, what: str = "node") -> None:
        self.what = what
        super().__init__(f"{what} is not running")


class InvalidInput(EdgeError, ValueError):
    """A request value is invalid. ``field`` names it (``texts[3]``, ``label``...)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class UnknownPrediction(EdgeError, KeyError):
    """Feedback names a prediction id this node does not (or no longer) remember."""

    def __init__(self, prediction_id: str) -> None:
        self.prediction_id = prediction_id
        super().__init__(f"unknown prediction_id {prediction_id!r}")

    def __str__(self) -> str:  # KeyError would quote the message
        return f"unknown prediction_id {self.prediction_id!r}"


class StoreError(EdgeError):
    """The local SQLite buffer failed (disk full, corrupt file, permissions)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"telemetry buffer {path}: {reason}")


class FeedbackConflict(EdgeError):
    """Feedback for this prediction was already given (each prediction counts once)."""

    def __init__(self, prediction_id: str) -> None:
        self.prediction_id = prediction_id
        super().__init__(f"feedback for prediction_id {prediction_id!r} was already given")


class DataDirInUse(EdgeError):
    """Another running node holds this data directory (two writers would reuse seqs)."""

    def __init__(self, path: str, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"data directory {path} is in use by another node ({holder})")
