"""The change service: the active cloud answers ``ChangeRequest``s on ``names.CHANGE_SUBJECT``,
does the change and records it on ``SLMOPS_AUDIT`` with the requester's identity as the
server gave it (``cloud.audit.identity``). Refused requests are recorded too (who tried what).

Actions: ``assign`` (``cloud.audit.assign``), ``rollout.start|pause|resume|abort``
(``cloud.audit.rollout``), ``keys.rotate|revoke`` (``cloud.audit.keys``; on
``names.CHANGE_GLOBAL``, recorded with no fleet), ``config.apply`` and ``config.rollback`` (a
rollback is a new version carrying an older one's settings, made and signed by the
operator's tool): the signed document is stored as ``<fleet>._v.<version>`` (a version is
never overwritten and must be newer than every one before), then written to the fleet's
key, to the selected nodes' keys, or staged (``cloud.fleetconfig.rollout``). For a fleet
none of whose nodes ever reported, the reply's notes say that nothing was applied now.

Every instance subscribes in one queue group (``QUEUE``), so a request is done once even
where several active instances (fleets split between them) all hear the global subject.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from slmops.cloud.audit.assign import assign_change
from slmops.cloud.audit.identity import Identity, IdentityReader
from slmops.cloud.audit.keys import KEY_ACTIONS, keys_change
from slmops.cloud.audit.record import new_record, record_audit
from slmops.cloud.audit.rollout import ROLLOUT_ACTIONS, rollout_change
from slmops.cloud.errors import CloudError
from slmops.cloud.fleetconfig.rollout import ConfigRollout, start_config_rollout
from slmops.cloud.fleetconfig.store import ConfigStore, decode_doc, select_nodes
from slmops.shared import names
from slmops.shared.audit import AuditRecord, ChangeReply, ChangeRequest
from slmops.shared.bundle import TrustStore
from slmops.shared.errors import JetStreamRefused, NatsUnavailable
from slmops.shared.fleetconfig import ConfigRejected, verify_config
from slmops.shared.messages import encode_json

__all__ = ["ACTIONS", "QUEUE", "handle_change", "serve_changes"]

log = structlog.get_logger(__name__)

ACTIONS = ("config.apply", "config.rollback", "assign", *ROLLOUT_ACTIONS, *KEY_ACTIONS)
#: The queue group of every instance's change subscriptions.
QUEUE = "slmops-cloud-change"
_HANDLERS = {"assign": assign_change, **dict.fromkeys(ROLLOUT_ACTIONS, rollout_change)}


def _stages(stages: list[int]) -> list[int]:
    if not stages:
        return []
    ok = all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 100 for p in stages)
    if not ok or stages != sorted(set(stages)) or stages[-1] != 100:
        raise ValueError(f"stages must be increasing percentages ending at 100, got {stages!r}")
    return stages


async def handle_change(
    req: ChangeRequest,
    who: Identity,
    store: ConfigStore,
    trust: TrustStore | None = None,
    subject: str | None = None,
) -> tuple[ChangeReply, AuditRecord]:
    """Do ``req``; returns the reply and the audit record (stored by the caller). Raises
    ``ValueError`` (``ConfigRejected`` among them) for a request it refuses."""
    if req.action not in ACTIONS:
        raise ValueError(f"unknown action {req.action!r} (known: {list(ACTIONS)})")
    if req.action in KEY_ACTIONS:
        if req.fleet or (subject is not None and subject != names.CHANGE_GLOBAL):
            raise ValueError(
                f'{req.action} belongs to no fleet: ask it on {names.CHANGE_GLOBAL} with fleet ""'
            )
        reply, target, done = await keys_change(req, store.js, store.url)
        record = new_record(who, req.action, None, target=target, detail=done)
        return msgspec.structs.replace(reply, audit_id=record.id), record
    fleet = names.validate_id(req.fleet, "fleet")
    if subject is not None and subject != names.change_subject(fleet):
        raise ValueError(f"a change to fleet {fleet!r} sent on {subject!r}")
    handler = _HANDLERS.get(req.action)
    if handler is not None:
        reply, target, done = await handler(req, store.js, store.url)
        record = new_record(who, req.action, fleet, target=target, detail=done)
        return msgspec.structs.replace(reply, audit_id=record.id), record
    raw = req.document.encode()
    doc = verify_config(raw, trust) if trust is not None else decode_doc(raw, "document")
    if doc.fleet != fleet:
        raise ConfigRejected(f"the document is for fleet {doc.fleet!r}, not {fleet!r}", doc.version)
    stages = _stages(list(req.stages))
    if not req.soak_s >= 0:
        raise ValueError(f"soak_s must be >= 0, got {req.soak_s!r}")
    versions = await store.versions(fleet)
    if versions and doc.version <= versions[-1]:
        raise ConfigRejected(
            f"version {doc.version} is not newer than the latest, {versions[-1]}", doc.version
        )
    known = await store.known_nodes(fleet)
    nodes = select_nodes(known, req.nodes) if req.nodes.strip() else None
    await store.record_version(fleet, doc.version, raw)
    if stages:
        written = await start_config_rollout(
            store,
            ConfigRollout(
                fleet=fleet, version=doc.version, document=req.document, nodes=nodes or [], stages=stages,
                soak_s=req.soak_s,
            ),
        )  # fmt: skip
    else:
        await store.write(fleet, raw, nodes)
        written = nodes or []
    target = "fleet" if nodes is None else f"nodes {', '.join(nodes)}"
    detail: dict[str, Any] = {
        "version": doc.version,
        "schema": doc.schema,
        "settings": doc.settings,
        "note": doc.note,
        "signed_by": doc.signature.key_id if doc.signature else None,
    }
    if stages:
        detail.update(stages=stages, soak_s=req.soak_s)
    record = new_record(who, req.action, fleet, target=target, detail=detail)
    notes = [] if known else [_no_node_yet(fleet, doc.version)]
    reply = ChangeReply(ok=True, audit_id=record.id, version=doc.version, nodes=written, notes=notes)
    return reply, record


def _no_node_yet(fleet: str, version: int) -> str:
    """The note of a version stored for a fleet none of whose nodes ever reported: a new
    fleet (its nodes take it when they join) or a mistyped name."""
    return (
        f"no node of fleet {fleet!r} has ever reported to the cloud: nothing was applied now; "
        f"nodes of {fleet!r} that join take version {version} (a mistyped --fleet? see `slmops fleet status`)"
    )


async def _answer(msg: Msg, reader: IdentityReader, store: ConfigStore, trust: TrustStore | None) -> None:
    who = reader.of(msg.headers, msg.reply)
    fleet: str | None = None
    action = "unknown"
    try:
        req = msgspec.json.decode(msg.data, type=ChangeRequest)
        fleet = req.fleet if isinstance(req.fleet, str) else None
        action = req.action if isinstance(req.action, str) else action
        if store.closed:
            await store.open()
        reply, record = await handle_change(req, who, store, trust, msg.subject)
    except (NatsUnavailable, JetStreamRefused) as exc:
        reply, record = ChangeReply(ok=False, error=f"cloud could not do it: {exc}"), None
    except (
        ValueError,
        TypeError,
        CloudError,  # refused as asked: unknown version, another rollout active, list conflict
        msgspec.DecodeError,
        msgspec.ValidationError,
        RecursionError,
        OverflowError,
    ) as exc:
        reason = str(exc)[:500]
        log.warning("change_refused", who=who.who, error=reason)
        try:
            names.validate_id(fleet, "fleet")
        except (TypeError, ValueError):
            fleet = None
        record = new_record(who, action[:64], fleet, ok=False, reason=reason)
        reply = ChangeReply(ok=False, error=reason, audit_id=record.id)
    if record is not None:
        try:
            await record_audit(store.js, record, url=store.url)
        except (NatsUnavailable, JetStreamRefused) as exc:
            log.error("audit_not_recorded", who=who.who, action=record.action, error=str(exc))
            reply = msgspec.structs.replace(
                reply, ok=False, error=f"{reply.error or 'done'}; audit not recorded: {exc}"
            )
    if msg.reply:
        try:
            await msg.respond(encode_json(reply))
        except Exception as exc:  # the requester is gone: the record says what happened
            log.warning("change_reply_failed", error=repr(exc))


async def serve_changes(
    nc: NATS,
    js: JetStreamContext,
    *,
    fleets: list[str] | None = None,
    trust: TrustStore | None = None,
    url: str = "<nats>",
    audit_accounts: list[str] | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Answer change requests for ``fleets`` (None or empty: every fleet) until cancelled
    (run only in the active instance). One bad request never stops it: each is answered (or
    refused) and recorded on its own. ``audit_accounts``: the operator accounts whose
    server-written identity is believed (``IdentityReader``)."""
    reader = IdentityReader(nc, audit_accounts or ())
    # Opened at the first request (``_answer``): nothing here may fail the cloud's start on a
    # server that is restarting.
    store = ConfigStore(js, url=url)
    subjects = (
        [*(names.change_subject(f) for f in fleets), names.CHANGE_GLOBAL]
        if fleets
        else [f"{names.CHANGE_SUBJECT}.*"]  # the global subject among them
    )
    send, receive = anyio.create_memory_object_stream[Msg](64)

    async def on_msg(msg: Msg) -> None:
        # Full (64 requests waiting): wait here; nats-py then buffers in its own bounded
        # pending queue and, beyond it, drops — the requester sees a timeout.
        # Shutting down (closed): the requester times out and asks again.
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await send.send(msg)

    subs = [await nc.subscribe(s, queue=QUEUE, cb=on_msg) for s in subjects]
    task_status.started()
    try:
        await reader.start()  # requests wait in the stream meanwhile
        async with send, receive:
            async for msg in receive:
                try:
                    await _answer(msg, reader, store, trust)
                except Exception:  # a bug for one request must not end the service
                    log.exception("change_failed")
    finally:
        with anyio.CancelScope(shield=True):
            for sub in subs:
                await sub.unsubscribe()
