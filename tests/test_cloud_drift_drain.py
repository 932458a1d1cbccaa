"""A reconnect drain of buffered windows against the real cloud (issue 18): drift rounds are
keyed by window time, so a node draining old windows neither closes a round per window nor
makes fleet events flap, and every window is counted exactly once across a cloud restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import _cloud_util as cu
import anyio
import msgspec
import numpy as np
import pytest
from nats.js import JetStreamContext

from _nats import wait_until
from slmops.cloud.config import DriftConfig
from slmops.cloud.drift import DriftDetector
from slmops.cloud.drift.units import group_key
from slmops.cloud.service import CloudService
from slmops.shared.messages import TelemetryAggregate
from slmops.shared.server import EmbeddedServer

MODEL = cu.MODEL
#: Window-time rounds of the run (one-minute windows, ``seq`` minutes after ``T0``).
WINDOWS = 30
#: Windows every node sent before the drain nodes went offline.
ONLINE = 5


def _applied(svc: CloudService, fleet: str) -> int:
    return sum(n.aggregates for (f, _), n in svc.nodes.items() if f == fleet)


def _rounds(svc: CloudService, fleet: str) -> int:
    det = svc.detector
    assert det is not None
    return det.groups[group_key(fleet, MODEL)].rounds


@pytest.mark.anyio
async def test_a_drain_of_buffered_windows_folds_into_window_time_rounds_and_counts_each_once(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """Four live nodes send windows 1..30; three nodes go offline after window 5 and drain
    windows 6..30 back to back once the live nodes are at window 30, the cloud restarting
    in the middle of the drain; then every node sends windows 31 and 32. Stationary traffic.

    Rounds are keyed by window time: the drained windows are late (their rounds were
    evaluated) and go to node evidence only, so the rounds evaluated are bounded by the 32
    window times (before: each drained window closed a round of its own, ~110 rounds), no
    drift event opens, and every aggregate is counted exactly once."""
    rng = np.random.default_rng(18)
    await cu.put_manifest(js, cu.make_manifest())
    live = [f"{fleet}-live{i}" for i in range(4)]
    drain = [f"{fleet}-drain{i}" for i in range(3)]

    def window(node: str, seq: int) -> TelemetryAggregate:
        return cu.make_aggregate(fleet, node, seq, 300, rng)

    backlog = [window(node, seq) for node in drain for seq in range(ONLINE + 1, WINDOWS + 1)]
    sent: dict[str, int] = {}
    cfg = cu.cloud_config(nats_server.url, tmp_path, fleet)
    async with CloudService(cfg) as svc:
        await svc.wait_active(20)
        for seq in range(1, WINDOWS + 1):
            for node in live + (drain if seq <= ONLINE else []):
                agg = window(node, seq)
                sent[node] = sent.get(node, 0) + agg.count
                await cu.publish(js, agg)
        steady = len(live) * WINDOWS + len(drain) * ONLINE
        await wait_until(lambda: _applied(svc, fleet) == steady, 30, what="steady windows applied")
        for agg in backlog[: len(backlog) // 2]:  # the drain starts; the cloud stops midway
            sent[agg.node] += agg.count
            await cu.publish(js, agg)
        await wait_until(lambda: _applied(svc, fleet) >= steady + 20, 30, what="part of the drain applied")
    for agg in backlog[len(backlog) // 2 :]:
        sent[agg.node] += agg.count
        await cu.publish(js, agg)
    async with CloudService(cfg) as svc:
        await svc.wait_active(20)
        for seq in (WINDOWS + 1, WINDOWS + 2):
            for node in live + drain:
                agg = window(node, seq)
                sent[node] += agg.count
                await cu.publish(js, agg)
        total = (len(live) + len(drain)) * (WINDOWS + 2)
        await wait_until(lambda: _applied(svc, fleet) == total, 30, what="drain and live windows applied")
        await wait_until(lambda: svc.statistics().events_pending == 0, 10, what="events out")
        # Every window counted exactly once, across the restart.
        counted = {node: st.inferences for (f, node), st in svc.nodes.items() if f == fleet}
        assert counted == sent
        assert all(st.duplicates == 0 for (f, _), st in svc.nodes.items() if f == fleet)
        # Rounds follow window time, not arrivals: at most one per window time.
        assert _rounds(svc, fleet) <= WINDOWS + 2, _rounds(svc, fleet)
        # The drained windows reached node evidence: a node baseline takes 20 tested windows,
        # and these nodes sent 7 outside the drain.
        det = svc.detector
        assert det is not None
        gk = group_key(fleet, MODEL)
        for node in drain:
            unit = det.units[(gk, node)]
            assert "class_prior" in unit.refs, sorted(unit.refs)
    with anyio.fail_after(10):
        events = await cu.drift_events(js, fleet)
    assert [e.kind for e in events] == ["baseline"], [
        (e.kind, e.scope, e.node, e.signal, e.state) for e in events
    ]


def _detector() -> DriftDetector:
    det = DriftDetector(DriftConfig(calibration_windows=50_000), clock=lambda: datetime.now(UTC))
    det.add_group("f", MODEL, cu.make_manifest())
    return det


def test_a_node_drifting_while_offline_opens_one_node_event_and_no_fleet_event() -> None:
    """12 nodes; n0's traffic shifts while it is offline (windows 26..44, buffered) and it
    drains them once the others are at window 45. Its late windows go to its own evidence:
    one node event opens (once, not per window) and resolves on its normal windows after;
    no fleet event (before: each drained window closed a round pooling n0 alone, so the
    "fleet" drifted and a fleet event opened, then resolved when the fleet came back)."""
    rng = np.random.default_rng(5)
    det = _detector()
    nodes = [f"n{i}" for i in range(12)]
    shifted = [0.2, 0.3, 0.5]
    found: list[tuple[str, str | None, str, str]] = []

    def send(node: str, seq: int, prior: list[float] = cu.PRIOR) -> None:
        for e in det.observe(cu.make_aggregate("f", node, seq, 300, rng, prior=prior)):
            if e.kind == "drift":
                found.append((e.scope, e.node, e.signal, e.state))

    for seq in range(1, 56):
        for node in nodes:
            if node != "n0" or not 26 <= seq <= 44:
                send(node, seq)
        if seq == 45:  # n0 is back: its backlog drains behind the others' window 45
            for old in range(26, 45):
                send("n0", old, shifted)
    det.take_dirty()
    assert [f for f in found if f[0] == "fleet"] == [], found
    n0 = [(signal, state) for scope, node, signal, state in found if node == "n0"]
    assert ("class_prior", "opened") in n0, found
    for signal in {s for s, _ in n0}:
        states = [state for s, state in n0 if s == signal]
        assert states.count("opened") == 1, (signal, states)  # no flapping
    g = det.groups[group_key("f", MODEL)]
    assert g.rounds <= 55


def test_a_node_whose_clock_runs_ahead_does_not_make_the_fleet_late() -> None:
    """One node of 11 labels its windows 9 minutes ahead (inside the ingest's 10-minute
    clock-skew bound) and sends first: the frontier is the median window time, so every
    other node's windows still join the fleet rounds (all 11 pooled per round)."""
    rng = np.random.default_rng(6)
    det = _detector()
    ahead = timedelta(minutes=9)
    for seq in range(1, 31):
        a = cu.make_aggregate("f", "fast", seq, 300, rng)
        det.observe(
            msgspec.structs.replace(a, window_start=a.window_start + ahead, window_end=a.window_end + ahead)
        )
        for i in range(10):
            det.observe(cu.make_aggregate("f", f"n{i}", seq, 300, rng))
    det.take_dirty()
    rounds = det.take_rounds()
    assert len(rounds) == 29
    assert all(r.signals["class_prior"].windows == 11 for r in rounds), [
        r.signals["class_prior"].windows for r in rounds
    ]
    assert det.groups[group_key("f", MODEL)].late_nodes == []


