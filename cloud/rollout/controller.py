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

At fleet scale (issue 18) a step reads the rollout's header only and the parts it has not seen
(``RolloutStore.fill``); a stage's assignments are planned from the statuses in memory and
written a part at a time, ``PARALLEL`` at once, each part's completion recorded in the header
(``RolloutState.written``), so a controller killed mid-stage writes again at most the part it
was writing. Which nodes installed or failed is kept per rollout and updated only for nodes
whose status changed (``_Progress``). Events name at most ``EVENT_NODES`` nodes and carry the
count (``RolloutEvent.node_count``): a stage of 23,000 names would pass the stream's 256 KiB.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from slmops.cloud.registry import node_assignment
from slmops.cloud.rollout.assign import Assigner, variants_of
from slmops.cloud.rollout.cohort import cohort
from slmops.cloud.rollout.gates import GateResult, describe, evaluate, install_gate, quality_gate, verdict
from slmops.cloud.rollout.nodes import NodeView
from slmops.cloud.rollout.state import NodeEntry, PendingEvent, RolloutConflict, RolloutState, RolloutStore
from slmops.cloud.rollout.tracker import Tracker
from slmops.shared.errors import SlmopsError
from slmops.shared.messages import Assignment, NodeStatus, ReferenceProfile, RolloutEvent, TelemetryAggregate
from slmops.shared.vocabulary import RolloutEventState, RolloutStatus

__all__ = ["EVENT_NODES", "Publish", "RolloutController"]

log = structlog.get_logger(__name__)

#: ``await publish(fleet, event, msg_id)`` publishes one RolloutEvent with that Nats-Msg-Id.
Publish = Callable[[str, RolloutEvent, str], Awaitable[None]]

#: Gates whose failure is final only at the end of a stage's soak (judged on all of it).
_AT_SOAK_END = frozenset({"latency_p95"})

#: Aggregates kept per fleet so a rollout seen late (restart, or created by another process)
#: can replay what it missed. Bounded: 4096 windows ≈ 4 MB of aggregates.
_RECENT = 4096

#: Node names an event carries at most (the first, sorted); ``node_count`` says how many.
EVENT_NODES = 100


