"""Node-local safety: after a swap, a version that breaches the node's health limits is
replaced by the previous one by the node itself (even offline), blocked, and reported.

The logic is driven with a real ModelManager (real bundles, real ORT) and injected inference
counters and clock; the real-node tests run a real EdgeNode on a real server."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from _transformer import make_transformer_bundle
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from _edge_util import Keys, edge_config
from _models import make_bundle
from _nats import model_of, read_stored, wait_until
from slmops.cloud.registry import Registry
from slmops.edge.inference import InferenceFailed
from slmops.edge.models import ModelManager
from slmops.edge.node import EdgeNode
from slmops.edge.safety import Counters, SafetyLimits, SafetyMonitor
from slmops.shared import names
from slmops.shared.bundle import TrustStore
from slmops.shared.messages import NodeStatus
from slmops.shared.server import EmbeddedServer

LIMITS = SafetyLimits(min_samples=50, min_intervals=5, watch_s=60, interval=1.0, max_latency_ratio=3.0)


class Traffic:
    """The node's inference counters, advanced by the test."""

    def __init__(self) -> None:
        self.c = Counters(0, 0, 0, 0.0)

    def __call__(self, model: str) -> Counters:
        return self.c  # one model served: its counters are the node's

    def serve(self, n: int, *, ms: float, failed: int = 0, batches: int = 10) -> None:
        s = self.c
        self.c = Counters(
            s.served + n, s.failed + failed, s.batches + batches, s.model_seconds + ms * batches / 1000
        )


class Reports:
    def __init__(self, online: bool = True) -> None:
        self.online = online
        self.sent: list[tuple[str, dict[str, object]]] = []
        self.attempts = 0

    async def __call__(self, event: str, **fields: object) -> bool:
        self.attempts += 1
        if self.online:
            self.sent.append((event, fields))
        return self.online


@pytest.fixture
async def setup(tmp_path: Path) -> tuple[ModelManager, Path, Path, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    v1 = make_bundle(tmp_path / "v1", key, version=1).path
    v2 = make_bundle(tmp_path / "v2", key, version=2).path

    async def register(_: object) -> int:
        return 1

    models = ModelManager(tmp_path / "cache", TrustStore([key.public_key()]), register=register, memory_mb=0)
    await models.open()
    await models.install(v1, source="test")
    return models, v1, v2, key


async def _until_breach(
    monitor: SafetyMonitor, traffic: Traffic, clock: Clock, bad: dict[str, float]
) -> tuple[str | None, int]:
    for ticks in range(1, 20):
        traffic.serve(30, **bad)  # type: ignore[arg-type]
        clock.t += 1
        breach = await monitor.tick()
        if breach is not None:
            return breach, ticks
    return None, 20


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def _baseline(monitor: SafetyMonitor, traffic: Traffic, clock: Clock) -> None:
    for _ in range(LIMITS.min_intervals + 1):
        traffic.serve(100, ms=1.0)
        clock.t += 1
        assert await monitor.tick() is None


async def _v2_watched(
    models: ModelManager, v2: Path, state: Path, reports: Reports, limits: SafetyLimits = LIMITS
) -> tuple[SafetyMonitor, Traffic, Clock]:
    """A monitor (state in ``state``) that saw v1's healthy baseline (``_baseline``), then v2
    installed: v2 is being watched."""
    traffic, clock = Traffic(), Clock()
    monitor = SafetyMonitor(models, traffic, reports, state_path=state, limits=limits, clock=clock)
    await _baseline(monitor, traffic, clock)
    await models.install(v2, source="test")
    return monitor, traffic, clock


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("bad", "why"),
    [({"ms": 10.0}, "latency p95"), ({"ms": 1.0, "failed": 10}, "error rate")],
    ids=["ten_times_slower", "errors"],
)
async def test_breaching_version_is_rolled_back_blocked_and_reported_once_online(
    setup: tuple[ModelManager, Path, Path, Ed25519PrivateKey], tmp_path: Path, bad: dict[str, float], why: str
) -> None:
    models, _, v2, _ = setup
    reports = Reports(online=False)
    monitor, traffic, clock = await _v2_watched(models, v2, tmp_path / "safety.json", reports)
    # Below the minimum sample count nothing is judged, however bad.
    traffic.serve(30, **bad)  # type: ignore[arg-type]
    clock.t += 1
    assert await monitor.tick() is None
    breach, ticks = await _until_breach(monitor, traffic, clock, bad)
    assert breach is not None
    assert why in breach
    if why == "latency p95":  # the warm-up interval, then min_intervals of them
        assert ticks == LIMITS.min_intervals
    current = models.current
    assert current is not None
    assert current.ref.version == 1
    assert monitor.is_blocked(models.previous or current.ref)
    # Offline: the report waits, and goes out (once) when the node is back.
    assert reports.sent == []
    reports.online = True
    clock.t += 1
    await monitor.tick()
    await monitor.tick()
    assert [event for event, _ in reports.sent] == ["rollback"]
    assert "version 2" in str(reports.sent[0][1]["last_error"])


