"""Version lineage for the console (``/api/lineage``): which version came from which, and why.

Read from what the cloud already stores — nothing new is recorded:

* the registry's manifests (``parent_version``): a version built from another, e.g. a
  label-shift recalibration (an int8 variant of the same version is not a lineage step);
* the recalibration loop's proposals (``LOOP_BUCKET``): the drift event that made the loop
  build a version, and on which fleet;
* the rollout history (``SLMOPS_ROLLOUT`` stream, ``rollout_history``): each push of a
  version to a fleet (from the version it ran), its outcome, and a rollback back to the
  previous version with its reason.

Each step is a ``LineageStep``; ``lineage`` returns them oldest version first.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import anyio
import msgspec
import structlog
from nats.js import JetStreamContext

from slmops.shared.messages import ModelManifest

if TYPE_CHECKING:
    from slmops.cloud.rollout.history import RolloutRecord

__all__ = ["LineageStep", "lineage", "steps_of"]

log = structlog.get_logger(__name__)


class LineageStep(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One arrow ``model v<from_version> → v<to_version>``. ``kind``: "recalibration" (built
    from the parent by the loop or ``slmops models recalibrate``), "derived" (another build
    naming a parent), "rollout" (pushed to ``fleet``; ``outcome`` running, completed,
    rolled_back or aborted) or "rollback" (the fleet went back to ``to_version``)."""

    model: str
    #: None: the fleet ran no version before this rollout (or a rollback had nowhere to go).
    from_version: int | None
    to_version: int | None
    kind: str
    #: The fleet a rollout or rollback happened on, or the loop's recalibration was for.
    fleet: str | None = None
    #: The drift event that caused it (recalibrations), or the rollout's trigger.
    event: str | None = None
    #: The rollout id and its outcome (rollouts and rollbacks).
    rollout: str | None = None
    outcome: str | None = None
    #: Why (a rollback's reason, a recalibration's notes).
    reason: str = ""
    #: When: the version built, the rollout started, the rollback happened.
    time: datetime | None = None


def steps_of(
    manifests: list[ModelManifest],
    proposals: dict[tuple[str, int], tuple[str, str]],
    rollouts: list[RolloutRecord],
) -> list[LineageStep]:
    """The lineage steps of ``manifests`` (each version once, whatever its variants),
    ``proposals`` ((model, version) -> (drift event id, fleet)) and ``rollouts``
    (``cloud.rollout.history.RolloutRecord``), sorted by model, then version, then time."""
    steps: list[LineageStep] = []
    seen: set[tuple[str, int]] = set()
    for m in manifests:
        if m.parent_version is None or m.parent_version == m.version or (m.name, m.version) in seen:
            continue
        seen.add((m.name, m.version))
        why = proposals.get((m.name, m.version))
        recal = why is not None or m.notes.startswith("label-shift recalibration")
        steps.append(
            LineageStep(
                model=m.name,
                from_version=m.parent_version,
                to_version=m.version,
                kind="recalibration" if recal else "derived",
                fleet=why[1] if why else None,
                event=why[0] if why else None,
                reason=m.notes,
                time=m.created,
            )
        )
    for r in rollouts:
        model, version, previous = r.model, r.version, r.previous_version
        fleet, rid, outcome = r.fleet, r.rollout, r.outcome
        steps.append(
            LineageStep(
                model=model,
                from_version=previous,
                to_version=version,
                kind="rollout",
                fleet=fleet,
                event=r.trigger or None,
                rollout=rid,
                outcome=outcome,
                time=r.started,
            )
        )
        if outcome == "rolled_back":
            steps.append(
                LineageStep(
                    model=model,
                    from_version=version,
                    to_version=previous,
                    kind="rollback",
                    fleet=fleet,
                    rollout=rid,
                    outcome=outcome,
                    reason=r.reason,
                    time=r.ended,
                )
            )
    far = datetime.max.replace(tzinfo=UTC)
    steps.sort(key=lambda s: (s.model, s.to_version or 0, s.time or far))
    return steps


async def lineage(js: JetStreamContext, manifests: list[ModelManifest]) -> list[LineageStep]:
    """``steps_of`` with the proposals and rollout history read from JetStream; a store that
    cannot be read (none yet, a timeout) contributes nothing and is logged."""
    from slmops.cloud.recalibration.loop import Proposal
    from slmops.cloud.rollout.history import rollout_history
    from slmops.shared.kv import kv_values
    from slmops.shared.names import LOOP_BUCKET

    proposals: dict[tuple[str, int], tuple[str, str]] = {}
    decoder = msgspec.json.Decoder(Proposal)
    try:
        with anyio.fail_after(5):
            raw = await kv_values(js, LOOP_BUCKET)
        for value in raw.values():
            try:
                p = decoder.decode(value)
            except msgspec.DecodeError:
                continue
            proposals[(p.model, p.version)] = (p.event_id, p.fleet)
    except Exception as exc:  # no loop bucket yet: no recalibration reasons
        log.debug("lineage_proposals_unread", error=repr(exc)[:200])
    rollouts: list[RolloutRecord] = []
    try:
        with anyio.fail_after(10):
            rollouts = list(await rollout_history(js, None, timeout=1.0))
    except Exception as exc:  # no rollout stream yet
        log.debug("lineage_rollouts_unread", error=repr(exc)[:200])
    return steps_of(manifests, proposals, rollouts)
