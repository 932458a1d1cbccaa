"""Issue 13 faults 2 and 3: one hostile or absurd message never stops the cloud.

Each message below is published by a node on its own permitted subject, against a real
server and the cloud service with its default timeouts, ack wait and lease. Before the fix,
each of the fault-2 messages made the service's task group fail (so `slmops cloud` exited, and
crash-looped under Restart=always); the fault-3 ones were applied and counted. Now each is
dead-lettered with a reason naming what was wrong, and every fleet keeps being counted.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import msgspec
import numpy as np
import pytest
from _cloud_util import LABELS, make_aggregate, make_manifest, publish, put_manifest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from structlog.testing import capture_logs

from _nats import new_fleet, wait_until
from slmops.cloud.config import CloudConfig, DriftConfig
from slmops.cloud.service import CloudService
from slmops.shared.messages import (
    ModelRef,
    NodeStatus,
    OpsEvent,
    TelemetryAggregate,
    decode_json,
    encode_telemetry,
)
from slmops.shared.names import (
    DEADLETTER_STREAM,
    EVENTS_STREAM,
    events_subject,
    status_subject,
    telemetry_subject,
)
from slmops.shared.server import EmbeddedServer

pytestmark = pytest.mark.anyio

LOCAL = ModelRef(name="local-only", version=1, variant="fp32")


def default_config(url: str, state: Path, fleets: list[str]) -> CloudConfig:
    """Default settings (timeouts, ack wait, lease, batch size); only the calibration size is
    cut, which is CPU, not time."""
    return CloudConfig(
        nats_url=url,
        state_dir=str(state),
        fleets=fleets,
        drift=msgspec.convert({"calibration_windows": 50_000}, DriftConfig),
    )


def raw(agg: TelemetryAggregate, **fields: Any) -> bytes:
    """``agg`` as msgpack with ``fields`` replaced or added (values may be ``msgspec.Raw``)."""
    doc = msgspec.to_builtins(agg)
    doc.update(fields)
    return msgspec.msgpack.encode(doc)


async def publish_raw(js: JetStreamContext, fleet: str, node: str, data: bytes, msg_id: str) -> None:
    await js.publish(telemetry_subject(fleet, node), data, headers={"Nats-Msg-Id": msg_id})


async def deadletters(js: JetStreamContext, fleet: str) -> dict[str, str]:
    """Dead letters of ``fleet``: source subject + stream seq -> reason."""
    info = await js.stream_info(DEADLETTER_STREAM)
    total = info.state.messages
    out: dict[str, str] = {}
    if not total:
        return out
    sub = await js.subscribe(
        "slmops.deadletter", ordered_consumer=True, deliver_policy=js_api.DeliverPolicy.ALL
    )
    try:
        for _ in range(total):
            msg = await sub.next_msg(timeout=5)
            headers = msg.headers or {}
            subject = headers.get("Slmops-Subject", "")
            if f".{fleet}." in subject:
                out[f"{subject}#{headers.get('Slmops-Stream-Seq')}"] = headers.get("Slmops-Reason", "")
    finally:
        await sub.unsubscribe()
    return out


async def ops_events(js: JetStreamContext, fleet: str) -> list[OpsEvent]:
    subject = events_subject(fleet)
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=subject)
    total = (info.state.subjects or {}).get(subject, 0)
    if not total:
        return []
    sub = await js.subscribe(subject, ordered_consumer=True, deliver_policy=js_api.DeliverPolicy.ALL)
    try:
        return [decode_json((await sub.next_msg(timeout=5)).data, OpsEvent) for _ in range(total)]
    finally:
        await sub.unsubscribe()


def nested(depth: int) -> msgspec.Raw:
    """A msgpack value nested ``depth`` arrays deep."""
    return msgspec.Raw(b"\x91" * depth + b"\xc0")


async def test_poison_from_one_node_is_deadlettered_and_every_fleet_keeps_being_counted(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path
) -> None:
    fa, fb = new_fleet(), new_fleet()
    rng = np.random.default_rng(5)
    await put_manifest(js, make_manifest())
    now = datetime.now(UTC)

    def agg(fleet: str, node: str, seq: int, **kw: Any) -> TelemetryAggregate:
        a = make_aggregate(fleet, node, seq, 200, rng, **kw)
        start = now - timedelta(minutes=200 - seq)
        return msgspec.structs.replace(a, window_start=start, window_end=start + timedelta(minutes=1))

    base = agg(fa, "p", 1)
    fault2 = {
        "telemetry nested 1000 deep": raw(base, zz=nested(1000)),
        "count 2**63-1": raw(base, count=2**63 - 1),
        "count 2**64-1": raw(base, count=2**64 - 1),
    }
    fault3 = {
        "negative class count": raw(base, class_counts={"alpha": -5, "beta": 100, "gamma": 100}),
        "negative histogram count": raw(
            base, confidence={"edges": base.confidence.edges, "counts": [-1, *base.confidence.counts[1:]]}
        ),
        "negative feedback": raw(base, feedback={"alpha": {"alpha": -3}}),
        "negative dropped": raw(base, dropped_inferences=-7),
        "errors > count": raw(base, errors=base.count + 1),
        "class counts 1e9 for count 10": raw(
            base, count=10, errors=0, class_counts={"alpha": 10**9, "beta": 0, "gamma": 0}
        ),
        "NaN edge": raw(
            base,
            confidence={
                "edges": [float("nan"), *base.confidence.edges[1:]],
                "counts": base.confidence.counts,
            },
        ),
        "non-manifest edges": raw(
            base,
            confidence={"edges": [x / 2 for x in base.confidence.edges], "counts": base.confidence.counts},
        ),
        "seq 2**63": raw(base, seq=2**63),
        "window_end in 9999": raw(base, window_end="9999-01-01T00:00:00Z"),
        "window in 1970": raw(base, window_start="1970-01-01T00:00:00Z", window_end="1970-01-01T00:01:00Z"),
        "window_end before start": raw(
            base, window_end=(base.window_start - timedelta(minutes=5)).isoformat()
        ),
        "unknown label": raw(base, class_counts={"alpha": 100, "omega": 50}),
    }
    bad_status = {
        "status nested 1000 deep": (
            b'{"fleet":"%s","node":"p","time":"2026-01-01T00:00:00Z","zz":' % fa.encode()
            + b"[" * 1000
            + b"]" * 1000
            + b"}"
        ),
        "status with a naive time": json.dumps(
            {"fleet": fa, "node": "p", "time": "2026-01-01T00:00:00"}
        ).encode(),
        "status served 2**64-1": json.dumps(
            {"fleet": fa, "node": "p", "time": "2026-01-01T00:00:00Z", "served": 2**64 - 1}
        ).encode(),
    }
    async with CloudService(default_config(nats_server.url, tmp_path, [fa, fb])) as svc:
        await svc.wait_active(30)
        for i, data in enumerate([*fault2.values(), *fault3.values()]):
            await publish_raw(js, fa, "p", data, f"{fa}/p/poison:{i}")
        for data in bad_status.values():
            await js.publish(status_subject(fa, "p"), data)
        # ~40 well-formed one-class aggregates of a model the registry does not know.
        one_class = [
            msgspec.structs.replace(
                agg(fa, "local", s, model=LOCAL),
                class_counts={LABELS[0]: 200},
                errors=0,
            )
            for s in range(1, 41)
        ]
        for a in one_class:
            await publish(js, a)
        good = [agg(f, n, s) for s in range(1, 31) for f, n in ((fa, "g1"), (fa, "g2"), (fb, "h1"))]
        for a in good:
            await publish(js, a)
        total = len(one_class) + len(good)
        await wait_until(
            lambda: svc.statistics().counters.get("aggregates", 0) >= total,
            60,
            what="every good one counted",
        )
        await wait_until(
            lambda: (
                svc.statistics().counters.get("deadlettered", 0)
                >= len(fault2) + len(fault3) + len(bad_status)
            ),
            30,
            what="every poison dead-lettered",
        )
        assert svc.active
        nodes = svc.nodes
        stats = svc.statistics()
    assert stats.counters["aggregates"] == total
    assert stats.counters["deadlettered"] == len(fault2) + len(fault3) + len(bad_status)
    assert nodes[(fa, "local")].aggregates == 40
    assert nodes[(fa, "local")].inferences == sum(a.count for a in one_class)
    assert nodes[(fa, "local")].model_registered is False
    assert (fa, "p") not in nodes or nodes[(fa, "p")].aggregates == 0
    for key in ((fa, "g1"), (fa, "g2"), (fb, "h1")):
        assert nodes[key].aggregates == 30
        assert nodes[key].epochs[""].seqs.missing == 0
    letters = await deadletters(js, fa)
    assert len(letters) == len(fault2) + len(fault3) + len(bad_status)
    reasons = " | ".join(letters.values())
    for phrase in ("nested too deeply", "$.count must be in", "$.class_counts", "$.errors",
                   "must be finite", "not the model's", "$.seq must be in", "in the future",
                   "max_window_age", "is before $.window_start", "not labels of model",
                   "$.dropped_inferences", "$.feedback", "time zone", "$.served"):  # fmt: skip
        assert phrase in reasons, phrase
    events = await ops_events(js, fa)
    assert [e.kind for e in events if e.model == LOCAL] == ["unregistered_model"]


async def test_a_restarted_cloud_does_not_trip_over_the_poison_again(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path
) -> None:
    """The poison is terminated after its dead-letter copy: a restart sees only new traffic."""
    fleet = new_fleet()
    rng = np.random.default_rng(6)
    now = datetime.now(UTC)
    base = msgspec.structs.replace(
        make_aggregate(fleet, "p", 1, 100, rng), window_start=now - timedelta(minutes=2), window_end=now
    )
    await publish_raw(js, fleet, "p", raw(base, zz=nested(1000)), f"{fleet}/p/poison:1")
    for _ in range(2):
        async with CloudService(default_config(nats_server.url, tmp_path, [fleet])) as svc:
            await svc.wait_active(30)
            await anyio.sleep(1.5)  # more than one fetch timeout: the poison was offered
            assert svc.active
    assert len(await deadletters(js, fleet)) == 1
    await publish(js, base)
    async with CloudService(default_config(nats_server.url, tmp_path, [fleet])) as svc:
        await svc.wait_active(30)
        await wait_until(lambda: svc.statistics().counters.get("aggregates", 0) == 1, 20, what="counted")


def test_state_level_poison_quarantines_the_signal_and_rebuilds_it_later() -> None:
    """A one-class model (its class-prior signal has one cell: a χ² test with 0 degrees of
    freedom) used to raise out of the detector at the first round with a reference
    (``df must be >= 1``), i.e. out of ingest. Now that (fleet, model, signal) unit is
    quarantined with a note for the caller's event, the other signals go on, and after
    ``QUARANTINE_ROUNDS`` rounds the signal is rebuilt from later windows (and, the model
    being what it is, quarantined again: once per period, not per aggregate)."""
    from _cloud_util import CONF_EDGES, LAT_EDGES, LEN_EDGES, PRIOR

    from slmops.bench._fleet import synthetic_manifest
    from slmops.cloud.drift.calibrate import Calibrator
    from slmops.cloud.drift.detector import QUARANTINE_ROUNDS, DriftDetector
    from slmops.shared.histogram import Histogram
    from slmops.shared.messages import HistogramEdges, ReferenceProfile

    model = ModelRef(name="one", version=1, variant="fp32")
    ref = ReferenceProfile(
        count=1000,
        class_counts={"only": 1000},
        confidence=Histogram(edges=CONF_EDGES, counts=[125] * 8),
        input_length=Histogram(edges=LEN_EDGES, counts=[100, 150, 300, 300, 100, 40, 10]),
    )
    manifest = synthetic_manifest(
        model,
        ["only"],
        HistogramEdges(confidence=CONF_EDGES, input_length=LEN_EDGES, latency_ms=LAT_EDGES),
        ref,
    )
    det = DriftDetector(
        msgspec.convert({"calibration_windows": 10_000}, DriftConfig),
        lambda: datetime.now(UTC),
        Calibrator(windows=10_000),
    )
    det.add_group("f", model, manifest)
    rng = np.random.default_rng(3)
    quarantined = []
    rounds = QUARANTINE_ROUNDS + 20
    for seq in range(1, rounds + 1):
        for node in ("a", "b"):
            a = make_aggregate("f", node, seq, 200, rng, prior=PRIOR, model=model)
            det.observe(msgspec.structs.replace(a, class_counts={"only": 200}))
        det.take_dirty()
        quarantined += det.take_quarantines()
    assert [s for _, s, _ in quarantined] == ["class_prior", "class_prior"]
    assert all("df must be >= 1" in reason for _, _, reason in quarantined)
    g = det.groups["f/one/1/fp32"]
    assert "class_prior" in g.quarantine
    assert g.rounds >= rounds - 1
    assert {"confidence", "input_length"} <= set(g.fleet_sig)  # the other signals kept going


def _install(i: int) -> str:
    return f"{i:032x}"


async def test_install_epochs_wiped_nodes_conflicts_and_clones(
    nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path
) -> None:
    """Issue 13 fault 5, cloud side. Node ``a`` loses its database (new install, seq from 1
    again, message ids ``<fleet>/<node>/<install>:<seq>``): both epochs are counted, each new
    install is an event. Node ``c`` is two devices with one node id (two installs
    interleaved): all counted, a conflict in ``fleet status`` and an event. Node ``d`` repeats
    (install, seq 3) with other content (a cloned data directory; published after JetStream's
    duplicate window, here without a message id): a cloned-device event, not counted twice.
    Before: the cloud deduped on (node, seq) and dropped the new epoch's windows."""
    from slmops.cloud.ingest.query import fleet_status
    from slmops.shared.names import msg_id

    fleet = new_fleet()
    rng = np.random.default_rng(8)
    await put_manifest(js, make_manifest())
    now = datetime.now(UTC)

    def agg(node: str, seq: int, install: str, n: int = 100) -> TelemetryAggregate:
        a = make_aggregate(fleet, node, seq, n, rng)
        start = now - timedelta(minutes=100 - seq)
        return msgspec.structs.replace(
            a, install=install, window_start=start, window_end=start + timedelta(minutes=1)
        )

    async def send(a: TelemetryAggregate, *, with_id: bool = True) -> None:
        headers = {"Nats-Msg-Id": f"{fleet}/{a.node}/{a.install}:{a.seq}"} if with_id else None
        await js.publish(telemetry_subject(fleet, a.node), encode_telemetry(a), headers=headers)

    sent: list[TelemetryAggregate] = []
    with capture_logs() as logs:
        async with CloudService(default_config(nats_server.url, tmp_path, [fleet])) as svc:
            await svc.wait_active(30)
            for inst in (_install(1), _install(2)):  # a wiped data directory in between
                for seq in range(1, 11):
                    sent.append(agg("a", seq, inst))
                    await send(sent[-1])
            for seq in range(1, 11):  # two devices, one node id
                for inst in (_install(3), _install(4)):
                    sent.append(agg("c", seq, inst))
                    await send(sent[-1])
            for seq in range(1, 6):
                sent.append(agg("d", seq, _install(5)))
                await send(sent[-1])
            # A legacy node (no install) keeps the old id form and is counted as before.
            for seq in range(1, 4):
                sent.append(agg("e", seq, ""))
                await js.publish(
                    telemetry_subject(fleet, "e"),
                    encode_telemetry(sent[-1]),
                    headers={"Nats-Msg-Id": msg_id("e", seq, fleet)},
                )
            await wait_until(
                lambda: svc.statistics().counters.get("aggregates", 0) >= len(sent), 30, what="all counted"
            )
            await send(agg("d", 3, _install(5), n=999), with_id=False)  # the clone
            await wait_until(lambda: svc.statistics().counters.get("clones", 0) == 1, 20, what="clone seen")
            await anyio.sleep(2.5)  # the snapshot interval (1 s), twice
            stats = svc.statistics().counters
            snaps = {n.node: n for n in await fleet_status(js._nc, fleet)}
    assert stats["aggregates"] == len(sent)
    assert sum(n.inferences for n in snaps.values()) == sum(a.count for a in sent)
    assert snaps["a"].aggregates == 20
    assert snaps["a"].installs == 2
    assert snaps["a"].install == _install(2)
    assert snaps["a"].install_conflicts == []
    assert snaps["a"].missing_seqs == 0
    assert snaps["c"].aggregates == 20
    assert snaps["c"].install_conflicts == [f"{_install(3)}/{_install(4)}"]
    assert any("install conflict" in note for note in snaps["c"].notes)
    assert snaps["d"].aggregates == 5
    assert snaps["d"].clones == 1
    assert snaps["e"].aggregates == 3
    assert snaps["e"].installs == 0
    kinds = sorted((e.kind, e.node) for e in await ops_events(js, fleet))
    assert kinds == sorted(
        [
            ("install_new", "a"),
            ("install_new", "a"),
            ("install_new", "c"),
            ("install_new", "c"),
            ("install_new", "d"),
            ("install_conflict", "c"),
            ("cloned_device", "d"),
        ]
    )
    # A node's first install is routine (info: bench fleet at 200 nodes logged 200 warnings);
    # a new install after an earlier one (a wiped or second device) is a warning.
    installs = sorted(
        (e["log_level"], e["id"].split(".")[2])
        for e in logs
        if e.get("event") == "ops_event" and e.get("kind") == "install_new"
    )
    assert installs == [("info", "a"), ("info", "c"), ("info", "d"), ("warning", "a"), ("warning", "c")]