@pytest.mark.anyio
async def test_healthy_version_stays_and_the_watch_ends(
    setup: tuple[ModelManager, Path, Path, Ed25519PrivateKey], tmp_path: Path
) -> None:
    models, _, v2, _ = setup
    reports = Reports()
    monitor, traffic, clock = await _v2_watched(models, v2, tmp_path / "safety.json", reports)
    for _ in range(5):
        traffic.serve(100, ms=1.3)  # a little slower: within the 3x limit
        clock.t += 1
        assert await monitor.tick() is None
    clock.t += LIMITS.watch_s
    await monitor.tick()
    assert monitor.statistics().watching is False
    traffic.serve(100, ms=50)  # after the watch, the swap is settled: no local rollback
    clock.t += 1
    assert await monitor.tick() is None
    current = models.current
    assert current is not None
    assert current.ref.version == 2
    assert reports.sent == []


@pytest.mark.anyio
async def test_block_list_survives_a_restart_and_a_reinstall_is_undone_at_once(
    setup: tuple[ModelManager, Path, Path, Ed25519PrivateKey], tmp_path: Path
) -> None:
    models, _, v2, _ = setup
    reports, state = Reports(), tmp_path / "safety.json"
    monitor, traffic, clock = await _v2_watched(models, v2, state, reports)
    breach, _ = await _until_breach(monitor, traffic, clock, {"ms": 10.0})
    assert breach is not None
    # A new monitor (node restart) still knows; the assignment installs v2 again.
    again = SafetyMonitor(models, traffic, reports, state_path=state, limits=LIMITS, clock=clock)
    await models.install(v2, source="refresh")
    clock.t += 1
    breach = await again.tick()
    assert breach is not None
    assert "blocked" in breach
    current = models.current
    assert current is not None
    assert current.ref.version == 1


def test_limits_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="min_samples"):
        SafetyLimits(min_samples=0)
    with pytest.raises(ValueError, match="max_error_rate"):
        SafetyLimits(max_error_rate=2)


