"""The signed key list: which bundle-signing keys a fleet trusts, and their status.

A root key (Ed25519, kept offline) signs a ``KeyList``: a version number and, per signing key,
its public key, its status and an optional end of validity. The cloud stores the signed JSON
in KV ``slmops_keys`` under ``KEYLIST_KEY``; a node accepts a list only when the signature
verifies against a root it was given (``--trust-root``) AND its version is higher than the one
it holds (``accept``), and keeps the accepted list in its data directory, so a restart — or a
replay of an older list — never brings a revoked key back.

Statuses (issue 17): ``active`` — install and serve its bundles; ``retired`` — install none
of its bundles any more, keep serving what runs; ``compromised`` — serve none of its bundles:
a node falls back to a cached version whose signer is still trusted, or answers 503.

The signature covers the canonical JSON of the document without its ``signature`` member
(sorted keys, no spaces), as manifests are signed (``shared.bundle``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nats.js import JetStreamContext

from slmops.shared import names
from slmops.shared.atomic import write_atomic
from slmops.shared.bundle import TrustStore, key_id
from slmops.shared.kv import kv_get_direct

__all__ = [
    "KEYLIST_KEY",
    "MAX_KEYLIST_BYTES",
    "KeyEntry",
    "KeyList",
    "KeyListError",
    "KeyListHeld",
    "KeyStatus",
    "UntrustedRoot",
    "accept",
    "apply_to",
    "decode_public",
    "decode_signed",
    "encode_public",
    "load_saved",
    "read_signed",
    "revise",
    "save",
    "sign",
    "trust_store",
]

#: The one key of ``names.KEYS_BUCKET`` that holds the fleet's signed list.
KEYLIST_KEY = "keylist"
#: A list document larger than this is refused unread (a thousand keys is ~200 KB).
MAX_KEYLIST_BYTES = 1 << 20
#: Most signing keys one list may name.
MAX_KEYS = 1000

KeyStatus = Literal["active", "retired", "compromised"]
STATUSES: tuple[str, ...] = ("active", "retired", "compromised")


class KeyListError(ValueError):
    """A key list that is refused: ``reason`` says why (malformed, bad signature, stale...)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"key list refused: {reason}")


class UntrustedRoot(KeyListError):
    """The list is signed by ``root`` (a key id), none of the ``trusted`` root key ids."""

    def __init__(self, root: str, trusted: list[str]) -> None:
        self.root = root
        self.trusted = trusted
        super().__init__(f"signed by root {root!r}, which is not a trusted root ({trusted})")


class KeyListHeld(KeyListError):
    """``accept`` was given the very list already held (read again, not a replay): nothing
    to apply, nothing to report."""


class KeyEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """One bundle-signing key: id (``shared.bundle.key_id``), raw public key (base64)."""

    key_id: str
    public_key: str
    status: KeyStatus = "active"
    #: After this instant (UTC) the key counts as retired: no new installs of its bundles.
    not_after: datetime | None = None
    note: str = ""


