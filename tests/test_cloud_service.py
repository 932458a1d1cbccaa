"""The cloud service against a real nats-server and real SQLite: counting, drift events,
dead-lettering, restarts and a second instance."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
from _cloud_util import (
    PRIOR,
    T0,
    cloud_config,
    drift_events,
    make_aggregate,
    make_manifest,
    publish,
    put_manifest,
)
from anyio.abc import TaskStatus
from click.testing import CliRunner
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError

from _nats import wait_until
from slmops.cli import main
from slmops.cloud.ingest.snapshot import FLEET_BUCKET, NodeSnapshot
from slmops.cloud.service import CloudService
from slmops.shared.messages import DeviceProfile, ModelRef, NodeStatus, encode_json, encode_telemetry
from slmops.shared.names import (
    DEADLETTER_STREAM,
    DEADLETTER_SUBJECT,
    msg_id,
    status_subject,
    telemetry_subject,
)
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

NODES = ["n1", "n2", "n3", "n4"]

# Node ids are made unique per test (``<fleet>-n1``) as well, though the ``Nats-Msg-Id`` of
# ``_cloud_util.publish`` (``<fleet>/<node>:<seq>``, as the edge sends it) already keeps two
# fleets' equal node ids apart in the stream's duplicate window.


def _nodes(fleet: str) -> list[str]:
    return [f"{fleet}-{n}" for n in NODES]


async def _serve(svc: CloudService, stop: anyio.Event, *, task_status: TaskStatus[None]) -> None:
    async with svc:
        task_status.started()
        await stop.wait()


def _applied(svc: CloudService, fleet: str) -> int:
    return sum(n.aggregates for (f, _), n in svc.nodes.items() if f == fleet)


def _inferences(svc: CloudService, fleet: str) -> int:
    return sum(n.inferences for (f, _), n in svc.nodes.items() if f == fleet)


async def test_stationary_then_shift_opens_one_fleet_event_and_resolves_when_traffic_returns(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """Stationary traffic opens nothing; a fleet-wide class-prior shift opens one fleet
    event (with estimated priors near the truth), which resolves once traffic returns."""
    rng = np.random.default_rng(1)
    await put_manifest(js, make_manifest())
    shifted = [0.3, 0.3, 0.4]
    plan = [PRIOR] * 10 + [shifted] * 6 + [PRIOR] * 10
    sent = 0
    async with CloudService(cloud_config(nats_server.url, tmp_path, fleet)) as svc:
        await svc.wait_active(20)
        for seq, prior in enumerate(plan, start=1):
            for node in _nodes(fleet):
                agg = make_aggregate(fleet, node, seq, 300, rng, prior=prior)
                sent += agg.count
                await publish(js, agg)
            if seq == 10:
                await wait_until(lambda: _applied(svc, fleet) == 40, 20, what="stationary part applied")
                await wait_until(lambda: svc.statistics().events_published == 1, 10, what="baseline out")
                assert [e.kind for e in await drift_events(js, fleet)] == ["baseline"]
        await wait_until(lambda: _applied(svc, fleet) == len(plan) * 4, 30, what="all applied")
        await wait_until(lambda: svc.statistics().events_pending == 0, 10, what="events out")
        assert _inferences(svc, fleet) == sent
    events = await drift_events(js, fleet)
    prior_events = [(e.scope, e.state) for e in events if e.signal == "class_prior"]
    assert prior_events == [("fleet", "opened"), ("fleet", "resolved")], events
    opened = next(e for e in events if e.state == "opened" and e.kind == "drift")
    assert opened.reference == "baseline:auto-1"  # the first 5 rounds, which match the manifest
    assert [e.kind for e in events].count("skew") == 0
    assert opened.estimated_priors is not None
    l1 = sum(
        abs(opened.estimated_priors[k] - p) for k, p in zip(["alpha", "beta", "gamma"], shifted, strict=True)
    )
    assert l1 < 0.1, opened.estimated_priors
    assert opened.window_start.minute >= 11  # the run starts at the shift, not before


async def test_duplicated_reordered_and_late_aggregates_count_once_and_gaps_are_reported(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """Seqs 1,2,2,5,4 then 3 late: each counted once; the hole at 3 is reported until 3
    arrives; a re-sent duplicate outside JetStream's duplicate window (new msg id) is dropped."""
    rng = np.random.default_rng(2)
    n1 = f"{fleet}-n1"
    aggs = {s: make_aggregate(fleet, n1, s, 100 + s, rng) for s in range(1, 6)}
    async with CloudService(cloud_config(nats_server.url, tmp_path, fleet)) as svc:
        await svc.wait_active(20)
        for s in (1, 2, 2, 5, 4):
            await publish(js, aggs[s])
        # Same seq under another Nats-Msg-Id: JetStream stores it, the cloud must drop it.
        await js.publish(
            telemetry_subject(fleet, n1),
            encode_telemetry(aggs[2]),
            headers={"Nats-Msg-Id": f"{fleet}-other-id"},
        )
        await wait_until(lambda: svc.statistics().counters.get("duplicates", 0) >= 1, 20, what="dup")
        node = svc.nodes[(fleet, n1)]
        assert node.aggregates == 4
        assert node.epochs[""].seqs.missing == 1
        assert node.epochs[""].seqs.missing_ranges() == [(3, 3)]
        assert node.epochs[""].seqs.gaps_opened == 1
        await publish(js, aggs[3])
        await wait_until(lambda: svc.nodes[(fleet, n1)].aggregates == 5, 20, what="late applied")
        node = svc.nodes[(fleet, n1)]
        assert node.inferences == sum(a.count for a in aggs.values())
        assert node.late == 2  # 4 (below 5) and 3
        assert node.epochs[""].seqs.missing == 0
        assert node.epochs[""].seqs.high == 5
        kv = await js.key_value(FLEET_BUCKET)

        async def snapshot_done() -> bool:
            try:
                entry = await kv.get(f"{fleet}.{n1}")
            except KeyNotFoundError:
                return False
            snap = msgspec.json.decode(entry.value or b"{}", type=NodeSnapshot)
            return snap.aggregates == 5 and snap.missing_seqs == 0

        await wait_until(snapshot_done, 10, what="fleet snapshot written")