async def test_statuses_are_ordered_by_server_time_and_the_node_clock_skew_is_reported(
    nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path
) -> None:
    """Issue 13 fault 6, cloud side. A node's clock runs 6 h ahead, then is corrected: its
    later statuses are applied (before, ordering by the node's clock ignored every one of them
    for 6 h), and ``fleet status`` shows its clock skew as the server measures it."""
    from slmops.cloud.ingest.query import fleet_status

    fleet = new_fleet()

    async def status(offset: timedelta, served: int) -> None:
        doc = {
            "fleet": fleet,
            "node": "n",
            "time": (datetime.now(UTC) + offset).isoformat(),
            "served": served,
        }
        await js.publish(status_subject(fleet, "n"), json.dumps(doc).encode())

    async with CloudService(default_config(nats_server.url, tmp_path, [fleet])) as svc:
        await svc.wait_active(30)
        await status(timedelta(hours=6), 10)
        await wait_until(lambda: (fleet, "n") in svc.nodes and svc.nodes[(fleet, "n")].served == 10, 20)
        await anyio.sleep(2.5)
        (ahead,) = await fleet_status(js._nc, fleet)
        await status(timedelta(0), 20)
        await status(timedelta(seconds=-30), 30)
        await wait_until(lambda: svc.nodes[(fleet, "n")].served == 30, 20, what="corrected statuses applied")
        await anyio.sleep(2.5)
        (now,) = await fleet_status(js._nc, fleet)
    assert ahead.clock_skew_s is not None
    assert abs(ahead.clock_skew_s - 6 * 3600) < 60
    assert any("clock skew" in note for note in ahead.notes)
    assert now.served == 30
    assert now.clock_skew_s is not None
    assert abs(now.clock_skew_s + 30) < 30


