"""Staged fleet configuration: like a model rollout (``cloud.rollout``), by cohorts of a
stable node hash (``cloud.rollout.cohort``), each stage gated on its nodes reporting the
version *applied* — which a node says only after its own probation (it reached NATS with it
and its safety monitor did not trip; ``edge.fleetconfig``) — and their storage not degraded,
for ``soak_s``. A node of the stage that rejects the version or rolls it back halts the
rollout (the nodes that took it keep it; ``slmops fleet config rollback`` undoes it). The
state is KV ``<fleet>._rollout``; every step is audited as the cloud's own (``who`` "cloud").
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import TaskStatus
from nats.js import JetStreamContext

from slmops.cloud.audit.identity import Identity
from slmops.cloud.audit.record import new_record, record_audit
from slmops.cloud.fleetconfig.store import ConfigStore
from slmops.cloud.rollout.cohort import cohort
from slmops.shared import names
from slmops.shared.errors import JetStreamRefused, NatsUnavailable
from slmops.shared.kv import kv_get, kv_keys
from slmops.shared.vocabulary import ConfigRolloutStatus

__all__ = ["CLOUD", "ConfigRollout", "run_config_rollouts", "start_config_rollout", "step_rollout"]

log = structlog.get_logger(__name__)

#: The identity of the cloud's own automatic steps.
CLOUD = Identity("cloud")
#: Seconds between two looks at running rollouts.
INTERVAL_S = 2.0


class ConfigRollout(msgspec.Struct, kw_only=True):
    """One staged configuration rollout (KV ``<fleet>._rollout``)."""

    fleet: str
    version: int
    document: str
    #: Targeted nodes; empty = every node of the fleet (looked up at each step).
    nodes: list[str] = msgspec.field(default_factory=list)
    stages: list[int]
    soak_s: float = 0.0
    stage: int = 0
    #: Nodes whose key holds the version (every stage so far).
    written: list[str] = msgspec.field(default_factory=list)
    #: When every node of the current stage was first seen applied and healthy (epoch s).
    healthy_at: float | None = None
    status: ConfigRolloutStatus = ConfigRolloutStatus.RUNNING
    reason: str = ""


def _key(fleet: str) -> str:
    return f"{names.validate_id(fleet, 'fleet')}._rollout"


async def start_config_rollout(store: ConfigStore, state: ConfigRollout) -> list[str]:
    """Store ``state`` (replacing a finished or halted one) and run its first step; returns
    the first stage's nodes."""
    await store.kv.put(_key(state.fleet), msgspec.json.encode(state))
    await step_rollout(store, state)
    return list(state.written)


async def _audit(store: ConfigStore, state: ConfigRollout, action: str, target: str, **detail: Any) -> None:
    rec = new_record(
        CLOUD,
        action,
        state.fleet,
        target=target,
        detail={"version": state.version, "stage": state.stage + 1, "stages": state.stages, **detail},
        ok=action != "config.halted",
        reason=state.reason or None,
    )
    await record_audit(store.js, rec, url=store.url)


async def step_rollout(store: ConfigStore, state: ConfigRollout, now: float | None = None) -> ConfigRollout:
    """Advance one running rollout as far as its gates allow now, storing the new state."""
    if state.status != ConfigRolloutStatus.RUNNING:
        return state
    now = time.time() if now is None else now
    targets = state.nodes or await store.known_nodes(state.fleet)
    percent = state.stages[state.stage]
    members = sorted(cohort(state.fleet, targets, percent, already=state.written)) if targets else []
    new = [n for n in members if n not in state.written]
    raw = state.document.encode()
    if new:
        await store.write(state.fleet, raw, new)
        state.written = sorted({*state.written, *new})
        state.healthy_at = None
        await _audit(store, state, "config.stage", f"{percent}%: {', '.join(new)}")
    healthy = bool(members)
    for node in members:
        st = await store.last_status(state.fleet, node)
        if (
            st is not None
            and st.config_seen == state.version
            and st.config_state in ("rejected", "rolled_back")
        ):
            state.status = ConfigRolloutStatus.HALTED
            state.reason = f"{node}: {st.config_state}: {st.config_reason}"
            await _audit(store, state, "config.halted", node)
            break
        if (
            st is None
            or st.config_version != state.version
            or st.config_state != "applied"
            or st.storage == "degraded"
        ):
            healthy = False
    if state.status == ConfigRolloutStatus.RUNNING and healthy:
        state.healthy_at = state.healthy_at or now
        if now - state.healthy_at >= state.soak_s:
            state.stage += 1
            state.healthy_at = None
            if state.stage >= len(state.stages):
                state.stage = len(state.stages) - 1
                state.status = ConfigRolloutStatus.COMPLETED
                if not state.nodes:  # the whole fleet: nodes that join later get it too
                    await store.write(state.fleet, raw, None)
                await _audit(
                    store, state, "config.completed", "fleet" if not state.nodes else ", ".join(state.nodes)
                )
            else:
                await step_rollout(store, state, now)
                return state
    await store.kv.put(_key(state.fleet), msgspec.json.encode(state))
    return state


async def run_config_rollouts(
    js: JetStreamContext,
    *,
    fleets: list[str] | None = None,
    url: str = "<nats>",
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Step every running configuration rollout of ``fleets`` (None or empty: all) every
    ``INTERVAL_S`` until cancelled (the active cloud only). One rollout's failure is logged
    and does not stop the others."""
    store = ConfigStore(js, url=url)
    task_status.started()
    while True:
        try:
            if store.closed:
                await store.open()
            keys = await kv_keys(js, names.FLEETCONFIG_BUCKET, "*._rollout")
        except (NatsUnavailable, JetStreamRefused) as exc:
            log.warning("config_rollouts_unreadable", error=str(exc))
            keys = []
        for key in keys:
            if fleets and key.split(".", 1)[0] not in fleets:
                continue
            try:
                entry = await kv_get(store.kv, key, url)
                if entry is None or not entry.value:
                    continue
                state = msgspec.json.decode(entry.value, type=ConfigRollout)
                await step_rollout(store, state)
            except Exception as exc:  # one bad state must not stop the others
                log.error("config_rollout_step_failed", key=key, error=repr(exc))
        await anyio.sleep(INTERVAL_S)