async def test_malformed_messages_are_deadlettered_and_the_service_keeps_going(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """Garbage, a wrong field type and an aggregate on another node's subject go to the
    dead-letter subject with a reason header; good aggregates around them are counted."""
    rng = np.random.default_rng(3)
    n1, n2 = f"{fleet}-n1", f"{fleet}-n2"
    good = [make_aggregate(fleet, n1, s, 100, rng) for s in (1, 2)]
    wrong_type = msgspec.msgpack.encode({**msgspec.to_builtins(good[0]), "seq": "one"})
    wrong_node = make_aggregate(fleet, n2, 1, 100, rng)
    dl = await js.subscribe(
        DEADLETTER_SUBJECT, stream=DEADLETTER_STREAM, ordered_consumer=True, deliver_policy=None
    )
    async with CloudService(cloud_config(nats_server.url, tmp_path, fleet)) as svc:
        await svc.wait_active(20)
        await publish(js, good[0])
        await js.publish(
            telemetry_subject(fleet, n1), b"\xc1 not msgpack", headers={"Nats-Msg-Id": f"{fleet}-x1"}
        )
        await js.publish(telemetry_subject(fleet, n1), wrong_type, headers={"Nats-Msg-Id": f"{fleet}-x2"})
        await js.publish(
            telemetry_subject(fleet, n1), encode_telemetry(wrong_node), headers={"Nats-Msg-Id": f"{fleet}-x3"}
        )
        await publish(js, good[1])
        await wait_until(lambda: _applied(svc, fleet) == 2, 20, what="good ones applied")
        await wait_until(lambda: svc.statistics().counters.get("deadlettered", 0) == 3, 20, what="3 dead")
    reasons: dict[str, tuple[str, str]] = {}
    with anyio.fail_after(10):
        while len(reasons) < 3:
            msg = await dl.next_msg(timeout=5)
            if msg.headers and msg.headers.get("Slmops-Subject") == telemetry_subject(fleet, n1):
                reasons[msg.headers["Slmops-Stream-Seq"]] = (
                    msg.headers["Slmops-Kind"],
                    msg.headers["Slmops-Reason"],
                )
    await dl.unsubscribe()
    kinds = sorted(k for k, _ in reasons.values())
    assert kinds == ["invalid", "invalid", "undecodable"]
    assert any("$.seq" in r for _, r in reasons.values())  # msgspec's path of the bad field
    assert any(n2 in r for _, r in reasons.values())


async def test_restart_mid_stream_loses_no_window_and_counts_none_twice(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """The service is stopped while aggregates keep arriving, then restarted on the same
    state: every aggregate is counted exactly once."""
    rng = np.random.default_rng(4)
    await put_manifest(js, make_manifest())
    aggs = [make_aggregate(fleet, node, s, 150, rng) for s in range(1, 31) for node in _nodes(fleet)]
    cfg = cloud_config(nats_server.url, tmp_path, fleet)
    async with CloudService(cfg) as svc:
        await svc.wait_active(20)
        for agg in aggs[:60]:
            await publish(js, agg)
        await wait_until(lambda: _applied(svc, fleet) >= 20, 20, what="some applied")
    # Stopped mid-stream: the rest arrives while no cloud runs, plus re-sends of old ones.
    for agg in aggs[60:]:
        await publish(js, agg)
    for agg in aggs[:10]:
        await js.publish(
            telemetry_subject(fleet, agg.node),
            encode_telemetry(agg),
            headers={"Nats-Msg-Id": msg_id(agg.node, agg.seq) + "r"},
        )
    async with CloudService(cfg) as svc:
        await svc.wait_active(20)
        await wait_until(lambda: _applied(svc, fleet) == len(aggs), 30, what="all applied after restart")
        await wait_until(lambda: svc.statistics().counters.get("duplicates", 0) >= 10, 10, what="dups seen")
        assert _inferences(svc, fleet) == sum(a.count for a in aggs)
        assert all(
            n.epochs[""].seqs.missing == 0 and n.epochs[""].seqs.high == 30 for n in svc.nodes.values()
        )


async def test_a_second_instance_stands_by_and_takes_over_without_double_counting(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """Two instances on one NATS: only the lease holder consumes and publishes events; when
    it stops, the standby takes over from the shared state and counts on exactly."""
    rng = np.random.default_rng(5)
    await put_manifest(js, make_manifest())
    shifted = [0.2, 0.3, 0.5]
    aggs = [
        make_aggregate(fleet, node, s, 200, rng, prior=PRIOR if s <= 8 else shifted)
        for s in range(1, 21)
        for node in NODES
    ]
    cfg = cloud_config(nats_server.url, tmp_path, fleet)
    a = CloudService(cfg, holder="a")
    b = CloudService(cfg, holder="b")
    stop_a, stop_b = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        # Each instance in a task of its own, as two processes would be.
        await tg.start(_serve, a, stop_a)
        await a.wait_active(20)
        await tg.start(_serve, b, stop_b)  # b starts after a holds the lease: b stands by
        for agg in aggs[:48]:
            await publish(js, agg)
        await wait_until(lambda: _applied(a, fleet) == 48, 20, what="first part applied by a")
        assert not b.active
        assert b.statistics().messages == 0
        stop_a.set()
        await b.wait_active(20)
        for agg in aggs[48:]:
            await publish(js, agg)
        await wait_until(lambda: _applied(b, fleet) == len(aggs), 30, what="rest applied by b")
        assert _inferences(b, fleet) == sum(x.count for x in aggs)
        await wait_until(lambda: b.statistics().events_pending == 0, 10, what="events out")
        stop_b.set()
    events = await drift_events(js, fleet)
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids))
    assert [(e.scope, e.state) for e in events if e.signal == "class_prior"] == [("fleet", "opened")], [
        (e.id, e.summary) for e in events
    ]


async def test_without_a_manifest_windows_are_counted_not_drift_tested_and_reported_unregistered(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """No manifest in KV (a node serving a local ``--model PATH``): every aggregate is
    counted, none is drift-tested (issue 13's precise terms; this test used to expect drift
    events against the first windows, the path where ~40 one-class aggregates of such a
    model stopped the service), the node shows "unregistered model" and one ``OpsEvent``
    says so."""
    from test_cloud_poison import ops_events

    rng = np.random.default_rng(6)
    model = ModelRef(name=f"nomanifest-{fleet}", version=3)
    async with CloudService(cloud_config(nats_server.url, tmp_path, fleet, warmup_rounds=4)) as svc:
        await svc.wait_active(20)
        for seq in range(1, 17):
            prior = PRIOR if seq <= 8 else [0.2, 0.3, 0.5]
            for node in _nodes(fleet):
                await publish(js, make_aggregate(fleet, node, seq, 300, rng, prior=prior, model=model))
        await wait_until(lambda: _applied(svc, fleet) == 64, 20, what="all applied")
        await wait_until(lambda: svc.statistics().events_published >= 1, 10, what="event out")
        nodes = [n for (f, _), n in svc.nodes.items() if f == fleet]
        assert svc.detector is not None
        assert not any(k.startswith(f"{fleet}/") for k in svc.detector.groups)
    assert await drift_events(js, fleet) == []
    assert all(n.model_registered is False and n.unregistered == 16 for n in nodes)
    assert sum(n.inferences for n in nodes) == 64 * 300
    assert [(e.kind, e.model) for e in await ops_events(js, fleet)] == [("unregistered_model", model)]


async def test_an_analyst_baseline_is_the_pooled_rounds_of_a_period_and_named_by_later_events(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """Rounds 1-10 at the reference, 11-20 shifted (a fleet event opens). ``slmops drift
    baseline --from <round 12> --to <round 18>`` (the real command, against the running
    service) publishes a baseline event for that period, resolves the open event, and a
    further shift later opens an event whose reference is that baseline."""
    rng = np.random.default_rng(8)
    await put_manifest(js, make_manifest())
    shifted, further = [0.3, 0.3, 0.4], [0.1, 0.3, 0.6]
    async with CloudService(cloud_config(nats_server.url, tmp_path, fleet)) as svc:
        await svc.wait_active(20)
        for seq in range(1, 21):
            for node in _nodes(fleet):
                await publish(
                    js, make_aggregate(fleet, node, seq, 300, rng, prior=PRIOR if seq <= 10 else shifted)
                )
        await wait_until(lambda: _applied(svc, fleet) == 80, 30, what="first part applied")
        start, end = T0 + timedelta(minutes=12), T0 + timedelta(minutes=19)
        cmd = [
            "baseline",
            "--fleet",
            fleet,
            "--model",
            "kw",
            "--from",
            start.isoformat(),
            "--to",
            end.isoformat(),
        ]
        # In process: the command's work is under test (a subprocess paid ~3-5 s of start-up).
        result = await anyio.to_thread.run_sync(
            lambda: CliRunner().invoke(
                main, ["--log-level", "warning", "drift", *cmd, "--nats", nats_server.url]
            )
        )
        assert result.exit_code == 0, result.stderr
        assert "baseline:analyst-2" in result.stdout
        for seq in range(21, 31):
            for node in _nodes(fleet):
                await publish(js, make_aggregate(fleet, node, seq, 300, rng, prior=further))
        await wait_until(lambda: _applied(svc, fleet) == 120, 30, what="all applied")

        async def reopened() -> bool:
            events = await drift_events(js, fleet)
            return any(e.state == "opened" and e.reference.endswith("analyst-2") for e in events)

        await wait_until(reopened, 20, what="an event against the analyst's baseline")
        bad = await anyio.to_thread.run_sync(
            lambda: CliRunner().invoke(
                main, ["drift", "baseline", "--fleet", fleet, "--model", "nope", "--nats", nats_server.url]
            )
        )
        assert bad.exit_code == 1
        assert "no traffic of nope" in bad.stderr
    events = await drift_events(js, fleet)
    fleet_prior = [
        (e.kind, e.state, e.reference)
        for e in events
        if e.scope == "fleet" and e.signal in ("class_prior", "baseline")
    ]
    assert fleet_prior == [
        ("baseline", "opened", "baseline:auto-1"),
        ("drift", "opened", "baseline:auto-1"),
        ("baseline", "opened", "baseline:analyst-2"),
        ("drift", "resolved", "baseline:analyst-2"),
        ("drift", "opened", "baseline:analyst-2"),
    ], fleet_prior
    analyst = next(e for e in events if e.reference == "baseline:analyst-2" and e.kind == "baseline")
    assert (analyst.reference_start, analyst.reference_end) == (start, end)
    assert analyst.windows == 7 * 4  # the rounds of seqs 12..18 lie wholly in the period
    last = events[-1]
    assert (last.reference_start, last.reference_end) == (start, end)
    assert last.estimated_priors is not None
    assert last.estimated_priors["gamma"] > 0.5


async def test_status_reports_fill_the_fleet_state_and_an_older_one_does_not_roll_it_back(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """Outbox depth, drops, device and model come from NodeStatus; reports are ordered by
    their server (JetStream) time, never the node's clock (issue 13 fault 6: this test used to
    expect the opposite), so one stored earlier and applied later (a redelivery) is ignored;
    an undecodable report is dead-lettered."""
    node = f"{fleet}-n1"
    t1 = datetime(2026, 1, 1, 12, tzinfo=UTC)
    newer = NodeStatus(
        fleet=fleet,
        node=node,
        time=t1,
        device=DeviceProfile(arch="aarch64", cores=4, memory_mb=2048, profile="gateway-small"),
        model=ModelRef(name="kw", version=2, variant="int8"),
        outbox_depth=7,
        dropped_inferences=3,
        dropped_aggregates=1,
        served=1234,
        key_list_version=3,
        config_version=4,
        config_seen=5,
        config_state="rejected",
        config_reason="window: 0 is below 1",
    )
    older = msgspec.structs.replace(newer, time=t1 - timedelta(minutes=5), outbox_depth=99)
    async with CloudService(cloud_config(nats_server.url, tmp_path, fleet)) as svc:
        await svc.wait_active(20)
        await js.publish(status_subject(fleet, node), encode_json(newer))
        await js.publish(status_subject(fleet, node), encode_json(older))
        await js.publish(status_subject(fleet, node), b"{not json")
        await wait_until(lambda: svc.statistics().counters.get("statuses", 0) >= 2, 20, what="statuses")
        await wait_until(lambda: svc.statistics().counters.get("deadlettered", 0) >= 1, 20, what="dead")
        state = svc.nodes[(fleet, node)]
        # Stored last, so it is the latest, whatever the node's clock said.
        assert (state.outbox_depth, state.served, state.status_dropped_inferences) == (99, 1234, 3)
        assert state.status_time == older.time
        assert state.clock_skew_s is not None
        assert state.status_stored is not None
        applier = svc._applier  # replaying a redelivery of the first report
        assert applier is not None
        await applier.apply_statuses([newer], [state.status_stored - timedelta(seconds=1)])
        state = svc.nodes[(fleet, node)]
        assert state.outbox_depth == 99
        assert state.device is not None
        assert state.device.profile == "gateway-small"
        assert state.model == ModelRef(name="kw", version=2, variant="int8")
        assert state.status_time == older.time
        # fleet status --json shows the key list and configuration each node reports.
        status = ["fleet", "status", "--nats", nats_server.url, "--fleet", fleet, "--json"]
        found: list[dict[str, Any]] = []

        async def shown() -> bool:  # "no such fleet" before the first snapshot: not yet
            result = await anyio.to_thread.run_sync(lambda: CliRunner().invoke(main, status))
            docs = json.loads(result.output)["nodes"] if result.exit_code == 0 else []
            found[:] = [d for d in docs if d["node"] == node and d["config_state"]]
            return bool(found)

        await wait_until(shown, 20, what="the snapshot in fleet status --json")
        doc = found[0]
        assert (doc["key_list_version"], doc["config_version"], doc["config_seen"]) == (3, 4, 5)
        assert (doc["config_state"], doc["config_reason"]) == ("rejected", "window: 0 is below 1")
        assert "config v5 rejected: window: 0 is below 1" in doc["notes"]
