"""Rollout gates compare canary and control measured in the same period (both under the same
load), name both figures, wait visibly for samples, judge a fleet without a control group
against the version's own reference (and say so), do not soak stages that add no nodes, and
say "no nodes" once for a fleet that has none."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from _models import EDGES, make_bundle
from _rollout import start_and_step
from slmops.cloud.registry import Registry
from slmops.cloud.rollout import Assigner, RolloutConfig, RolloutController, RolloutStore, start_rollout
from slmops.cloud.rollout.gates import describe, evaluate, verdict
from slmops.cloud.rollout.state import NodeEntry, RolloutState
from slmops.cloud.rollout.tracker import Tracker
from slmops.shared.bundle import TrustStore
from slmops.shared.histogram import Histogram
from slmops.shared.messages import (
    DeviceProfile,
    ModelRef,
    NodeStatus,
    Privacy,
    RolloutEvent,
    TelemetryAggregate,
)

T0 = 1_900_000_000.0
CFG = RolloutConfig(min_samples=200)


def _agg(node: str, seq: int, version: int, t: float, *, lat: float, n: int = 100, model: str = "m",
         fleet: str = "f") -> TelemetryAggregate:  # fmt: skip
    return TelemetryAggregate(
        fleet=fleet,
        node=node,
        model=ModelRef(name=model, version=version),
        seq=seq,
        window_start=datetime.fromtimestamp(t, UTC),
        window_end=datetime.fromtimestamp(t + 10, UTC),
        count=n,
        class_counts={"alpha": n // 2, "beta": n - n // 2},
        confidence=Histogram.of(EDGES.confidence, [0.85] * n),
        input_length=Histogram.of(EDGES.input_length, [5] * n),
        latency_ms=Histogram.of(EDGES.latency_ms, [lat] * n),
        privacy=Privacy(k=1),
    )


def _state(**nodes: float) -> RolloutState:
    return RolloutState(
        id="r1", fleet="f", model="m", version=2, previous_version=1, created=T0, stage_started=T0,
        nodes={n: NodeEntry(stage=0, assigned_at=t) for n, t in nodes.items()},
    )  # fmt: skip


def _judge(tracker: Tracker, state: RolloutState) -> dict[str, object]:
    can, controls, source = tracker.sides(CFG.min_samples, control_group=True)
    out = evaluate(CFG, can, controls, canary_ref=None, control_ref=None, expect_control=True,
                   before=tracker.before(state), source=source)  # fmt: skip
    return {g.name: g for g in out}


def test_latency_is_compared_within_the_period_both_versions_served() -> None:
    """A quiet hour of control (3 ms) before the canary existed, then both versions under the
    same load (8 ms): the canary is judged against the control's 8 ms, not a mix with the
    quiet 3 ms, and passes; the verdict names both figures and the period."""
    state = _state(a=T0 + 600)
    t = Tracker(state)
    seq = 0
    for i in range(60):  # 10 minutes of quiet control on b and c
        seq += 1
        t.add(state, _agg("b", seq, 1, T0 + 10 * i, lat=3.0))
        t.add(state, _agg("c", seq, 1, T0 + 10 * i, lat=3.0))
    for i in range(60, 66):  # one minute under load: canary on a, control on b and c
        seq += 1
        t.add(state, _agg("a", seq, 2, T0 + 10 * i, lat=8.0))
        t.add(state, _agg("b", seq, 1, T0 + 10 * i, lat=8.0))
        t.add(state, _agg("c", seq, 1, T0 + 10 * i, lat=8.0))
    assert t.control.latency_p95 < 8.0  # over the whole rollout the quiet hour pulls it down
    gates = _judge(t, state)
    lat = gates["latency_p95"]
    assert lat.outcome == "pass", lat  # type: ignore[attr-defined]
    assert lat.canary == lat.control  # type: ignore[attr-defined]  # both from the loaded minute only
    text = describe(lat)  # type: ignore[arg-type]
    assert "canary 9.75 vs control 9.75" in text, text
    assert "same period" in text, text


def test_a_slower_version_fails_latency_naming_both_figures_unless_its_nodes_were_slow_before() -> None:
    state = _state(a=T0 + 60)
    t = Tracker(state)
    for i in range(6):  # a before its switch: as fast as the control
        t.add(state, _agg("a", i + 1, 1, T0 + 10 * i, lat=8.0))
    for i in range(6, 12):
        t.add(state, _agg("a", i + 1, 2, T0 + 10 * i, lat=40.0))  # the new version: 5x slower
        t.add(state, _agg("b", i + 1, 1, T0 + 10 * i, lat=8.0))
    lat = _judge(t, state)["latency_p95"]
    assert lat.outcome == "fail"  # type: ignore[attr-defined]
    text = describe(lat)  # type: ignore[arg-type]
    assert f"canary {lat.canary} vs control {lat.control}" in text, text  # type: ignore[attr-defined]

    # The same figures, but node a was just as slow on the old version: the node, not the version.
    state2 = _state(a=T0 + 60)
    t2 = Tracker(state2)
    for i in range(6):
        t2.add(state2, _agg("a", i + 1, 1, T0 + 10 * i, lat=40.0))
    for i in range(6, 12):
        t2.add(state2, _agg("a", i + 1, 2, T0 + 10 * i, lat=40.0))
        t2.add(state2, _agg("b", i + 1, 1, T0 + 10 * i, lat=8.0))
    lat2 = _judge(t2, state2)["latency_p95"]
    assert lat2.outcome == "pass", lat2  # type: ignore[attr-defined]
    assert "not the version" in lat2.detail  # type: ignore[attr-defined]


def test_a_slower_tail_alone_is_scheduling_not_the_version() -> None:
    """Measured on 2 cores at load 9: the same-speed versions' p95 were 20 and 10.8 ms in the
    same 6 s. The tail moved, the median did not: pass, saying why; a version whose median
    moves as much fails."""
    from slmops.cloud.rollout import Metrics

    def hist(*values_counts: tuple[float, int]) -> TelemetryAggregate:
        agg = _agg("x", 1, 2, T0, lat=0.1, n=sum(c for _, c in values_counts))
        return msgspec.structs.replace(
            agg, latency_ms=Histogram.of(EDGES.latency_ms, [v for v, c in values_counts for _ in range(c)])
        )

    def metrics(node: str, agg: TelemetryAggregate) -> Metrics:
        m = Metrics()
        m.add(msgspec.structs.replace(agg, node=node))
        return m

    control = metrics("b", hist((0.3, 180), (8.0, 20)))
    tail = metrics("a", hist((0.3, 180), (18.0, 20)))
    lat = {g.name: g for g in evaluate(CFG, tail, [control], canary_ref=None, control_ref=None)}[
        "latency_p95"
    ]
    assert lat.outcome == "pass"
    assert "only the tail moved" in lat.detail
    slow = metrics("a", hist((0.9, 180), (18.0, 20)))
    lat = {g.name: g for g in evaluate(CFG, slow, [control], canary_ref=None, control_ref=None)}[
        "latency_p95"
    ]
    assert lat.outcome == "fail"


def test_gates_wait_for_control_samples_in_the_same_period_and_say_how_many() -> None:
    state = _state(a=T0)
    t = Tracker(state)
    for i in range(3):
        t.add(state, _agg("a", i + 1, 2, T0 + 10 * i, lat=1.0))
    t.add(state, _agg("b", 1, 1, T0, lat=1.0, n=37))
    gates = _judge(t, state)
    assert verdict(list(gates.values())) == "waiting"  # type: ignore[arg-type]
    assert gates["error_rate"].detail == "waiting: control 37/200 predictions in the same period"  # type: ignore[attr-defined]
    can_only = evaluate(CFG, t.canary.__class__(), [], canary_ref=None, control_ref=None)
    assert can_only[0].detail == "waiting: 0/200 predictions"


# -- the controller, with real KV and an injected clock -----------------------------------------


class Events:
    def __init__(self) -> None:
        self.seen: list[RolloutEvent] = []

    async def __call__(self, fleet: str, event: RolloutEvent, msg_id: str) -> None:
        self.seen.append(event)

    @property
    def kinds(self) -> list[str]:
        return [e.state for e in self.seen]


async def _world(
    js: JetStreamContext, fleet: str, tmp: Path
) -> tuple[RolloutController, RolloutStore, Events, str]:
    key = Ed25519PrivateKey.generate()
    registry = Registry(js)
    model = f"per_{fleet}"
    for version in (1, 2):
        await registry.push(make_bundle(tmp / f"v{version}", key, version=version, name=model),
                            TrustStore([key.public_key()]))  # fmt: skip
    await registry.assign(fleet, 1, model=model)
    store, events = RolloutStore(js), Events()
    return RolloutController(Assigner(js, registry), store, events, fleets=[fleet]), store, events, model


def _status(fleet: str, node: str, t: float, model: str, version: int, event: str = "periodic") -> NodeStatus:
    return NodeStatus(fleet=fleet, node=node, time=datetime.fromtimestamp(t, UTC), event=event,
                      device=DeviceProfile(memory_mb=4096),
                      model=ModelRef(name=model, version=version))  # fmt: skip


@pytest.mark.anyio
async def test_a_one_node_fleet_is_judged_against_the_versions_own_reference_without_extra_soaks(
    js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """The tour's fleet: one node, stages 5,25,100. `rollout status` shows "waiting: 37/200
    predictions"; the gates say there is no control group; stages 2 and 3 add no node, so
    they pass without a soak of their own: the rollout completes in one soak."""
    controller, store, events, model = await _world(js, fleet, tmp_path)
    node = "till-1"
    controller.observe_status(_status(fleet, node, T0, model, 1))
    for i in range(3):  # the node's traffic on v1 just before the rollout
        controller.observe_aggregate(
            _agg(node, i + 1, 1, T0 - 40 + 10 * i, lat=1.0, model=model, fleet=fleet)
        )
    config = RolloutConfig(stages=[5, 25, 100], soak_s=120, min_samples=200)
    await start_rollout(js, controller.assigner.registry, store, fleet=fleet, version=2, model=model,
                        config=config, now=T0)  # fmt: skip
    await controller.step(T0 + 1)
    controller.observe_status(_status(fleet, node, T0 + 2, model, 2, "model_installed"))
    await controller.step(T0 + 3)
    controller.observe_aggregate(_agg(node, 4, 2, T0 + 3, lat=1.0, n=37, model=model, fleet=fleet))
    await controller.step(T0 + 13)
    got = await store.get(fleet)
    assert got is not None
    assert got[0].reason == "waiting: 37/200 predictions", got[0].reason
    for i in range(3):
        controller.observe_aggregate(
            _agg(node, 5 + i, 2, T0 + 13 + 10 * i, lat=1.0, model=model, fleet=fleet)
        )
    await controller.step(T0 + 60)  # enough samples, but the first stage soaks its full 120 s
    got = await store.get(fleet)
    assert got is not None
    assert (got[0].stage, got[0].reason) == (0, "")
    for step in range(8):
        await controller.step(T0 + 124 + step)
    got = await store.get(fleet)
    assert got is not None
    assert (got[0].status, got[0].phase) == ("completed", "done"), got[0]
    passed = [e for e in events.seen if e.state == "stage_passed"]
    assert [e.time.timestamp() < T0 + 135 for e in passed] == [True, True, True]
    gates = passed[0].gates
    assert "no control group" in str(gates["error_rate"]["detail"])  # type: ignore[index]
    assert "no control group" in str(gates["latency_p95"]["detail"])  # type: ignore[index]


@pytest.mark.anyio
async def test_a_rollout_to_a_fleet_without_nodes_says_no_nodes_once(
    js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    controller, store, _, model = await _world(js, fleet, tmp_path)
    await start_rollout(js, controller.assigner.registry, store, fleet=fleet, version=2, model=model,
                        config=RolloutConfig(), now=T0)  # fmt: skip
    with structlog.testing.capture_logs() as logs:
        for step in range(5):
            await controller.step(T0 + 1 + step)
    said = [e for e in logs if e["event"] == "rollout_waiting_for_nodes"]
    assert len(said) == 1
    assert said[0]["reason"] == "no nodes"
    got = await store.get(fleet)
    assert got is not None
    assert got[0].reason == "waiting: no nodes"


def test_without_a_reporting_control_group_the_canary_is_not_held_by_a_sliver_of_overlap() -> None:
    """The canary's own nodes ran the previous version until they switched: their last old
    windows overlap the canary's first, a sliver of "same period" with plenty of control
    samples and few canary ones. With no node outside still reporting (the only one is
    offline), the gates judge the whole canary against its reference instead of waiting for
    a period that cannot grow."""
    state = _state(a=T0 + 50)
    t = Tracker(state)
    for i in range(6):
        t.add(state, _agg("a", i + 1, 1, T0 + 10 * i, lat=1.0, n=300))  # a on v1, up to its switch
    for i in range(5, 20):
        t.add(state, _agg("a", 100 + i, 2, T0 + 10 * i, lat=1.0))  # a on v2 from T0+50
    can, controls, source = t.sides(CFG.min_samples, control_group=False)
    assert (can.count, controls, source) == (1500, [], "no control group")
    gates = evaluate(CFG, can, controls, canary_ref=None, control_ref=None, before=t.before(state))
    assert verdict(gates) == "pass"
    assert "no control group" in gates[0].detail
    # With a control group still reporting, the same sliver makes the gates wait for the period to fill.
    can, controls, _ = t.sides(CFG.min_samples, control_group=True)
    assert (
        verdict(evaluate(CFG, can, controls, canary_ref=None, control_ref=None, expect_control=True))
        == "waiting"
    )


def test_a_reinstalled_node_restarting_at_seq_1_is_counted_again_not_taken_for_a_duplicate() -> None:
    from slmops.cloud.rollout import Metrics

    m = Metrics()
    old = msgspec.structs.replace(_agg("a", 1, 2, T0, lat=1.0), install="a" * 32)
    new = msgspec.structs.replace(_agg("a", 1, 2, T0 + 10, lat=1.0), install="b" * 32)
    assert (m.add(old), m.add(old), m.add(new)) == (True, False, True)
    assert m.count == 200


@pytest.mark.anyio
async def test_latency_is_judged_on_the_whole_soak_while_errors_roll_back_at_once(
    js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    controller, store, events, model = await _world(js, fleet, tmp_path)
    for node in ("a", "b", "c", "d"):
        controller.observe_status(_status(fleet, node, T0, model, 1))
    config = RolloutConfig(stages=[25, 100], soak_s=60, min_samples=200)
    state = await start_and_step(js, controller, store, fleet=fleet, model=model, config=config, now=T0)
    (canary,) = state.nodes
    controls = sorted({"a", "b", "c", "d"} - {canary})
    controller.observe_status(_status(fleet, canary, T0 + 2, model, 2, "model_installed"))
    await controller.step(T0 + 3)
    for i in range(4):  # a slower version: p95 and median 10x the control's, same period
        t = T0 + 3 + 10 * i
        controller.observe_aggregate(_agg(canary, 10 + i, 2, t, lat=30.0, model=model, fleet=fleet))
        for node in controls:
            controller.observe_aggregate(_agg(node, 10 + i, 1, t, lat=3.0, model=model, fleet=fleet))
    await controller.step(T0 + 40)  # 37 s into a 60 s soak: not final yet
    got = await store.get(fleet)
    assert got is not None
    assert (got[0].status, got[0].reason) == ("running", "waiting: the end of the soak to judge latency_p95")
    await controller.step(T0 + 64)
    got = await store.get(fleet)
    assert got is not None
    assert got[0].status == "rolled_back"
    assert got[0].reason.startswith("gate failed: latency_p95 fail: canary 48.5 vs control 4.85 (limit 1.5)")
    assert events.kinds[-2:] == ["gate_failed", "rolled_back"]


@pytest.mark.anyio
async def test_rollout_history_lists_every_rollout_its_outcome_and_why(
    nats_server: object, js: JetStreamContext, fleet: str
) -> None:
    """Two rollouts of one fleet — an operator's that a gate rolled back, then the cloud's own
    recalibration rollout that completed — and one still running; an undecodable event is
    skipped. `slmops rollout history` (and its alias `list`) shows the same."""
    from click.testing import CliRunner

    from slmops.cli import main
    from slmops.cloud.rollout.history import rollout_history
    from slmops.shared.messages import encode_json
    from slmops.shared.names import rollout_subject

    def ev(rollout: str, state: str, t: float, version: int, **kw: object) -> RolloutEvent:
        return RolloutEvent(rollout=rollout, fleet=fleet, model="m", version=version,
                            previous_version=version - 1, state=state,
                            time=datetime.fromtimestamp(t, UTC), **kw)  # type: ignore[arg-type]  # fmt: skip

    why = "gate failed: error_rate fail: canary 0.2 vs control 0.01"
    events = [
        ev("r1", "started", T0, 2),
        ev("r1", "stage_started", T0 + 1, 2, percent=5),
        ev("r1", "gate_failed", T0 + 60, 2, percent=5, reason=why),
        ev("r1", "rolled_back", T0 + 60, 2, percent=5, reason=why),
        ev("r2", "started", T0 + 100, 3, reason="trigger=drift demo.fleet._.m.2.fp32.class_prior.1.opened"),
        ev("r2", "stage_passed", T0 + 160, 3, stage=1, percent=100),
        ev("r2", "completed", T0 + 160, 3, stage=1, percent=100),
        ev("r3", "started", T0 + 200, 4),
    ]  # fmt: skip
    for e in events[:4]:
        await js.publish(rollout_subject(fleet), encode_json(e))
    await js.publish(rollout_subject(fleet), b"{not json")
    for e in events[4:]:
        await js.publish(rollout_subject(fleet), encode_json(e))
    records = await rollout_history(js, fleet)
    assert [(r.rollout, r.outcome, r.version, r.stage) for r in records] == [
        ("r1", "rolled_back", 2, 1), ("r2", "completed", 3, 2), ("r3", "running", 4, 1)]  # fmt: skip
    assert records[0].reason.startswith("gate failed: error_rate fail: canary 0.2 vs control 0.01")
    assert records[1].trigger.startswith("trigger=drift")
    url = nats_server.url  # type: ignore[attr-defined]
    for name in ("history", "list"):
        result = await anyio.to_thread.run_sync(
            lambda n=name: CliRunner().invoke(main, ["rollout", n, "--nats", url, "--fleet", fleet])  # type: ignore[misc]
        )
        assert result.exit_code == 0, result.output
        lines = [line for line in result.output.splitlines() if not line.startswith("{")]  # not logs
        assert "rolled_back" in lines[0]
        assert "completed" in lines[2]
        assert "m v2 → v3" in lines[2]


def test_against_the_factory_reference_alone_a_slower_latency_is_reported_not_acted_on() -> None:
    """One node, no windows of it just before the switch: the only comparison is the latency
    the factory measured (another machine, one text at a time). A canary 3x slower there
    passes, saying the failure is advisory; with the node's own windows before the switch
    the same canary fails."""
    from slmops.shared.messages import ReferenceProfile

    ref = ReferenceProfile(
        count=1000, class_counts={"alpha": 500, "beta": 500},
        confidence=Histogram.of(EDGES.confidence, [0.85] * 1000),
        input_length=Histogram.of(EDGES.input_length, [5] * 1000),
        latency_ms=Histogram.of(EDGES.latency_ms, [10.0] * 1000),
    )  # fmt: skip
    state = _state(a=T0 + 60)
    t = Tracker(state)
    for i in range(6, 12):
        t.add(state, _agg("a", i + 1, 2, T0 + 10 * i, lat=30.0))
    can, controls, _ = t.sides(CFG.min_samples, control_group=False)
    gates = {g.name: g for g in evaluate(CFG, can, controls, canary_ref=ref, control_ref=None,
                                           before=t.before(state))}  # fmt: skip
    lat = gates["latency_p95"]
    assert lat.outcome == "pass"
    assert "advisory only" in lat.detail
    assert "the version's own reference" in lat.detail

    t2 = Tracker(state)
    for i in range(6):
        t2.add(state, _agg("a", i + 1, 1, T0 + 10 * i, lat=10.0))  # the node just before, at 10 ms
    for i in range(6, 12):
        t2.add(state, _agg("a", i + 1, 2, T0 + 10 * i, lat=30.0))
    can2, controls2, _ = t2.sides(CFG.min_samples, control_group=False)
    gates2 = {g.name: g for g in evaluate(CFG, can2, controls2, canary_ref=ref, control_ref=None,
                                            before=t2.before(state))}  # fmt: skip
    assert gates2["latency_p95"].outcome == "fail"