class KeyList(msgspec.Struct, frozen=True, kw_only=True):
    """The signed document. ``root`` names the root key id that signed it."""

    v: int = 1
    version: int
    issued: datetime
    root: str
    keys: list[KeyEntry]
    signature: str = ""

    def status(self, kid: str, now: datetime | None = None) -> KeyStatus | None:
        """The status of key ``kid`` (None: not listed); a key past ``not_after`` is retired."""
        for entry in self.keys:
            if entry.key_id == kid:
                expired = entry.not_after is not None and (now or datetime.now(UTC)) > entry.not_after
                if entry.status == "active" and expired:
                    return "retired"
                return entry.status
        return None

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Key id -> public key of every listed key (any status)."""
        return {e.key_id: _public(e.public_key) for e in self.keys}


def encode_public(key: Ed25519PublicKey) -> str:
    """The raw 32 public-key bytes, base64: the form ``KeyEntry.public_key`` holds."""
    return base64.b64encode(
        key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()


def decode_public(value: str) -> Ed25519PublicKey:
    """The key ``encode_public`` wrote; ``KeyListError`` for anything else."""
    return _public(value)


def _public(value: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(value, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise KeyListError(f"a public key is not 32 base64 bytes of Ed25519 ({exc})") from None


def _canonical(doc: dict[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(keylist: KeyList, root: Ed25519PrivateKey) -> bytes:
    """``keylist`` signed by ``root``, as the JSON bytes stored in KV."""
    unsigned = msgspec.structs.replace(keylist, root=key_id(root.public_key()), signature="")
    doc = msgspec.to_builtins(unsigned)
    doc["signature"] = base64.b64encode(root.sign(_canonical(doc))).decode()
    return json.dumps(doc, sort_keys=True).encode()


def decode_signed(raw: bytes, roots: Iterable[Ed25519PublicKey]) -> KeyList:
    """Parse ``raw`` and check its root signature against ``roots``; the verified list, or
    ``KeyListError`` naming what is wrong (never another exception, whatever the bytes)."""
    if not isinstance(raw, bytes | bytearray):
        raise KeyListError(f"expected bytes, got {type(raw).__name__}")
    if len(raw) > MAX_KEYLIST_BYTES:
        raise KeyListError(f"{len(raw)} bytes, over the {MAX_KEYLIST_BYTES} byte limit")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise KeyListError(f"not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise KeyListError("not a JSON object")
    try:
        keylist = msgspec.convert(doc, KeyList)
    except (msgspec.ValidationError, OverflowError, RecursionError) as exc:
        raise KeyListError(f"malformed: {exc}") from None
    by_id = {key_id(r): r for r in roots}
    root = by_id.get(keylist.root)
    if root is None:
        raise UntrustedRoot(keylist.root, sorted(by_id))
    try:
        root.verify(base64.b64decode(keylist.signature, validate=True), _canonical(doc))
    except (InvalidSignature, ValueError):
        raise KeyListError(f"the root signature does not match (root {keylist.root})") from None
    _check(keylist)
    return keylist


def _check(keylist: KeyList) -> None:
    if keylist.version < 1:
        raise KeyListError(f"version must be >= 1, got {keylist.version!r}")
    if len(keylist.keys) > MAX_KEYS:
        raise KeyListError(f"{len(keylist.keys)} keys, over the limit of {MAX_KEYS}")
    seen = set()
    for entry in keylist.keys:
        if entry.key_id in seen:
            raise KeyListError(f"key {entry.key_id!r} is listed twice")
        seen.add(entry.key_id)
        if key_id(_public(entry.public_key)) != entry.key_id:
            raise KeyListError(f"key id {entry.key_id!r} does not match its public key")


def accept(held: KeyList | None, raw: bytes, roots: Iterable[Ed25519PublicKey]) -> KeyList:
    """The list in ``raw`` if it verifies and is newer than ``held``; ``KeyListError`` for an
    older or equal version (a replay) as for a bad signature, ``KeyListHeld`` (a subclass)
    when ``raw`` holds the very list held."""
    new = decode_signed(raw, roots)
    if held is not None and new.version <= held.version:
        same = new.version == held.version and _canonical(msgspec.to_builtins(new)) == _canonical(
            msgspec.to_builtins(held)
        )
        if same:
            raise KeyListHeld(f"version {new.version} is the one held")
        raise KeyListError(
            f"version {new.version} is older than or as old as the one held (version {held.version})"
        )
    return new


def revise(
    held: KeyList | None,
    *,
    add: Iterable[Ed25519PublicKey] = (),
    status: dict[str, KeyStatus] | None = None,
    now: datetime | None = None,
) -> KeyList:
    """The next version of ``held`` (version 1 from nothing): ``add`` keys as active (a key
    already listed keeps its entry), then set ``status`` per key id. ``ValueError`` for a key
    id to change that is not listed, or for un-compromising a key (a leaked key stays leaked)."""
    entries = {e.key_id: e for e in (held.keys if held is not None else [])}
    for key in add:
        kid = key_id(key)
        entries.setdefault(kid, KeyEntry(key_id=kid, public_key=encode_public(key)))
    for kid, new_status in (status or {}).items():
        if new_status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {new_status!r}")
        if kid not in entries:
            raise ValueError(f"key {kid!r} is not in the key list (listed: {sorted(entries)})")
        if entries[kid].status == "compromised" and new_status != "compromised":
            raise ValueError(f"key {kid!r} is compromised: it cannot become {new_status} again")
        entries[kid] = msgspec.structs.replace(entries[kid], status=new_status)
    return KeyList(
        version=(held.version + 1) if held is not None else 1,
        issued=now or datetime.now(UTC),
        root="",
        keys=sorted(entries.values(), key=lambda e: e.key_id),
    )


def trust_store(
    static: Iterable[Ed25519PublicKey], keylist: KeyList | None, now: datetime | None = None
) -> TrustStore:
    """What a node trusts: its ``--trust`` keys plus every key of ``keylist``, minus what the
    list revokes. The list wins over a ``--trust`` file: a key the list retires or marks
    compromised is revoked even when it was also given with ``--trust`` (the migration path:
    ``shared.keylist`` docs in the README)."""
    keys = list(static)
    revoked: dict[str, str] = {}
    if keylist is not None:
        keys += keylist.public_keys().values()
        for entry in keylist.keys:
            state = keylist.status(entry.key_id, now)
            if state != "active":
                revoked[entry.key_id] = str(state)
    return TrustStore(keys, revoked=revoked)


def apply_to(trust: TrustStore, raw: bytes, roots: Sequence[Ed25519PublicKey]) -> TrustStore:
    """``trust`` as the key list ``raw`` amends it, for checks outside a node (``models push``).
    With ``roots`` the list must verify (``KeyListError`` otherwise) and its keys are trusted
    too; without, only its revocations are applied — an unverified list may only make the
    check stricter, never trust a key."""
    if roots:
        return trust_store(trust.public_keys, decode_signed(raw, roots))
    try:
        unverified = msgspec.json.decode(raw, type=KeyList)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, OverflowError):
        return trust
    revoked = {e.key_id: str(s) for e in unverified.keys if (s := unverified.status(e.key_id)) != "active"}
    return TrustStore(trust.public_keys, revoked=revoked)


async def read_signed(js: JetStreamContext) -> bytes | None:
    """The signed list's bytes as KV holds them, unverified (None: no list). One direct get
    (``shared.kv.kv_get_direct``, whose errors it raises): what a node and ``models push``
    read. The operator's commands read with the revision, to write compare-and-set
    (``cloud.keys``)."""
    return await kv_get_direct(js, names.KEYS_BUCKET, KEYLIST_KEY)


def save(path: Path, raw: bytes) -> None:
    """Write an accepted list's signed bytes to ``path`` atomically (fsynced)."""
    write_atomic(path, raw, prefix=".keylist-")


def load_saved(path: Path, roots: Iterable[Ed25519PublicKey]) -> tuple[KeyList, bytes] | None:
    """The list saved at ``path``, verified again (None if there is none); ``KeyListError``
    for a saved list that no longer verifies (e.g. the root given changed)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return decode_signed(raw, roots), raw