def test_rollout_node_view_judges_liveness_and_order_by_server_time() -> None:
    """Issue 13 fault 6, rollout side. The controller's node view is fed each status with its
    JetStream timestamp: a fleet whose clocks run 20 min behind is alive (before, with the
    15 min node TTL judged on the node's clock, no node was live and no rollout started), and
    a node whose clock ran 6 h ahead and was corrected has its later statuses taken."""
    from slmops.cloud.rollout.nodes import NodeView

    now = datetime.now(UTC)
    view = NodeView()
    for i in range(3):
        st = NodeStatus(fleet="f", node=f"n{i}", time=now - timedelta(minutes=20), served=i)
        view.observe(st, now.timestamp())
    assert set(view.live("f", now.timestamp())) == {"n0", "n1", "n2"}
    ahead = NodeStatus(fleet="f", node="x", time=now + timedelta(hours=6), served=1)
    view.observe(ahead, now.timestamp() - 10)
    fixed = NodeStatus(fleet="f", node="x", time=now, served=2)
    view.observe(fixed, now.timestamp())
    assert view.live("f", now.timestamp())["x"].served == 2
    late = NodeStatus(fleet="f", node="x", time=now + timedelta(hours=7), served=0)
    view.observe(late, now.timestamp() - 60)  # stored before the last one: a redelivery
    assert view.live("f", now.timestamp())["x"].served == 2


