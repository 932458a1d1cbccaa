"""Writing and reading ``SLMOPS_AUDIT`` (``shared.audit.AuditRecord``, JSON)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from slmops.cloud.audit.identity import Identity
from slmops.shared.audit import AuditRecord
from slmops.shared.errors import JetStreamRefused, NotFound
from slmops.shared.jetstream import nats_errors, read_by_gets, replay
from slmops.shared.messages import decode_json, encode_json
from slmops.shared.names import AUDIT_ALL, AUDIT_STREAM, audit_subject

__all__ = ["new_record", "read_audit", "record_audit"]

log = structlog.get_logger(__name__)


def new_record(identity: Identity, action: str, fleet: str | None, **fields: Any) -> AuditRecord:
    return AuditRecord(
        id=uuid.uuid4().hex,
        time=datetime.now(UTC),
        who=identity.who,
        account=identity.account,
        user=identity.user,
        action=action,
        fleet=fleet,
        **fields,
    )


async def record_audit(js: JetStreamContext, record: AuditRecord, *, url: str = "<nats>") -> None:
    """Store ``record`` (deduplicated by its id). Raises ``NatsUnavailable`` /
    ``JetStreamRefused`` when it could not be stored: the caller must then not report the
    change as done without its record."""
    with nats_errors("stream", AUDIT_STREAM, url):
        await js.publish(
            audit_subject(record.fleet), encode_json(record), timeout=5.0, headers={"Nats-Msg-Id": record.id}
        )
    log.info(
        "audit", who=record.who, action=record.action, fleet=record.fleet, ok=record.ok, target=record.target
    )


async def read_audit(
    js: JetStreamContext, fleet: str | None = None, *, url: str = "<nats>", timeout: float = 3.0
) -> list[AuditRecord]:
    """Every record (of ``fleet``, and the fleet-independent ones; all when None), oldest
    first. Read through an ordered consumer; a reader that may create no consumer (an
    operator of ``slmops fleet init``'s OPERATOR account reads through read-only imports)
    gets them one message get at a time. None when the audit stream does not exist yet.
    Raises ``NatsUnavailable`` when the stream cannot be read."""
    subjects = [AUDIT_ALL] if fleet is None else [audit_subject(fleet), audit_subject(None)]
    out: list[AuditRecord] = []

    def take(subject: str, data: bytes) -> None:
        try:
            out.append(decode_json(data, AuditRecord))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("audit_record_undecodable", subject=subject, error=str(exc))

    def on_msg(msg: Msg) -> None:
        take(msg.subject, msg.data)

    for subject in subjects:
        try:
            with nats_errors("stream", AUDIT_STREAM, url):
                info = await js.stream_info(AUDIT_STREAM, subjects_filter=subject)
        except NotFound:  # no audit stream yet: no change was ever recorded on this server
            return []
        if info.state.subjects:
            try:
                await replay(js, AUDIT_STREAM, subject, on_msg, url=url, timeout=timeout)
            except JetStreamRefused:  # no consumer may be made: read message by message
                await read_by_gets(js, AUDIT_STREAM, subject, take, url)
    return sorted(out, key=lambda r: (r.time, r.id))
