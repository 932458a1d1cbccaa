"""Every rollout a fleet had, its outcome and why, read from the ``SLMOPS_ROLLOUT`` stream
(the events the controller publishes) — also those the cloud started itself (recalibration)
and those whose KV state a later rollout replaced."""

from __future__ import annotations

from datetime import datetime

import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from slmops.shared.errors import NotFound
from slmops.shared.jetstream import nats_errors, replay
from slmops.shared.messages import RolloutEvent, decode_json
from slmops.shared.names import ROLLOUT_ALL, ROLLOUT_STREAM, rollout_subject
from slmops.shared.vocabulary import RolloutEventState

__all__ = ["RolloutRecord", "rollout_history"]

log = structlog.get_logger(__name__)

_END = {"completed", "rolled_back", "aborted"}


class RolloutRecord(msgspec.Struct, kw_only=True):
    rollout: str
    fleet: str
    model: str
    version: int
    previous_version: int | None
    started: datetime
    #: "completed", "rolled_back", "aborted", or "running" (no final event yet).
    outcome: str = "running"
    #: Why it started (e.g. the drift event that triggered a recalibration) and why it ended.
    trigger: str = ""
    reason: str = ""
    ended: datetime | None = None
    #: The last stage reached (1-based) and its percentage.
    stage: int = 1
    percent: int = 0


async def rollout_history(
    js: JetStreamContext, fleet: str | None, *, url: str = "<nats>", timeout: float = 3.0
) -> list[RolloutRecord]:
    """Every rollout of ``fleet`` (all fleets when None) in the order they started. Raises
    ``NatsUnavailable`` when the stream cannot be read."""
    subject = rollout_subject(fleet) if fleet else ROLLOUT_ALL
    records: dict[str, RolloutRecord] = {}
    try:
        with nats_errors("stream", ROLLOUT_STREAM, url):
            info = await js.stream_info(ROLLOUT_STREAM)
    except NotFound:  # never provisioned: no rollout was ever started
        return []
    if not info.state.messages:
        return []

    def on_msg(msg: Msg) -> None:
        try:
            _apply(records, decode_json(msg.data, RolloutEvent))
        except msgspec.DecodeError as exc:
            log.warning("rollout_event_undecodable", subject=msg.subject, error=str(exc))

    await replay(js, ROLLOUT_STREAM, subject, on_msg, url=url, timeout=timeout)
    return sorted(records.values(), key=lambda r: (r.started, r.rollout))


def _apply(records: dict[str, RolloutRecord], e: RolloutEvent) -> None:
    r = records.get(e.rollout)
    if r is None:
        r = records[e.rollout] = RolloutRecord(
            rollout=e.rollout, fleet=e.fleet, model=e.model, version=e.version,
            previous_version=e.previous_version, started=e.time,
        )  # fmt: skip
    if e.state == RolloutEventState.STARTED:
        r.started, r.trigger = e.time, e.reason
    r.stage, r.percent = max(r.stage, e.stage + 1), max(r.percent, e.percent)
    if e.state in _END:
        r.outcome, r.ended = e.state, e.time
        r.reason = e.reason or r.reason
    elif e.state == RolloutEventState.GATE_FAILED and e.reason:
        r.reason = e.reason
