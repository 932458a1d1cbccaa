"""Fleet configuration: signed, versioned edge settings pushed through KV (issue 17).

A ``FleetConfigDoc`` is JSON in KV ``slmops_fleetconfig`` (``names.fleetconfig_key``): the
fleet, a version (per fleet, only ever growing: a rollback is a new version carrying older
settings), the ``schema`` of its settings, and the settings as an operator wrote them in a
TOML file (``load_settings``). It is signed with the same Ed25519 keys as model bundles
(``shared.bundle``); the signature covers the document's canonical bytes (every member but
``signature``, keys sorted), so members a newer build adds are covered too.

Which settings can be pushed, and when a node applies them (``PUSHABLE``):

* at once: ``outbox_max_bytes``, ``publish_timeout``, ``status_interval`` (from the next
  report), ``log_level``, ``safety`` (next judgement), ``refresh`` (next poll);
* at once, by reconnecting: ``nats_url``;
* at the next window boundary: ``window``, ``min_count``, ``dp_epsilon``, ``dp_budget`` (the
  window being filled closes under the values it was opened with ... or newer, never looser
  than the node's own floors; see ``edge.fleetconfig``).

Nothing else is pushable (the data directory, trust, HTTP address, model and inference limits
need a restart and stay with the device). A node rejects a document with a key it does not
know unless the document's ``schema`` is newer than its own (then it warns, listing them);
local config files reject unknown keys as before.
"""

from __future__ import annotations

import base64
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from slmops.shared.bundle import TrustStore, key_id
from slmops.shared.errors import BundleError, ConfigError
from slmops.shared.messages import Signature, Wire

__all__ = [
    "FLEETCONFIG_SCHEMA",
    "PUSHABLE",
    "ConfigRejected",
    "FleetConfigDoc",
    "canonical_config_bytes",
    "load_settings",
    "sign_config",
    "verify_config",
]

#: The settings schema this build writes and fully understands.
FLEETCONFIG_SCHEMA = 1

NOW, WINDOW, RECONNECT = "now", "next window boundary", "now (reconnects)"

#: Pushable top-level keys -> when a running node applies them (module docstring).
PUSHABLE: dict[str, str] = {
    "window": WINDOW,
    "min_count": WINDOW,
    "dp_epsilon": WINDOW,
    "dp_budget": WINDOW,
    "outbox_max_bytes": NOW,
    "publish_timeout": NOW,
    "status_interval": NOW,
    "log_level": NOW,
    "safety": NOW,
    "refresh": NOW,
    "nats_url": RECONNECT,
}

#: Largest accepted document (a config is a few hundred bytes; KV values are capped anyway).
MAX_DOC_BYTES = 64 * 1024


class ConfigRejected(ValueError):
    """A pushed configuration a node (or the cloud) will not take; ``reason`` says why."""

    def __init__(self, reason: str, version: int | None = None) -> None:
        self.reason, self.version = reason, version
        super().__init__(reason if version is None else f"config v{version}: {reason}")


class FleetConfigDoc(Wire, kw_only=True):
    """One version of a fleet's edge configuration (module docstring)."""

    v: int = 1
    schema: int = FLEETCONFIG_SCHEMA
    fleet: str
    version: int
    #: Settings as in the TOML file (durations and sizes may be strings, "30s", "8MB");
    #: ``safety`` and ``refresh`` are tables of their own.
    settings: dict[str, Any] = msgspec.field(default_factory=dict)
    created: datetime | None = None
    #: Free text: why (e.g. "rollback to v3").
    note: str = ""
    signature: Signature | None = None


def _document(raw: bytes, where: str) -> dict[str, Any]:
    if len(raw) > MAX_DOC_BYTES:
        raise ConfigRejected(f"{where}: {len(raw)} bytes, more than {MAX_DOC_BYTES}")
    try:
        doc = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError, OverflowError) as exc:
        raise ConfigRejected(f"{where}: not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigRejected(f"{where}: top level must be an object, got {type(doc).__name__}")
    return doc


def canonical_config_bytes(doc: Mapping[str, Any]) -> bytes:
    """What the signature covers: every member but ``signature``, keys sorted, compact JSON."""
    return msgspec.json.encode({k: v for k, v in doc.items() if k != "signature"}, order="sorted")


def sign_config(doc: FleetConfigDoc, key: Ed25519PrivateKey) -> bytes:
    """``doc`` signed by ``key``, as the JSON bytes to store."""
    plain = msgspec.to_builtins(msgspec.structs.replace(doc, signature=None))
    plain.pop("signature", None)
    value = base64.b64encode(key.sign(canonical_config_bytes(plain))).decode()
    plain["signature"] = msgspec.to_builtins(Signature(key_id=key_id(key.public_key()), value=value))
    return msgspec.json.encode(plain)


def verify_config(raw: bytes, trust: TrustStore, where: str = "fleet config") -> FleetConfigDoc:
    """Check the signature of a stored document against ``trust``, then decode it. Raises
    ``ConfigRejected`` naming what is wrong (not JSON, unsigned, untrusted key, bad
    signature, bad shape)."""
    doc = _document(raw, where)
    try:
        sig = msgspec.convert(doc.get("signature"), Signature | None)
    except msgspec.ValidationError as exc:
        raise ConfigRejected(f"{where}: signature is malformed: {exc}") from exc
    try:
        trust.verify_detached(canonical_config_bytes(doc), sig, where)
    except BundleError as exc:
        raise ConfigRejected(f"{where}: {exc.reason}") from exc
    try:
        out = msgspec.convert(doc, FleetConfigDoc)
    except msgspec.ValidationError as exc:
        raise ConfigRejected(f"{where}: {exc}") from exc
    if isinstance(out.version, bool) or out.version < 1 or out.schema < 1:
        raise ConfigRejected(f"{where}: version and schema must be >= 1")
    return out


def load_settings(path: Path) -> tuple[int, dict[str, Any]]:
    """``(schema, settings)`` from an operator's TOML file: an optional ``schema = N`` (at
    most ``FLEETCONFIG_SCHEMA``) and pushable keys only. Values are checked by the node's own
    rules (``edge.fleetconfig.resolve``) before publishing. Raises ``ConfigError``."""
    source = str(path)
    try:
        loaded = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(source, f"cannot read: {exc}") from exc
    schema = loaded.pop("schema", FLEETCONFIG_SCHEMA)
    if isinstance(schema, bool) or not isinstance(schema, int) or not 1 <= schema <= FLEETCONFIG_SCHEMA:
        raise ConfigError(source, f"schema must be an int in 1..{FLEETCONFIG_SCHEMA}, got {schema!r}")
    unknown = sorted(set(loaded) - set(PUSHABLE))
    if unknown:
        raise ConfigError(source, f"not pushable: {unknown} (pushable: {sorted(PUSHABLE)})")
    if not loaded:
        raise ConfigError(source, "no settings")
    return schema, loaded
