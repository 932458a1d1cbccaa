"""The ``assign`` action of the change service: a model assignment written by the active cloud
(``cloud.registry.Registry.assign``, then ``pin_incapable`` fleet-wide), so it is audited with
the requester's identity like every other change."""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext

from slmops.cloud.registry import Registry
from slmops.shared.audit import ChangeReply, ChangeRequest

__all__ = ["AssignParams", "assign_change"]


class AssignParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: int
    model: str | None = None
    node: str | None = None
    variant: str | None = None
    side_by_side: bool = False


async def assign_change(
    req: ChangeRequest, js: JetStreamContext, url: str
) -> tuple[ChangeReply, str, dict[str, object]]:
    """Do an ``assign`` request: the reply (the ``Assignment`` written and the notes), the
    audit target and detail. Raises ``ValueError`` (bad parameters, unknown version...)."""
    try:
        p = msgspec.convert(req.params, AssignParams)
    except msgspec.ValidationError as exc:
        raise ValueError(f"assign: {exc}") from exc
    registry = Registry(js, url=url)
    a = await registry.assign(
        req.fleet, p.version, model=p.model, node=p.node, variant=p.variant, side_by_side=p.side_by_side
    )
    notes = (
        []
        if p.node
        else await registry.pin_incapable(req.fleet, a.model, a.version, side_by_side=p.side_by_side)
    )
    result = msgspec.to_builtins(a)
    reply = ChangeReply(ok=True, version=a.version, result=result, notes=notes)
    return reply, f"node {a.node}" if a.node else "fleet", {"model": a.model, "version": a.version, **result}