async def test_a_seq_jump_is_quarantined_not_counted_as_missing(
    nats_server: EmbeddedServer, nc: NATS, js: JetStreamContext, tmp_path: Path
) -> None:
    """A node forging seq 10^12 on its own subject left 10^12 "missing" seqs in the cloud for
    good (the tracker waited for every seq below it). Now (``ingest/dedupe.py``): a seq more
    than ``max_seq_jump`` (100,000) above the install's highest applied seq is dead-lettered as
    ``seq_jump`` and reported (ops event), not applied, no hole; node ``a``'s later windows are
    counted as before. Node ``b`` really moved on (its telemetry aged out of the stream while
    the cloud was away): three jumps in a row re-base it, only the two quarantined seqs are
    holes. Node ``f`` is first seen at seq 500,000: the seqs below are skipped, not missing."""
    from slmops.cloud.ingest.query import fleet_status

    fleet = new_fleet()
    rng = np.random.default_rng(9)
    await put_manifest(js, make_manifest())
    now = datetime.now(UTC)
    inst = _install(7)

    def agg(node: str, seq: int, minute: int) -> TelemetryAggregate:
        a = make_aggregate(fleet, node, 1, 10, rng)
        start = now - timedelta(minutes=100 - minute)
        return msgspec.structs.replace(
            a, seq=seq, install=inst, window_start=start, window_end=start + timedelta(minutes=1)
        )

    plan = [("a", seq, seq) for seq in range(1, 11)] + [("a", 10**12, 11)]
    plan += [("a", seq, seq + 1) for seq in range(11, 21)]
    plan += [("b", seq, seq) for seq in range(1, 6)] + [("b", 200_000 + i, 6 + i) for i in range(1, 11)]
    plan += [("f", 500_000 + i, i) for i in range(5)]
    async with CloudService(default_config(nats_server.url, tmp_path, [fleet])) as svc:
        await svc.wait_active(30)
        for node, seq, minute in plan:
            a = agg(node, seq, minute)
            await js.publish(
                telemetry_subject(fleet, node),
                encode_telemetry(a),
                headers={"Nats-Msg-Id": f"{fleet}/{node}/{inst}:{seq}"},
            )
        counted = 20 + 5 + 8 + 5
        await wait_until(
            lambda: svc.statistics().counters.get("aggregates", 0) >= counted, 30, what="all counted"
        )
        await wait_until(lambda: svc.statistics().counters.get("seq_jumps", 0) >= 3, 20, what="jumps")
        await anyio.sleep(2.5)  # the snapshot interval (1 s), twice
        stats = svc.statistics().counters
        snaps = {n.node: n for n in await fleet_status(js._nc, fleet)}
    assert stats["aggregates"] == counted
    assert stats["seq_jumps"] == 3
    assert snaps["a"].aggregates == 20
    assert snaps["a"].missing_seqs == 0
    assert snaps["b"].aggregates == 5 + 8
    assert snaps["b"].missing_seqs == 2  # 200,001 and 200,002: in the dead-letter stream
    assert snaps["f"].aggregates == 5
    assert snaps["f"].missing_seqs == 0
    reasons = list((await deadletters(js, fleet)).values())
    assert len(reasons) == 3
    assert all(r.startswith("seq_jump: seq ") and "max_seq_jump (100000)" in r for r in reasons)
    assert any("seq 1000000000000 " in r and "highest applied seq 10 " in r for r in reasons)
    jumps = sorted(e.node or "" for e in await ops_events(js, fleet) if e.kind == "seq_jump")
    assert jumps == ["a", "b"]