@dataclass(slots=True)
class _Progress:
    """Which of a rollout's nodes run its version and which failed, kept up to date from the
    statuses of nodes that reported since the last step (``dirty``), not re-derived per node."""

    id: str
    checked: set[str]
    installed: set[str]
    failed: dict[str, str]
    dirty: set[str]


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
        self._no_quality: dict[tuple[str, int], str] = {}
        #: Per fleet: the rollout as last read with its parts, and its install progress.
        self._full: dict[str, RolloutState] = {}
        self._progress: dict[str, _Progress] = {}
        #: Assignments planned but maybe not written yet, by rollout and node (lost at a
        #: restart: then planned again from the entry's variant).
        self._planned: dict[str, dict[str, Assignment]] = {}
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
        progress = self._progress.get(status.fleet)
        if progress is not None:
            progress.dirty.add(status.node)

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
        for header, revision in await self.store.all(parts=False):
            if self.fleets and header.fleet not in self.fleets:
                continue
            self._states[header.fleet] = header
            if header.phase == "done" and not header.pending:
                self._full.pop(header.fleet, None)
                self._progress.pop(header.fleet, None)
                continue
            state = header
            try:
                state, revision = await self.store.migrate(header, revision)
                state = await self.store.fill(state, self._full.get(state.fleet))
                self._full[state.fleet] = self._states[state.fleet] = state
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
        self._states[state.fleet] = self._full[state.fleet] = state
        if state.pending:
            for p in state.pending:
                await self._publish(state.fleet, p.event, f"{state.id}:{p.n}")
            state = msgspec.structs.replace(state, pending=[])
            revision = await self.store.put(state, revision)
            self._states[state.fleet] = self._full[state.fleet] = state
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
        if "nodes" in fields:  # the log line names as many as the event
            fields = {**fields, "nodes": event.nodes[:EVENT_NODES], "node_count": event.node_count}
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
                state, RolloutEventState.ABORTED, now, **_nodes(state.nodes), reason=state.reason
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
        planned = self._planned.setdefault(state.id, {})
        candidates = [n for n in live if n not in state.unfit]
        target = cohort(state.fleet, candidates, state.percent, already=state.nodes)
        fresh = sorted(target - state.nodes.keys())
        if fresh:
            # What to restore is read, and the variants chosen, before anything is written;
            # the new parts count once the header naming them is saved.
            priors = await self.assigner.priors(state, fresh)
            plan, unfit = await self.assigner.plan(state, {n: (live[n], None) for n in fresh})
            if unfit:
                state = await self.store.append(state, "u", unfit)
                by_reason: dict[str, list[str]] = collections.defaultdict(list)
                for node, why in sorted(unfit.items()):
                    by_reason[why].append(node)
                for why, nodes in sorted(by_reason.items()):
                    log.warning("rollout_node_unfit", fleet=state.fleet, rollout=state.id, reason=why)
                    state = self._event(
                        state, RolloutEventState.NODE_FAILED, now, **_nodes(nodes), reason=why
                    )
            entries = {
                n: NodeEntry(stage=state.stage, variant=a.variant, assigned_at=now, prior=priors.get(n))
                for n, a in plan.items()
            }
            state = await self.store.append(state, "n", entries)
            state, revision = await self._save(state, revision, now)
            planned.update(plan)
        # The parts not written yet, one at a time, each recorded done in the header: after
        # a restart only the part cut short is written again (idempotent).
        count = state.parts.get("n", 0)
        todo: dict[int, list[str]] = collections.defaultdict(list)
        if state.written < count:
            for node, entry in state.nodes.items():
                if entry.part >= state.written and node not in state.failures:
                    todo[entry.part].append(node)
        for part in range(state.written, count):
            again = {
                n: (self.nodes.status(state.fleet, n), state.nodes[n].variant)
                for n in todo[part]
                if n not in planned
            }
            replanned, refused = await self.assigner.plan(state, again) if again else ({}, {})
            for node, why in refused.items():  # its device changed since: the variant chosen then
                log.warning("rollout_replan_refused", fleet=state.fleet, node=node, reason=why)
                replanned[node] = node_assignment(
                    state.fleet, node, state.model, state.version, state.nodes[node].variant,
                    await self.assigner.variant_manifests(state.model, state.version), None,
                )  # fmt: skip
            await self.assigner.write(state, {n: planned.get(n) or replanned[n] for n in todo[part]})
            state, revision = await self._save(
                msgspec.structs.replace(state, written=part + 1), revision, now
            )
            for node in todo[part]:
                planned.pop(node, None)
        stage_nodes = [n for n, e in state.nodes.items() if e.stage == state.stage]
        state = msgspec.structs.replace(state, phase="installing", stage_started=now)
        state = self._event(state, RolloutEventState.STAGE_STARTED, now, **_nodes(stage_nodes))
        await self._save(state, revision, now)

    def _refresh(self, state: RolloutState) -> _Progress:
        """The rollout's install progress, brought up to date: nodes new to it and nodes that
        reported since the last step are judged again; the others keep their verdict."""
        p = self._progress.get(state.fleet)
        if p is None or p.id != state.id:
            p = self._progress[state.fleet] = _Progress(state.id, set(), set(), dict(state.failures), set())
        fresh = [n for n in state.nodes if n not in p.checked] if len(p.checked) != len(state.nodes) else []
        for node in [*fresh, *(p.dirty & state.nodes.keys())]:
            p.checked.add(node)
            if (
                node not in p.failed
                and (why := self.nodes.failure(state, node, state.nodes[node])) is not None
            ):
                p.failed[node] = why[:500]
            if self.nodes.is_installed(state, node):
                p.installed.add(node)
            else:
                p.installed.discard(node)
        p.dirty.clear()
        return p

    async def _reference(self, model: str, version: int | None) -> ReferenceProfile | None:
        if version is None:
            return None
        key = (model, version)
        if key not in self._refs:
            variants = await variants_of(self.assigner.registry, model, version)
            m = variants.get("fp32") or next(iter(variants.values()), None)
            self._refs[key] = None if m is None else m.reference
        return self._refs[key]

    async def _without_quality(self, state: RolloutState) -> str:
        """The version's variants without a quality set, comma-separated ("" when all have
        one). Read from the registry once per rollout."""
        key = (state.model, state.version)
        if key not in self._no_quality:
            variants = await variants_of(self.assigner.registry, state.model, state.version)
            self._no_quality[key] = ", ".join(
                sorted(v for v, m in variants.items() if m.generation is None or not m.generation.quality)
            )
        return self._no_quality[key]

    async def _judge(self, state: RolloutState, revision: int, now: float) -> None:
        progress = self._refresh(state)
        failures = progress.failed
        new = {n: why for n, why in failures.items() if n not in state.failures}
        if new:
            for node, why in sorted(new.items()):
                kind = (
                    RolloutEventState.NODE_ROLLBACK if "rolled back" in why else RolloutEventState.NODE_FAILED
                )
                state = self._event(state, kind, now, nodes=[node], node_count=1, reason=why)
            # A node that refused the version or left it on its own goes back to what it ran
            # before at once, even while the stage goes on: otherwise its assignment would
            # keep offering it a version it has already judged bad. Restored before the
            # failure is saved: a restart in between finds it again and restores again.
            await self.assigner.restore(state, sorted(new))
            state = await self.store.append(state, "f", new)
            state, revision = await self._save(state, revision, now)
        gates: list[GateResult] = [install_gate(state.config, len(state.nodes), len(failures))]
        if gates[0].outcome == "fail":
            await self._roll_back(state, revision, now, gates, "install failures over the limit")
            return
        if state.phase == "installing":
            installed = len(progress.installed - failures.keys())
            pending = len(state.nodes) - installed - len(failures)
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
        reporting = any(
            n not in state.nodes and self.nodes.is_live(state.fleet, n, now) for n in tracker.control.nodes
        )
        canary, controls, source = tracker.sides(state.config.min_samples, control_group=reporting)
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
        serving = self.nodes.installed(state) - set(failures)
        missing = await self._without_quality(state) if state.config.min_quality is not None else ""
        quality = quality_gate(state.config, self.nodes.quality(state, serving), missing)
        if quality is not None:
            gates.append(quality)
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
            state = self._event(state, RolloutEventState.COMPLETED, now, **_nodes(state.nodes))
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
        state = self._event(state, RolloutEventState.ROLLED_BACK, now, reason=reason, **_nodes(state.nodes))
        state, revision = await self._save(state, revision, now)
        await self._cleanup(state, revision, now)

    async def _cleanup(self, state: RolloutState, revision: int, now: float) -> None:
        if state.status == RolloutStatus.COMPLETED:
            await self.assigner.complete(state, self.nodes.statuses(state.fleet) or None)
        else:
            await self.assigner.restore(state, state.nodes)
        state = msgspec.structs.replace(state, phase="done")
        await self._save(state, revision, now)
        self._trackers.pop(state.fleet, None)
        self._progress.pop(state.fleet, None)
        self._planned.pop(state.id, None)
        log.info("rollout_finished", fleet=state.fleet, rollout=state.id, status=state.status)


def _nodes(nodes: Iterable[str]) -> dict[str, Any]:
    """An event's ``nodes`` (the first ``EVENT_NODES``, sorted) and ``node_count``."""
    ordered = sorted(nodes)
    return {"nodes": ordered[:EVENT_NODES], "node_count": len(ordered)}
