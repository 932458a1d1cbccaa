"""The ``keys.rotate`` and ``keys.revoke`` actions of the change service (on
``names.CHANGE_GLOBAL``: the key list belongs to no fleet). The operator's tool makes the
next version of the list and signs it with the root key (which never leaves the operator);
the active cloud writes it (``cloud.keys.publish_key_list``: it must verify against the root
the request names, as the list held must) and records who did it."""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext

from slmops.cloud.keys import publish_key_list
from slmops.shared.audit import ChangeReply, ChangeRequest
from slmops.shared.keylist import decode_public

__all__ = ["KEY_ACTIONS", "KeysParams", "keys_change"]

KEY_ACTIONS = ("keys.rotate", "keys.revoke")


class KeysParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    #: The root public key the list is signed with (``shared.keylist.encode_public``).
    root: str


async def keys_change(
    req: ChangeRequest, js: JetStreamContext, url: str
) -> tuple[ChangeReply, str, dict[str, object]]:
    """Do a ``keys.*`` request (``document``: the signed list). Raises ``ValueError``
    (``KeyListError``: bad or older list, another root) or ``KeyListConflict``."""
    try:
        p = msgspec.convert(req.params, KeysParams)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{req.action}: {exc}") from exc
    new = await publish_key_list(js, req.document.encode(), decode_public(p.root), url)
    detail: dict[str, object] = {
        "version": new.version,
        "root": new.root,
        "keys": {e.key_id: new.status(e.key_id) for e in new.keys},
    }
    return ChangeReply(ok=True, version=new.version, result=detail), "key list", detail
