"""``slmops drift baseline``: an analyst sets a (fleet, model)'s production baseline.

The command sends a ``BaselineRequest`` (JSON) on ``slmops.cloud.baseline``; the active cloud
instance (the only one subscribed) pools the group's stored rounds whose windows lie in the
period (``StateStore.rounds``) into the new references (``DriftDetector.set_baseline``),
commits them with the ``kind="baseline"`` event (and the resolutions of fleet events the new
normal covers) in one transaction, publishes the events, and replies with a
``BaselineReply``. Standbys do not answer, so a request with no active cloud times out.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from slmops.cloud.ingest.apply import Applier
from slmops.cloud.ingest.events import encode_event
from slmops.shared import names
from slmops.shared.messages import DriftEvent

__all__ = ["BASELINE_SUBJECT", "BaselineReply", "BaselineRequest", "serve_baselines", "set_baseline"]

log = structlog.get_logger(__name__)

BASELINE_SUBJECT = names.BASELINE_SUBJECT


class BaselineRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    fleet: str
    model: str
    #: None: the newest version the cloud has seen on the fleet (every variant of it).
    version: int | None = None
    variant: str | None = None
    #: The period (aggregate window times); None: the last hour up to now.
    start: datetime | None = None
    end: datetime | None = None


class BaselineReply(msgspec.Struct, kw_only=True):
    events: list[DriftEvent] = []
    error: str = ""


async def set_baseline(applier: Applier, req: BaselineRequest, now: datetime) -> list[DriftEvent]:
    """Apply ``req``; returns the events published. ``ValueError`` with a one-line reason
    when nothing matches (no such group, no rounds in the period)."""
    end = req.end or now
    start = req.start or end - timedelta(hours=1)
    if start >= end:
        raise ValueError(f"the period must start before it ends ({start.isoformat()} >= {end.isoformat()})")
    det = applier.detector
    async with applier.lock:
        groups = [g for g in det.groups.values() if g.fleet == req.fleet and g.model.name == req.model]
        if req.version is not None:
            groups = [g for g in groups if g.model.version == req.version]
        elif groups:
            newest = max(g.model.version for g in groups)
            groups = [g for g in groups if g.model.version == newest]
        if req.variant is not None:
            groups = [g for g in groups if g.model.variant == req.variant]
        if not groups:
            version = f" v{req.version}" if req.version is not None else ""
            raise ValueError(f"the cloud has seen no traffic of {req.model}{version} on fleet {req.fleet}")
        events: list[DriftEvent] = []
        for g in groups:
            rounds = await applier.store.rounds(g.key, start, end, limit=1_000_000)
            if not rounds:
                raise ValueError(
                    f"{g.key}: no stored round between {start.isoformat()} and {end.isoformat()}"
                )
            events += det.set_baseline(g.fleet, g.model, rounds)
        dirty_groups, units = det.take_dirty()
        rows = [encode_event(e) for e in events]
        applier._fence()  # the lease: only the active instance commits
        await applier.store.commit(groups=dirty_groups, units=units, events=rows)
    applier.publisher.add(rows)
    for e in events:
        log.info("drift_baseline_set", id=e.id, reference=e.reference, kind=e.kind)
    return events


async def serve_baselines(nc: NATS, applier: Applier, *, task_status: TaskStatus[None]) -> None:
    """Answer baseline requests until cancelled (run only in the active instance)."""
    sub = await nc.subscribe(BASELINE_SUBJECT, max_msgs=0)
    task_status.started()
    try:
        async for msg in sub.messages:
            await _answer(msg, applier)
    finally:
        with anyio.CancelScope(shield=True):
            await sub.unsubscribe()


async def _answer(msg: Msg, applier: Applier) -> None:
    try:
        req = msgspec.json.decode(msg.data, type=BaselineRequest)
        reply = BaselineReply(events=await set_baseline(applier, req, datetime.now(UTC)))
    except (msgspec.DecodeError, ValueError) as exc:
        reply = BaselineReply(error=str(exc))
        log.warning("drift_baseline_refused", error=str(exc))
    if msg.reply:
        await msg.respond(msgspec.json.encode(reply))
