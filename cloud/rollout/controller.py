"""The rollout controller: a plain object fed node statuses and telemetry aggregates, and
stepped with the time. Each ``step(now)`` reads every rollout state from KV and moves each
active one on:

``assigning`` (write the stage's node assignments) → ``installing`` (until every stage node
runs the version, or ``install_timeout_s``) → ``soaking`` (``soak_s``, gates judged all along:
a failure rolls back at once, a pass counts after the soak) → next stage, or ``completed``.

Every transition is written (compare-and-set) before its side effects, and the effects are
idempotent, so a controller killed anywhere resumes correctly from KV; a second controller's
conflicting write is refused and it re-reads. Terminal states keep ``phase="cleanup"`` until
their assignment writes are done.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from slmops.cloud.rollout.assign import Assigner, DeviceUnfit, variants_of
from slmops.cloud.rollout.cohort import cohort
from slmops.cloud.rollout.gates import GateResult, describe, evaluate, install_gate, verdict
from slmops.cloud.rollout.nodes import NodeView
from slmops.cloud.rollout.state import NodeEntry, PendingEvent, RolloutConflict, RolloutState, RolloutStore
from slmops.cloud.rollout.tracker import Tracker
from slmops.shared.errors import SlmopsError
from slmops.shared.messages import NodeStatus, ReferenceProfile, RolloutEvent, TelemetryAggregate
from slmops.shared.vocabulary import RolloutEventState, RolloutStatus

__all__ = ["Publish", "RolloutController"]

log = structlog.get_logger(__name__)

#: ``await publish(fleet, event, msg_id)`` publishes one RolloutEvent with that Nats-Msg-Id.
Publish = Callable[[str, RolloutEvent, str], Awaitable[None]]

#: Gates whose failure is final only at the end of a stage's soak (judged on all of it).
_AT_SOAK_END = frozenset({"latency_p95"})

#: Aggregates kept per fleet so a rollout seen late (restart, or created by another process)
#: can replay what it missed. Bounded: 4096 windows ≈ 4 MB of aggregates.
_RECENT = 4096


@dataclass(frozen=True, slots=True)
class ControllerStatistics:
    """A snapshot of ``RolloutController.statistics()``."""

    steps: int
    conflicts: int
    errors: int
    rollouts_tracked: int
    nodes_known: int


class RolloutController:
    """See the module docstring. ``observe_*`` never block; ``step`` does the I/O."""

    def __init__(
        self,
        assigner: Assigner,
        store: RolloutStore,
        publish: Publish,
        *,
        node_ttl_s: float = 900.0,
        fleets: Sequence[str] = (),
    ) -> None:
        self.assigner = assigner
        #: Fleets whose rollouts this controller advances (empty: every fleet); an instance
        #: limited to some fleets (``slmops cloud --fleet``) leaves the others' alone.
        self.fleets = frozenset(fleets)
        self.store = store
        self._publish = publish
        self.node_ttl_s = node_ttl_s
        self.nodes = NodeView(node_ttl_s=node_ttl_s)
        self._recent: dict[str, collections.deque[TelemetryAggregate]] = {}
        self._trackers: dict[str, Tracker] = {}
        self._no_nodes_logged: set[str] = set()
        self._states: dict[str, RolloutState] = {}
        self._refs: dict[tuple[str, int], ReferenceProfile | None] = {}
        self.steps = self.conflicts = self.errors = 0

    def statistics(self) -> ControllerStatistics:
        return ControllerStatistics(
            steps=self.steps,
            conflicts=self.conflicts,
            errors=self.errors,
            rollouts_tracked=len(self._trackers),
            nodes_known=len(self.nodes),
        )

    # -- feeding ---------------------------------------------------------------------------

    def observe_status(self, status: NodeStatus, stored: float | None = None) -> None:
        """``stored``: the status message's JetStream timestamp (epoch seconds)."""
        self.nodes.observe(status, stored)

    def live_nodes(self, fleet: str, now: float) -> dict[str, NodeStatus]:
        """Nodes of ``fleet`` that reported within ``node_ttl_s`` and did not shut down."""
        return self.nodes.live(fleet, now)

    def wants(self, fleet: str) -> bool:
        """Whether aggregates of ``fleet`` matter now (it has an active rollout): the runner
        skips decoding the others."""
        state = self._states.get(fleet)
        return state is not None and (state.active or state.phase != "done")

    def observe_aggregate(self, agg: TelemetryAggregate) -> None:
        recent = self._recent.get(agg.fleet)
        if recent is None:
            recent = self._recent[agg.fleet] = collections.deque(maxlen=_RECENT)
        recent.append(agg)
        state = self._states.get(agg.fleet)
        if state is not None and state.active:
            tracker = self._tracker(state)
            tracker.add(state, agg)

    def load(self, states: list[RolloutState]) -> None:
        """Know these rollouts before the first step, so the telemetry replayed at a restart
        goes straight into their metrics (the recent-aggregate buffer is bounded)."""
        for state in states:
            if not self.fleets or state.fleet in self.fleets:
                self._states[state.fleet] = state

    def _tracker(self, state: RolloutState) -> Tracker:
        t = self._trackers.get(state.fleet)
        if t is None or t.id != state.id:
            t = self._trackers[state.fleet] = Tracker(state)
            for agg in self._recent.get(state.fleet, ()):
                t.add(state, agg)
        t.stage = state.stage
        return t

    # -- stepping --------------------------------------------------------------------------

    async def step(self, now: float | None = None) -> None:
        """Advance every rollout one step. Errors of one rollout are logged and retried at
        the next step; they never stop the others."""
        now = time.time() if now is None else now
        self.steps += 1
        for state, revision in await self.store.all():
            if self.fleets and state.fleet not in self.fleets:
                continue
            self._states[state.fleet] = state
            if state.phase == "done" and not state.pending:
                continue
            try:
                await self._advance(state, revision, now)
            except RolloutConflict:
                self.conflicts += 1
                log.info("rollout_conflict", fleet=state.fleet, rollout=state.id)
            except SlmopsError as exc:
                self.errors += 1
                log.warning("rollout_step_failed", fleet=state.fleet, rollout=state.id, error=str(exc))

    async def _save(self, state: RolloutState, revision: int, now: float) -> tuple[RolloutState, int]:
        state = msgspec.structs.replace(state, updated=now)
        revision = await self.store.put(state, revision)
        self._states[state.fleet] = state
        if state.pending:
            for p in state.pending:
                await self._publish(state.fleet, p.event, f"{state.id}:{p.n}")
            state = msgspec.structs.replace(state, pending=[])
            revision = await self.store.put(state, revision)
            self._states[state.fleet] = state
        return state, revision

    def _event(self, state: RolloutState, kind: str, now: float, **fields: Any) -> RolloutState:
        n = state.events + 1
        event = RolloutEvent(
            rollout=state.id,
            fleet=state.fleet,
            model=state.model,
            version=state.version,
            previous_version=state.previous_version,
            state=kind,
            stage=state.stage,
            percent=state.percent,
            time=datetime.fromtimestamp(now, UTC),
            **fields,
        )
        log.info("rollout_" + kind, fleet=state.fleet, rollout=state.id, stage=state.stage, **fields)
        return msgspec.structs.replace(
            state, events=n, pending=[*state.pending, PendingEvent(n=n, event=event)]
        )

    async def _advance(self, state: RolloutState, revision: int, now: float) -> None:
        if state.pending:  # a previous run persisted events it could not publish
            state, revision = await self._save(state, revision, now)
        if state.phase == "cleanup":
            await self._cleanup(state, revision, now)
            return
        if not state.active:
            return
        if state.events == 0:
            state = self._event(state, RolloutEventState.STARTED, now, reason=state.reason)
            state, revision = await self._save(state, revision, now)
        if state.command is not None:
            state, revision, stop = await self._command(state, revision, now)
            if stop:
                return
        if state.phase == "assigning":
            if state.status == RolloutStatus.PAUSED:
                return
            await self._assign(state, revision, now)
            return
        await self._judge(state, revision, now)

    async def _command(
        self, state: RolloutState, revision: int, now: float
    ) -> tuple[RolloutState, int, bool]:
        cmd = state.command
        state = msgspec.structs.replace(state, command=None)
        if cmd == "abort":
            state = msgspec.structs.replace(
                state, status=RolloutStatus.ABORTED, phase="cleanup", reason="aborted by operator"
            )
            state = self._event(
                state, RolloutEventState.ABORTED, now, nodes=sorted(state.nodes), reason=state.reason
            )
            state, revision = await self._save(state, revision, now)
            await self._cleanup(state, revision, now)
            return state, revision, True
        if cmd == "pause" and state.status == RolloutStatus.RUNNING:
            state = self._event(
                msgspec.structs.replace(state, status=RolloutStatus.PAUSED), RolloutEventState.PAUSED, now
            )
        elif cmd == "resume" and state.status == RolloutStatus.PAUSED:
            # A pause for missing samples restarts the sample clock when resumed.
            soak = now if state.phase == "soaking" else state.soak_started
            state = msgspec.structs.replace(state, status=RolloutStatus.RUNNING, soak_started=soak, reason="")
            state = self._event(state, RolloutEventState.RESUMED, now)
        state, revision = await self._save(state, revision, now)
        return state, revision, False

    async def _assign(self, state: RolloutState, revision: int, now: float) -> None:
        live = self.live_nodes(state.fleet, now)
        if not live:  # none known yet (or after a restart, not re-read yet): a stage needs them
            if state.id not in self._no_nodes_logged:  # said once, not once a step
                self._no_nodes_logged.add(state.id)
                log.warning(
                    "rollout_waiting_for_nodes", fleet=state.fleet, rollout=state.id, reason="no nodes"
                )
                if state.reason != "waiting: no nodes":
                    await self._save(
                        msgspec.structs.replace(state, reason="waiting: no nodes"), revision, now
                    )
            return
        candidates = {n: st for n, st in live.items() if n not in state.unfit}
        target = cohort(state.fleet, candidates, state.percent, already=state.nodes)
        fresh = sorted(target - set(state.nodes))
        nodes = dict(state.nodes)
        for node in fresh:  # read what to restore before anything is written
            prior = await self.assigner.current(state.fleet, node, _key_model(state))
            nodes[node] = NodeEntry(stage=state.stage, assigned_at=now, prior=prior)
        if fresh:
            state, revision = await self._save(msgspec.structs.replace(state, nodes=nodes), revision, now)
        # Every node of this stage is (re)assigned: idempotent, and covers a restart between
        # the write above and these assignments.
        unfit: dict[str, str] = {}
        for node, entry in sorted(state.nodes.items()):
            if entry.stage == state.stage and node not in state.failures:
                status = live.get(node)
                try:
                    variant = await self.assigner.assign_node(
                        state, node, None if status is None else status.device
                    )
                except DeviceUnfit as exc:  # the device-fit gate: left out, never assigned
                    unfit[node] = f"device fit: {exc.why}"
                    continue
                state.nodes[node] = msgspec.structs.replace(entry, variant=variant)
        for node, why in sorted(unfit.items()):
            log.warning("rollout_node_unfit", fleet=state.fleet, rollout=state.id, node=node, reason=why)
            state = self._event(state, RolloutEventState.NODE_FAILED, now, nodes=[node], reason=why)
        if unfit:
            nodes = {n: e for n, e in state.nodes.items() if n not in unfit}
            state = msgspec.structs.replace(state, nodes=nodes, unfit={**state.unfit, **unfit})
        stage_nodes = sorted(n for n, e in state.nodes.items() if e.stage == state.stage)
        state = msgspec.structs.replace(state, phase="installing", stage_started=now)
        state = self._event(state, RolloutEventState.STAGE_STARTED, now, nodes=stage_nodes)
        await self._save(state, revision, now)

    async def _reference(self, model: str, version: int | None) -> ReferenceProfile | None:
        if version is None:
            return None
        key = (model, version)
        if key not in self._refs:
            variants = await variants_of(self.assigner.registry, model, version)
            m = variants.get("fp32") or next(iter(variants.values()), None)
            self._refs[key] = None if m is None else m.reference
        return self._refs[key]

    async def _judge(self, state: RolloutState, revision: int, now: float) -> None:
        failures = self.nodes.failures(state)
        if failures != state.failures:
            for node in sorted(set(failures) - set(state.failures)):
                state = self._event(
                    state,
                    RolloutEventState.NODE_ROLLBACK
                    if "rolled back" in failures[node]
                    else RolloutEventState.NODE_FAILED,
                    now,
                    nodes=[node],
                    reason=failures[node],
                )
            state = msgspec.structs.replace(state, failures=failures)
            state, revision = await self._save(state, revision, now)
            # A node that refused the version or left it on its own goes back to what it ran
            # before at once, even while the stage goes on: otherwise its assignment would
            # keep offering it a version it has already judged bad.
            for node in sorted(failures):
                await self.assigner.restore_node(
                    state.fleet, node, state.nodes[node].prior, _key_model(state)
                )
        gates: list[GateResult] = [install_gate(state.config, len(state.nodes), len(failures))]
        if gates[0].outcome == "fail":
            await self._roll_back(state, revision, now, gates, "install failures over the limit")
            return
        if state.phase == "installing":
            installed = self.nodes.installed(state) - set(failures)
            pending = set(state.nodes) - installed - set(failures)
            timed_out = now - state.stage_started >= state.config.install_timeout_s
            if pending and not timed_out:
                return
            if not installed:
                await self._roll_back(state, revision, now, gates, "no node installed the version in time")
                return
            state = msgspec.structs.replace(state, phase="soaking", soak_started=now)
            state, revision = await self._save(state, revision, now)
        tracker = self._tracker(state)
        canary_ref = await self._reference(state.model, state.version)
        control_ref = await self._reference(state.model, state.previous_version)
        # A control group: nodes outside the rollout that sent telemetry since it started (an
        # offline one cannot be waited for), or same-period figures of the previous version
        # from earlier stages. Without either, the version's own reference judges.
        outside = set(self.live_nodes(state.fleet, now)) - set(state.nodes)
        reporting = outside & tracker.control.nodes
        canary, controls, source = tracker.sides(state.config.min_samples, control_group=bool(reporting))
        gates += evaluate(
            state.config,
            canary,
            controls,
            canary_ref=canary_ref,
            control_ref=control_ref,
            expect_control=bool(controls),
            before=tracker.before(state),
            source=source,
        )
        # No new nodes in this stage (a one-node fleet's 25% is the same node as its 5%): the
        # gates have judged; a soak would only wait.
        added = any(e.stage == state.stage for e in state.nodes.values())
        soaked = now - (state.soak_started or now)
        outcome = verdict(gates)
        failing = {g.name for g in gates if g.outcome == "fail"}
        if failing and failing <= _AT_SOAK_END and soaked < state.config.soak_s and added:
            # Latency is judged on the whole soak: its first seconds after an install are the
            # noisiest (and a burst of other work on a shared CPU passes); error rates and
            # accuracy are significance-tested and still roll back at once.
            outcome = "waiting"
        summary = {g.name: msgspec.structs.asdict(g) for g in gates}
        if outcome == "fail":
            failed = "; ".join(describe(g) for g in gates if g.outcome == "fail")
            await self._roll_back(state, revision, now, gates, f"gate failed: {failed}")
            return
        if outcome == "waiting":
            if soaked > state.config.sample_timeout_s and state.status == RolloutStatus.RUNNING:
                reason = f"too few samples after {soaked:.0f}s of soak; resume to wait longer, or abort"
                state = msgspec.structs.replace(
                    state, status=RolloutStatus.PAUSED, reason=reason, gates=summary
                )
                state = self._event(state, RolloutEventState.PAUSED, now, reason=reason, gates=summary)
                await self._save(state, revision, now)
            elif summary != state.gates:  # `rollout status` shows "waiting: 37/200 predictions"
                waiting = next(
                    (g.detail for g in gates if g.outcome == "waiting"),
                    f"waiting: the end of the soak to judge {', '.join(sorted(failing))}",
                )
                if state.status == RolloutStatus.RUNNING:
                    state = msgspec.structs.replace(state, reason=waiting)
                await self._save(msgspec.structs.replace(state, gates=summary), revision, now)
            return
        if (soaked < state.config.soak_s and added) or state.status == RolloutStatus.PAUSED:
            if state.reason.startswith("waiting") and state.status == RolloutStatus.RUNNING:
                await self._save(msgspec.structs.replace(state, reason="", gates=summary), revision, now)
            return
        state = self._event(
            msgspec.structs.replace(state, gates=summary), RolloutEventState.STAGE_PASSED, now, gates=summary
        )
        if state.stage + 1 >= len(state.config.stages):
            state = msgspec.structs.replace(state, status=RolloutStatus.COMPLETED, phase="cleanup")
            state = self._event(state, RolloutEventState.COMPLETED, now, nodes=sorted(state.nodes))
            state, revision = await self._save(state, revision, now)
            await self._cleanup(state, revision, now)
            return
        state = msgspec.structs.replace(state, stage=state.stage + 1, phase="assigning", soak_started=None)
        await self._save(state, revision, now)

    async def _roll_back(
        self, state: RolloutState, revision: int, now: float, gates: list[GateResult], reason: str
    ) -> None:
        summary = {g.name: msgspec.structs.asdict(g) for g in gates}
        state = msgspec.structs.replace(
            state, status=RolloutStatus.ROLLED_BACK, phase="cleanup", reason=reason, gates=summary
        )
        state = self._event(state, RolloutEventState.GATE_FAILED, now, reason=reason, gates=summary)
        state = self._event(
            state, RolloutEventState.ROLLED_BACK, now, reason=reason, nodes=sorted(state.nodes)
        )
        state, revision = await self._save(state, revision, now)
        await self._cleanup(state, revision, now)

    async def _cleanup(self, state: RolloutState, revision: int, now: float) -> None:
        if state.status == RolloutStatus.COMPLETED:
            await self.assigner.complete(state)
        else:
            for node, entry in sorted(state.nodes.items()):
                await self.assigner.restore_node(state.fleet, node, entry.prior, _key_model(state))
        state = msgspec.structs.replace(state, phase="done")
        await self._save(state, revision, now)
        self._trackers.pop(state.fleet, None)
        log.info("rollout_finished", fleet=state.fleet, rollout=state.id, status=state.status)


def _key_model(state: RolloutState) -> str | None:
    """The model whose per-model keys the rollout writes, or None for the legacy keys."""
    return state.model if state.side_by_side else None