def test_seq_tracker_jump_rule() -> None:
    """``SeqTracker.jump`` unit cases: the bound, first sight, confirmation, and an applied
    seq between two jumps resetting the confirmation."""
    from slmops.cloud.ingest.dedupe import JUMP_CONFIRM, SeqTracker

    t = SeqTracker()
    assert not t.jump(5, 100)  # within the bound of a fresh tracker
    t.admit(5)
    assert t.missing == 4
    assert not t.jump(105, 100)  # exactly the bound
    assert t.jump(106, 100)
    assert t.missing == 4  # a quarantined jump opens no hole
    fresh = SeqTracker()
    assert not fresh.jump(10**12, 100)  # first sight: re-based, nothing missing
    fresh.admit(10**12)
    assert (fresh.missing, fresh.skipped) == (0, 10**12 - 1)
    assert fresh.jump(10**12 + 10**6, 100)
    u = SeqTracker()
    for seq in (1, 2, 3):
        u.admit(seq)
    for k in range(JUMP_CONFIRM - 1):  # a forger's jumps, interleaved with real seqs
        assert u.jump(10**9 + k, 100)
        u.admit(4 + k)
    assert u.jump(10**9 + 5, 100)  # the chain was reset by the applied seqs
    c = SeqTracker()
    c.admit(1)
    assert c.jump(1000, 100)
    assert c.jump(1001, 100)
    assert not c.jump(1003, 100)  # the third in a row: re-based below 1000
    c.admit(1003)
    assert (c.contiguous, c.missing, c.skipped) == (999, 3, 998)  # 1000-1002 are holes
