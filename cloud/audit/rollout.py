"""The ``rollout.start|pause|resume|abort`` actions of the change service: a staged rollout
started, or an operator's command recorded for the controller (``cloud.rollout``), by the
active cloud, so each is audited with the requester's identity."""

from __future__ import annotations

from typing import Any

import msgspec
from nats.js import JetStreamContext

from slmops.cloud.config import RolloutConfig
from slmops.cloud.registry import Registry
from slmops.cloud.rollout import RolloutState, RolloutStore, start_rollout
from slmops.shared.audit import ChangeReply, ChangeRequest

__all__ = ["ROLLOUT_ACTIONS", "StartParams", "rollout_change", "rollout_summary"]

ROLLOUT_ACTIONS = ("rollout.start", "rollout.pause", "rollout.resume", "rollout.abort")


class StartParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: int
    model: str | None = None
    #: ``RolloutConfig``'s fields (stages, soak_s, max_failures, min_samples, install_timeout_s).
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    side_by_side: bool | None = None


def rollout_summary(state: RolloutState) -> dict[str, Any]:
    """What the reply and the audit record say about a rollout."""
    return {
        "id": state.id,
        "model": state.model,
        "version": state.version,
        "previous_version": state.previous_version,
        "side_by_side": state.side_by_side,
        "stages": list(state.config.stages),
        "soak_s": state.config.soak_s,
        "command": state.command,
    }


async def rollout_change(
    req: ChangeRequest, js: JetStreamContext, url: str
) -> tuple[ChangeReply, str, dict[str, object]]:
    """Do a ``rollout.*`` request: the reply (``rollout_summary`` as its result), the audit
    target and detail. Raises ``ValueError`` (bad parameters) or ``RolloutError`` (another
    rollout active, unknown version, no rollout to command)."""
    store = RolloutStore(js, url=url)
    if req.action == "rollout.start":
        try:
            p = msgspec.convert(req.params, StartParams)
            config = msgspec.convert(p.config, RolloutConfig)
        except msgspec.ValidationError as exc:
            raise ValueError(f"rollout.start: {exc}") from exc
        state = await start_rollout(
            js, Registry(js, url=url), store, fleet=req.fleet, version=p.version, model=p.model,
            config=config, side_by_side=p.side_by_side,
        )  # fmt: skip
    else:
        if req.params:
            raise ValueError(f"{req.action} takes no parameters, got {sorted(req.params)}")
        state = await store.command(req.fleet, req.action.removeprefix("rollout."))  # type: ignore[arg-type]
    summary = rollout_summary(state)
    return ChangeReply(ok=True, version=state.version, result=summary), f"rollout {state.id}", summary