def test_a_few_nodes_draining_while_the_fleet_is_silent_are_not_tested_as_the_fleet() -> None:
    """20 nodes of two kinds of traffic (the fleet is their mix) send 8 windows; then only
    n0 and n1 (one of each kind) come back and drain 30 newer windows each, one node's
    backlog after the other's. Their rounds hold one or two nodes: they are closed for the
    nodes' own tests but not tested as the fleet, so no fleet event opens on composition
    (before: the "fleet" of each round was n0 or n1 alone and fleet events opened)."""
    rng = np.random.default_rng(7)
    det = _detector()
    kinds = ([0.65, 0.2, 0.15], [0.35, 0.4, 0.25])
    found: list[tuple[str, str | None, str, str]] = []

    def send(i: int, seq: int) -> None:
        for e in det.observe(cu.make_aggregate("f", f"n{i}", seq, 300, rng, prior=kinds[i % 2])):
            found.append((e.kind, e.node, e.signal, e.state))

    for seq in range(1, 9):
        for i in range(20):
            send(i, seq)
    assert [f[0] for f in found] == ["baseline"], found  # the fleet's mix is its baseline
    for i in (0, 1):
        for seq in range(9, 39):
            send(i, seq)
    det.take_dirty()
    assert [f for f in found if f[0] == "drift" and f[1] is None] == [], found
    assert det.groups[group_key("f", MODEL)].rounds <= 38


def test_a_fast_clock_node_draining_its_backlog_does_not_make_the_fleet_late() -> None:
    """One node of 11 labels its windows 3 minutes ahead (inside the ingest's clock-skew
    bound), is offline for windows 31-41 and drains them behind the others' window 42. Each
    drained window closes a round holding that node alone; the frontier must not follow its
    clock past the cloud's (the detector's clock minus one window), or every honest window
    after is late for good (reviewer's reproduction: rounds pooled 1 window of 11 from then
    on, and that node alone opened fleet events once the quorum memory had passed)."""
    rng = np.random.default_rng(8)
    now = [cu.T0]
    det = DriftDetector(DriftConfig(calibration_windows=50_000), clock=lambda: now[0])
    det.add_group("f", MODEL, cu.make_manifest())
    ahead = timedelta(minutes=3)

    def fast(seq: int) -> None:
        a = cu.make_aggregate("f", "fast", seq, 300, rng)
        det.observe(
            msgspec.structs.replace(a, window_start=a.window_start + ahead, window_end=a.window_end + ahead)
        )

    for seq in range(1, 61):
        now[0] = cu.T0 + timedelta(minutes=seq + 1, seconds=5)  # window seq has just ended
        if not 31 <= seq <= 42:
            fast(seq)
        if seq == 42:
            for old in range(31, 43):
                fast(old)
        for i in range(10):
            det.observe(cu.make_aggregate("f", f"n{i}", seq, 300, rng))
    det.take_dirty()
    after = [r for r in det.take_rounds() if r.closed >= cu.T0 + timedelta(minutes=48)]
    assert len(after) >= 10, len(after)
    assert all(r.signals["class_prior"].windows == 11 for r in after), [
        r.signals["class_prior"].windows for r in after
    ]
    assert det.groups[group_key("f", MODEL)].late_nodes == []
