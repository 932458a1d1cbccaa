"""What an operator's tool does for ``slmops fleet config``: make the next version, sign it,
ask the active cloud's change service to publish it (so the audit records the server's
identity), and read versions back."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from slmops.cloud.errors import CloudError
from slmops.cloud.fleetconfig.store import ConfigStore, decode_doc
from slmops.shared import names
from slmops.shared.audit import ChangeReply, ChangeRequest
from slmops.shared.errors import NatsUnavailable, NoResponders, NotFound
from slmops.shared.fleetconfig import FleetConfigDoc, sign_config
from slmops.shared.jetstream import service_request
from slmops.shared.messages import decode_json, encode_json

__all__ = ["ChangeRefused", "history", "propose", "request_change", "rollback_document", "send_change"]

#: Seconds to wait for the change service's answer (a staged first step reads statuses).
REQUEST_TIMEOUT = 20.0


class ChangeRefused(CloudError):
    """The cloud refused a change, or no cloud answered (``no_cloud``)."""

    def __init__(self, reason: str, *, no_cloud: bool = False) -> None:
        self.reason, self.no_cloud = reason, no_cloud
        super().__init__(reason)


async def next_version(js: JetStreamContext, fleet: str) -> int:
    versions = await (await ConfigStore(js).open()).versions(fleet)
    return (versions[-1] if versions else 0) + 1


async def propose(
    js: JetStreamContext,
    fleet: str,
    settings: dict[str, Any],
    key: Ed25519PrivateKey,
    *,
    schema: int,
    note: str = "",
) -> bytes:
    """The next version of ``fleet``'s configuration, signed by ``key`` (not published)."""
    doc = FleetConfigDoc(
        fleet=names.validate_id(fleet, "fleet"),
        version=await next_version(js, fleet),
        schema=schema,
        settings=settings,
        created=datetime.now(UTC),
        note=note,
    )
    return sign_config(doc, key)


async def rollback_document(js: JetStreamContext, fleet: str, to: int, key: Ed25519PrivateKey) -> bytes:
    """A new version carrying version ``to``'s settings. Raises ``ChangeRefused`` when there
    is no such version."""
    raw = await (await ConfigStore(js).open()).version(fleet, to)
    if raw is None:
        raise ChangeRefused(f"fleet {fleet} has no configuration version {to}")
    old = decode_doc(raw, f"version {to}")
    return await propose(js, fleet, old.settings, key, schema=old.schema, note=f"rollback to v{to}")


async def send_change(nc: NATS, request: ChangeRequest, *, timeout: float = REQUEST_TIMEOUT) -> ChangeReply:
    """Ask the active cloud (on the fleet's change subject; a request with no fleet, e.g.
    ``keys.rotate``, on ``names.CHANGE_GLOBAL``). Raises ``ChangeRefused`` with the cloud's
    reason, or when no cloud answers."""
    subject = names.change_subject(request.fleet) if request.fleet else names.CHANGE_GLOBAL
    try:
        msg = await service_request(nc, subject, encode_json(request), timeout=timeout)
    except NoResponders as exc:
        raise ChangeRefused(
            f"no cloud answers on {subject}: is `slmops cloud` running for this "
            "fleet (and may you reach it)?",
            no_cloud=True,
        ) from exc
    except NatsUnavailable as exc:
        raise ChangeRefused(f"the cloud did not answer: {exc.reason}") from exc
    try:
        reply = decode_json(msg.data, ChangeReply)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ChangeRefused(f"unreadable answer from the cloud: {exc}") from exc
    if not reply.ok:
        raise ChangeRefused(reply.error or "refused")
    return reply


async def request_change(url: str, request: ChangeRequest) -> ChangeReply | None:
    """``send_change`` over a connection of its own to ``url``; None when no cloud serves the
    fleet (the caller may then do the change itself, unaudited, and say so). Raises
    ``ChangeRefused`` with the cloud's reason, ``NatsUnavailable`` when ``url`` is down."""
    from slmops.shared.connect import connect_once

    nc = await connect_once(url, timeout=5.0, name="slmops-cli")
    try:
        return await send_change(nc, request)
    except ChangeRefused as exc:
        if exc.no_cloud:
            return None
        raise
    finally:
        await nc.close()


async def history(js: JetStreamContext, fleet: str) -> list[FleetConfigDoc]:
    """Every published version of ``fleet``, oldest first (undecodable ones skipped); none
    when the config bucket does not exist (nothing created)."""
    try:
        store = await ConfigStore(js).open()
    except NotFound:
        return []
    out = []
    for v in await store.versions(fleet):
        raw = await store.version(fleet, v)
        if raw:
            try:
                out.append(decode_doc(raw, f"version {v}"))
            except ValueError:
                continue
    return out
