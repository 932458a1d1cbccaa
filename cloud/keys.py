"""Publishing the fleet's signed key list (``shared.keylist``) in KV ``slmops_keys``.

Every change reads the list held in KV, checks that it verifies against the root given (the
operator signs with the root's private key, so a list signed by another root is never
silently replaced), makes the next version (``shared.keylist.revise``), signs it and writes
it compare-and-set on the revision read: two operators changing the list at once cannot lose
one change (the second gets ``KeyListConflict`` and runs again).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nats.js import JetStreamContext

from slmops.cloud.errors import CloudError
from slmops.shared import names
from slmops.shared.bundle import key_id
from slmops.shared.errors import JetStreamRefused, NotFound
from slmops.shared.jetstream import nats_errors
from slmops.shared.keylist import (
    KEYLIST_KEY,
    KeyList,
    KeyListError,
    KeyStatus,
    UntrustedRoot,
    accept,
    decode_signed,
    revise,
    sign,
)

__all__ = [
    "KeyListConflict",
    "change_key_list",
    "next_key_list",
    "publish_key_list",
    "read_key_list",
    "write_key_list",
]


class KeyListConflict(CloudError):
    """The key list changed in KV between our read and our write."""

    def __init__(self, revision: int) -> None:
        self.revision = revision
        super().__init__(
            f"the key list changed while this change was made (read revision {revision}); run it again"
        )


async def read_key_list(js: JetStreamContext, url: str = "<nats>") -> tuple[bytes | None, int]:
    """The signed list's bytes in KV and its revision; ``(None, 0)`` when there is none (no
    key, or no bucket yet: nothing is created)."""
    try:
        with nats_errors("kv bucket", names.KEYS_BUCKET, url):
            kv = await js.key_value(names.KEYS_BUCKET)
        with nats_errors("kv key", KEYLIST_KEY, url):
            entry = await kv.get(KEYLIST_KEY)
    except NotFound:
        return None, 0
    return entry.value, entry.revision or 0


async def next_key_list(
    js: JetStreamContext,
    root: Ed25519PrivateKey,
    *,
    add: Iterable[Ed25519PublicKey] = (),
    status: dict[str, KeyStatus] | None = None,
    url: str = "<nats>",
) -> tuple[bytes, int]:
    """The next version of the list held in KV (``add`` keys as active, then ``status`` per
    key id), signed by ``root``, and the KV revision it was made from; not written.
    ``KeyListError`` when the held list does not verify against ``root`` (signed by another
    root: naming both); ``ValueError`` for
    a change ``revise`` refuses."""
    raw, revision = await read_key_list(js, url)
    try:
        held = None if raw is None else decode_signed(raw, [root.public_key()])
    except UntrustedRoot as exc:  # the held list is genuine here: the root given is the wrong one
        given = key_id(root.public_key())
        raise KeyListError(
            f"the list held is signed by root {exc.root}; the root key given (--root) is {given}, "
            "not that root"
        ) from exc
    return sign(revise(held, add=add, status=status), root), revision


async def write_key_list(js: JetStreamContext, signed: bytes, revision: int, url: str = "<nats>") -> None:
    """Write ``signed`` compare-and-set on ``revision`` (0: the key must not exist yet).
    ``KeyListConflict`` when another change came first."""
    kv = await js.key_value(names.KEYS_BUCKET)
    try:
        with nats_errors("kv key", KEYLIST_KEY, url):
            if revision:
                await kv.update(KEYLIST_KEY, signed, last=revision)
            else:
                await kv.create(KEYLIST_KEY, signed)
    except JetStreamRefused as exc:
        raise KeyListConflict(revision) from exc


async def publish_key_list(
    js: JetStreamContext, signed: bytes, root: Ed25519PublicKey, url: str = "<nats>"
) -> KeyList:
    """The change service's side (``keys rotate|revoke`` through the cloud): write a list an
    operator made and signed, if it verifies against ``root``, the list held (if any)
    verifies against the same root (a list of another root is never replaced) and it is
    newer. Returns the list written. ``KeyListError`` (a ``ValueError``) or
    ``KeyListConflict``."""
    raw, revision = await read_key_list(js, url)
    held = None if raw is None else decode_signed(raw, [root])
    new = accept(held, signed, [root])
    await write_key_list(js, signed, revision, url)
    return new


async def change_key_list(js: JetStreamContext, root: Ed25519PrivateKey, **change: Any) -> KeyList:
    """Write the next version of the list (``change``: ``add``, ``status``, ``url`` as for
    ``next_key_list``): made, signed by ``root`` and written here, not through the cloud.
    Returns the list written. Raises as ``next_key_list`` and ``write_key_list``."""
    signed, revision = await next_key_list(js, root, **change)
    await write_key_list(js, signed, revision, change.get("url", "<nats>"))
    return decode_signed(signed, [root.public_key()])