@pytest.mark.anyio
async def test_real_edge_node_rolls_back_on_its_own_and_reports_it(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """A real node over its absolute latency limit (set below any real latency) right after
    a swap goes back to the previous version and publishes a ``rollback`` status."""
    keys = Keys(tmp_path / "keys")
    limits = SafetyLimits(min_samples=20, max_latency_ms=1e-6, interval=0.05)
    cfg = edge_config(
        tmp_path, keys, fleet=fleet, url=nats_server.url, model=keys.bundle(1).path, safety=limits
    )
    v2 = keys.bundle(2).path
    async with EdgeNode(cfg) as node:
        await node.link.wait_online()
        await node.predict(["alpha words"] * 5)
        await node.models.install(v2, source="test")

        async def serving_v1_again() -> bool:
            await node.predict(["beta words"] * 5)  # traffic until the monitor acts
            current = node.models.current
            return current is not None and current.ref.version == 1

        await wait_until(serving_v1_again, timeout=10, what="rolled back to v1")
        assert node.safety.is_blocked(node.models.previous)  # type: ignore[arg-type]
        await wait_until(lambda: _any_rollback(js, fleet), timeout=10, what="rollback status")
    rollbacks = [s for s in await _statuses(js, fleet) if s.event == "rollback"]
    assert rollbacks
    assert rollbacks[-1].model is not None
    assert rollbacks[-1].model.version == 1


async def _statuses(js: JetStreamContext, fleet: str) -> list[NodeStatus]:
    return await read_stored(js, names.STATUS_STREAM, f"slmops.status.{fleet}.>", NodeStatus)


async def _any_rollback(js: JetStreamContext, fleet: str) -> bool:
    return any(
        s.event == "rollback" and s.last_error and "safety" in s.last_error
        for s in await _statuses(js, fleet)
    )


@pytest.mark.anyio
async def test_by_default_latency_measured_in_another_period_abandons_nothing(
    setup: tuple[ModelManager, Path, Path, Ed25519PrivateKey], tmp_path: Path
) -> None:
    """With default limits a new version ten times slower than the previous one measured
    earlier (what a busy device shows for versions of equal speed) is kept: latency is the
    cloud's same-period gate's to judge. Old default (ratio 3): rolled back after 5 intervals."""
    models, _, v2, _ = setup
    limits = SafetyLimits(min_samples=50, min_intervals=5, watch_s=60, interval=1.0)
    assert limits.max_latency_ratio is None
    reports = Reports(online=True)
    monitor, traffic, clock = await _v2_watched(models, v2, tmp_path / "safety.json", reports, limits)
    breach, _ = await _until_breach(monitor, traffic, clock, {"ms": 10.0})
    assert breach is None
    current = models.current
    assert current is not None
    assert current.ref.version == 2


@pytest.mark.anyio
async def test_a_real_node_with_default_limits_rolls_back_an_erring_version_on_its_own(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """``test_real_edge_node_rolls_back_on_its_own_and_reports_it`` with the DEFAULT
    ``SafetyLimits`` (1 s intervals, 50 samples, error rate 0.05; no latency limit): a real
    node swaps to a signed v2 that passes its smoke tests but gives a non-finite output for
    one word; with one request in five failing, the node goes back to v1 by itself, blocks v2
    and publishes a ``rollback``."""
    keys = Keys(tmp_path / "keys")
    name = model_of(fleet)
    v1 = make_transformer_bundle(tmp_path / "v1", keys.key, version=1, name=name)
    v2 = make_transformer_bundle(tmp_path / "v2", keys.key, version=2, name=name, nan_word="nanword")
    cfg = edge_config(tmp_path, keys, fleet=fleet, url=nats_server.url, model=v1.path)
    assert cfg.safety == SafetyLimits()
    async with EdgeNode(cfg) as node:
        await node.link.wait_online()
        await node.models.install(v2.path, source="test")

        async def serving_v1_again() -> bool:
            await _traffic(node)
            current = node.models.current
            return current is not None and current.ref.version == 1

        await wait_until(serving_v1_again, timeout=60, what="rolled back to v1")
        assert node.safety.statistics().blocked == (f"{name}/2",)
        await wait_until(lambda: _any_rollback(js, fleet), timeout=30, what="rollback status")


async def _traffic(node: EdgeNode) -> None:
    """Five requests, one of them failing on a version built with ``nan_word="nanword"``."""
    await node.predict(["alpha words"] * 4)
    with contextlib.suppress(InferenceFailed):
        await node.predict(["a nanword here"])


@pytest.mark.anyio
async def test_a_real_node_never_falls_back_onto_a_version_the_cloud_rolled_back(
    nats_server: EmbeddedServer, js: JetStreamContext, fleet: str, tmp_path: Path
) -> None:
    """The cloud assigns v2, then moves the node back to v1 (what a rolled-back rollout's
    cleanup writes). The node then runs v1 with v2 as its "previous", and v1 breaches the
    default limits (one request in five fails: a non-finite output for one word). Old code
    rolled back onto v2 — the version the cloud had just rolled back — and blocked v1, so it
    stayed on v2 for good. Now v2 is withdrawn: the node does not watch v1 against it and stays
    on v1 past the samples a judgement needs, and remembers it across a restart; an
    assignment naming v2 again lifts that. Default ``SafetyLimits``."""
    keys = Keys(tmp_path / "keys")
    model = model_of(fleet)
    registry = Registry(js)
    trust = TrustStore([keys.key.public_key()])
    v1 = make_transformer_bundle(tmp_path / "v1", keys.key, version=1, name=model, nan_word="nanword")
    for b in (v1, make_transformer_bundle(tmp_path / "v2", keys.key, version=2, name=model)):
        await registry.push(b, trust)
    await registry.assign(fleet, 1, model=model)
    cfg = edge_config(tmp_path, keys, fleet=fleet, url=nats_server.url, model=str(v1.path))
    limits = cfg.safety
    assert limits == SafetyLimits()

    async def on(node: EdgeNode, version: int) -> bool:
        current = node.models.current
        return current is not None and current.ref.version == version

    async with EdgeNode(cfg) as node:
        await node.link.wait_online()
        await registry.assign(fleet, 2, model=model)
        await wait_until(lambda: on(node, 2), timeout=30, what="v2 installed")
        await registry.assign(fleet, 1, model=model)  # the cloud rolls v2 back
        await wait_until(lambda: on(node, 1), timeout=30, what="v1 restored")
        previous = node.models.previous
        assert previous is not None
        assert previous.version == 2
        assert node.safety.statistics().withdrawn == (f"{model}/2",)
        assert not node.safety.statistics().watching

        async def judged() -> bool:  # v1 has the samples a watched version is judged on
            await _traffic(node)
            return node.safety.statistics().samples >= 2 * limits.min_samples

        await wait_until(judged, timeout=60, what=f"{2 * limits.min_samples} samples of v1")
        assert await on(node, 1), "the node fell back onto the version the cloud rolled back"
        assert node.safety.statistics().blocked == ()
    async with EdgeNode(cfg) as node:  # a restart remembers
        assert node.safety.is_withdrawn(previous)
        await node.link.wait_online()
        await registry.assign(fleet, 2, model=model)  # the cloud wants v2 again
        await wait_until(lambda: on(node, 2), timeout=30, what="v2 installed again")
        assert node.safety.statistics().withdrawn == ()


@pytest.mark.anyio
async def test_a_breach_with_a_withdrawn_previous_version_stays_and_says_so(
    setup: tuple[ModelManager, Path, Path, Ed25519PrivateKey], tmp_path: Path
) -> None:
    """The node runs v3 (previous v2) and judges it when the assignment moves back to v1:
    the cloud withdrew v2 and v3. A breach of v3 then keeps v3 (the refresher installs v1,
    the assigned version) instead of restoring v2, blocks nothing, reports the refusal in a
    status, and a restarted monitor still knows what was withdrawn. Old code: restored v2."""
    models, _, v2, key = setup
    v3 = make_bundle(tmp_path / "v3", key, version=3).path
    traffic, clock, reports = Traffic(), Clock(), Reports()
    state = tmp_path / "safety.json"
    monitor = SafetyMonitor(models, traffic, reports, state_path=state, limits=LIMITS, clock=clock)
    await models.install(v2, source="test")  # current v2, previous v1
    await monitor.assigned(models.current.ref.name, 2)  # type: ignore[union-attr]
    await models.install(v3, source="test")  # current v3, previous v2: watched
    assert monitor.statistics().watching
    await monitor.assigned(models.current.ref.name, 1)  # type: ignore[union-attr]  # back to v1
    assert set(monitor.statistics().withdrawn) == {"testclf/2", "testclf/3"}
    breach, _ = await _until_breach(monitor, traffic, clock, {"ms": 1.0, "failed": 10})
    assert breach is not None
    current = models.current
    assert current is not None
    assert current.ref.version == 3  # not v2; the refresher installs v1, the assigned one
    assert monitor.statistics().blocked == ()
    clock.t += 1
    await monitor.tick()
    assert [e for e, _ in reports.sent] == ["periodic"]
    assert "withdrawn by the cloud" in str(reports.sent[0][1]["last_error"])
    again = SafetyMonitor(models, traffic, reports, state_path=state, limits=LIMITS, clock=clock)
    assert set(again.statistics().withdrawn) == {"testclf/2", "testclf/3"}
