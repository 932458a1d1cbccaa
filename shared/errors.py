"""The exception tree shared by every slmops package.

Each error keeps its data as attributes and builds its message from them, so a caller can
react to the data and a log line still reads well.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "ConfigError",
    "JetStreamRefused",
    "NatsUnavailable",
    "NoResponders",
    "NotFound",
    "PermissionDenied",
    "PortUnavailable",
    "ProvisionError",
    "ResourceConflict",
    "ServerStartError",
    "SlmopsError",
    "WrongLastSequence",
]


class SlmopsError(Exception):
    """Base class of every error slmops raises on purpose."""


class ConfigError(SlmopsError, ValueError):
    """A configuration value (file, flag or environment variable) is invalid."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"invalid configuration in {source}: {reason}")


class ServerStartError(SlmopsError):
    """The embedded nats-server did not become ready."""

    def __init__(self, reason: str, stderr: str = "") -> None:
        self.reason = reason
        self.stderr = stderr
        tail = f"\n--- nats-server output ---\n{stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"nats-server did not start: {reason}{tail}")


class NatsUnavailable(SlmopsError):
    """NATS could not be reached, or is not connected right now."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"NATS at {url} unavailable: {reason}")


class NoResponders(NatsUnavailable):
    """A core request found nobody subscribed to its subject (NATS answered at once with
    "no responders"): the service is not running, or not for that subject."""

    def __init__(self, url: str, subject: str) -> None:
        self.subject = subject
        super().__init__(url, f"no responders on {subject}")


class PermissionDenied(SlmopsError):
    """The NATS server refused what these credentials tried (``denied``: the server's words,
    e.g. ``publish to "$js.api.stream.info.kv_slmops_fleet"``, lower-cased by nats-py)."""

    def __init__(self, denied: list[str]) -> None:
        self.denied = denied
        shown = ", ".join(denied[:3]) + (f" and {len(denied) - 3} more" if len(denied) > 3 else "")
        super().__init__(f"permission denied: {shown} (refused by the server for the credentials in use)")


class JetStreamRefused(SlmopsError):
    """JetStream answered, and refused: ``code`` is its ``err_code`` (e.g. 10058 "stream name
    already in use"), ``description`` its text. Translated from nats-py by
    ``shared.jetstream.nats_errors``."""

    def __init__(self, kind: str, name: str, code: int | None, description: str) -> None:
        self.kind = kind
        self.name = name
        self.code = code
        self.description = description
        super().__init__(f"JetStream refused {kind} {name!r}: {description} (err_code {code})")


class NotFound(JetStreamRefused):
    """The stream, bucket, key or object does not exist (or was deleted)."""


class WrongLastSequence(JetStreamRefused):
    """A compare-and-set write lost: the key changed since the revision it was based on."""


class PortUnavailable(SlmopsError):
    """A local port cannot be listened on (taken, or not allowed); ``option`` is the flag
    that chose it."""

    def __init__(self, host: str, port: int, option: str, reason: str) -> None:
        self.host = host
        self.port = port
        self.option = option
        self.reason = reason
        super().__init__(f"cannot listen on {host}:{port} ({option}): {reason}")


class ResourceConflict(SlmopsError):
    """An existing NATS resource has a configuration slmops cannot work with."""

    def __init__(self, kind: str, name: str, field: str, have: object, want: object) -> None:
        self.kind = kind
        self.name = name
        self.field = field
        self.have = have
        self.want = want
        super().__init__(
            f"existing {kind} {name!r} has {field}={have!r}, slmops needs {want!r}; "
            f"fix or delete it by hand (slmops never deletes data on its own)"
        )


class ProvisionError(SlmopsError):
    """The server refused to create a NATS resource (limits, permissions, cluster size...)."""

    def __init__(self, kind: str, name: str, reason: str) -> None:
        self.kind = kind
        self.name = name
        self.reason = reason
        super().__init__(f"cannot create {kind} {name!r}: {reason}")


class BundleError(SlmopsError):
    """A model bundle is invalid: bad manifest, hash, signature, model or smoke test."""

    def __init__(self, bundle: str, reason: str, code: str = "invalid") -> None:
        self.bundle = bundle
        self.reason = reason
        self.code = code
        super().__init__(f"model bundle {bundle}: {reason}")
