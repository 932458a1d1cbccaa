"""Audit records and change requests (issue 17): the wire contract of ``cloud.audit``.

A change to what the fleet runs or trusts is asked of the active cloud on
``names.CHANGE_SUBJECT`` (a ``ChangeRequest``, JSON); the cloud does it and records an
``AuditRecord`` on ``SLMOPS_AUDIT``. The record's ``who`` is what the NATS server
authenticated — read from the ``Nats-Request-Info`` header the server writes when the request
crosses a service import with ``share: true`` — or ``"unauthenticated"``; never a field of the
request (there is none to fill in).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from slmops.shared.messages import Wire

__all__ = ["UNAUTHENTICATED", "AuditRecord", "ChangeReply", "ChangeRequest"]

#: ``AuditRecord.who`` when the server authenticated nobody (no auth configured), or when the
#: server added no identity the cloud can trust.
UNAUTHENTICATED = "unauthenticated"


class AuditRecord(Wire, kw_only=True):
    """Who changed what, when (JSON on ``slmops.audit.<fleet>``)."""

    v: int = 1
    #: e.g. "config.apply", "config.rollback", "config.stage", "config.halted".
    action: str
    fleet: str | None = None
    #: The credential's name as the server authenticated it (a JWT's name, else the user),
    #: ``"unauthenticated"``, or ``"cloud"`` for the cloud's own automatic steps.
    who: str
    #: When the cloud did it (its own clock, UTC).
    time: datetime
    #: The requester's account (from the server), when known.
    account: str | None = None
    #: The user's public key or name as the server gave it, when it differs from ``who``.
    user: str | None = None
    id: str
    #: What it applied to: "fleet", "nodes a,b", "cohort 10%: a".
    target: str = ""
    detail: dict[str, Any] = msgspec.field(default_factory=dict)
    ok: bool = True
    #: Why it was refused (``ok`` False).
    reason: str | None = None


class ChangeRequest(Wire, kw_only=True):
    """What a tool asks the cloud to change. It carries no identity: the server's is used."""

    v: int = 1
    #: "config.apply", "config.rollback" or "assign".
    action: str
    fleet: str
    #: The signed ``FleetConfigDoc`` (JSON text), made and signed by the operator's tool.
    document: str = ""
    #: Which nodes: comma-separated node ids or shell-style patterns ("till-*"), matched
    #: against the nodes the cloud has seen; "" = the whole fleet.
    nodes: str = ""
    #: Staged: cumulative percentages of the targeted nodes (e.g. [10, 50, 100]); each stage
    #: waits until its nodes report the version "applied" and healthy for ``soak_s``.
    stages: list[int] = msgspec.field(default_factory=list)
    soak_s: float = 0.0
    #: The arguments of actions other than configuration (e.g. "assign": model, version,
    #: node, variant, side_by_side).
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class ChangeReply(Wire, kw_only=True):
    ok: bool
    error: str | None = None
    audit_id: str | None = None
    version: int | None = None
    #: The nodes written now (a staged rollout: the first stage's).
    nodes: list[str] = msgspec.field(default_factory=list)
    #: What the action made (e.g. the ``Assignment`` written), and notes for the operator.
    result: dict[str, Any] = msgspec.field(default_factory=dict)
    notes: list[str] = msgspec.field(default_factory=list)
