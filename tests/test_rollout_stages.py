"""Staged rollouts on a real server with 20 simulated nodes: a good version goes through every
stage, a bad one is caught at the first stage and rolled back, a restart mid-rollout resumes
where it was, variants follow each node's device."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from _models import make_bundle
from _nats import read_stored, wait_until
from _rollout import wait_rollout
from _simfleet import Profile, SimFleet
from slmops.cloud.registry import Registry
from slmops.cloud.rollout import (
    RolloutConfig,
    RolloutRunner,
    RolloutStore,
    cohort,
    start_rollout,
)
from slmops.shared import names
from slmops.shared.bundle import TrustStore, write_bundle
from slmops.shared.messages import Assignment, ModelRef, RolloutEvent, decode_json

pytestmark = pytest.mark.anyio
N_NODES = 20
FAST = RolloutConfig(stages=[5, 25, 100], soak_s=0.3, min_samples=200, install_timeout_s=10)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


async def _push(registry: Registry, tmp: Path, key: Ed25519PrivateKey, model: str, version: int) -> None:
    """Push ``version`` as fp32 (needs 256 MB) and int8 (needs 0 MB)."""
    trust = TrustStore([key.public_key()])
    fp32 = make_bundle(tmp / f"{model}-{version}-fp32", key, version=version, name=model)
    fp32 = write_bundle(
        tmp / f"{model}-{version}-fp32b",
        fp32.model_path.read_bytes(),
        msgspec.structs.replace(fp32.manifest, min_memory_mb=256),
        key,
    )
    await registry.push(fp32, trust)
    int8 = make_bundle(tmp / f"{model}-{version}-int8", key, version=version, name=model, variant="int8")
    await registry.push(int8, trust)


@dataclass
class Rollouts:
    """A staged-rollout test's world: versions 1 to 3 of the test's model pushed (fp32 and
    int8), the fleet assigned v1, the rollout store; the simulated fleet and the rollout
    runner made and started the same way for each test."""

    nc: NATS
    js: JetStreamContext
    fleet: str
    registry: Registry
    store: RolloutStore
    model: str

    def sim(self, profiles: dict[int, Profile] | None = None) -> SimFleet:
        """``N_NODES`` simulated nodes serving v1; ``profiles``: how a version behaves."""
        start = ModelRef(name=self.model, version=1)
        return SimFleet(
            self.nc, self.js, self.fleet, n=N_NODES, model=self.model, profiles=profiles or {}, start=start
        )

    async def start(self, version: int, config: RolloutConfig = FAST) -> None:
        fleet, model = self.fleet, self.model
        await start_rollout(
            self.js, self.registry, self.store, fleet=fleet, version=version, model=model, config=config
        )

    @asynccontextmanager
    async def running(self, sim: SimFleet) -> AsyncIterator[None]:
        """The simulated fleet and a rollout runner, running until the block ends; entered once
        the runner sees every node."""
        runner = RolloutRunner(self.js, interval=0.05, fleets=[self.fleet])  # not other tests' rollouts
        async with anyio.create_task_group() as tg:
            await tg.start(sim.run)
            await tg.start(runner.run)
            await wait_until(lambda: len(runner.controller.live_nodes(self.fleet, 0)) == N_NODES, timeout=10)
            yield
            tg.cancel_scope.cancel()


@pytest.fixture
async def r(nc: NATS, js: JetStreamContext, fleet: str, tmp_path: Path, key: Ed25519PrivateKey) -> Rollouts:
    registry = Registry(js)
    model = f"clf_{fleet}"
    for version in (1, 2, 3):
        await _push(registry, tmp_path, key, model, version)
    await registry.assign(fleet, 1, model=model)
    return Rollouts(nc, js, fleet, registry, RolloutStore(js), model)


async def _events(js: JetStreamContext, fleet: str) -> list[RolloutEvent]:
    return await read_stored(js, names.ROLLOUT_STREAM, names.rollout_subject(fleet), RolloutEvent)


async def test_good_version_goes_through_every_stage_with_variants_per_device(r: Rollouts) -> None:
    sim = r.sim()
    async with r.running(sim):
        await r.start(2)
        final = await wait_rollout(r.store, r.fleet, lambda s: s.phase == "done")
        await wait_until(lambda: sim.running(2) == set(sim.nodes), timeout=10, what="all nodes on v2")
    assert final.status == "completed", final.reason
    # Each device got its variant: small ones int8, big ones fp32, at every stage.
    for node in sim.nodes.values():
        assert node.model is not None
        assert node.model.variant == ("int8" if node.memory_mb < 256 else "fp32"), node
    kinds = [(e.state, e.stage) for e in await _events(r.js, r.fleet)]
    assert kinds == [
        ("started", 0),
        ("stage_started", 0),
        ("stage_passed", 0),
        ("stage_started", 1),
        ("stage_passed", 1),
        ("stage_started", 2),
        ("stage_passed", 2),
        ("completed", 2),
    ]
    assert len(final.nodes) == N_NODES
    assert sum(1 for e in final.nodes.values() if e.stage == 0) == 1  # 5% of 20
    assert sum(1 for e in final.nodes.values() if e.stage <= 1) == 5  # 25% of 20
    # The fleet-wide key names v2 and no node is left pinned.
    kv = await r.js.key_value(names.ASSIGNMENTS_BUCKET)
    fleet_wide = decode_json((await kv.get(names.assignment_key(r.fleet))).value or b"", Assignment)
    assert (fleet_wide.model, fleet_wide.version) == (r.model, 2)
    assert sim.fleet_wide is not None
    assert all(n.own is None for n in sim.nodes.values())


@pytest.mark.parametrize(
    ("bad", "gate"),
    [
        (Profile(mix={"alpha": 1.0}), "drift"),
        (Profile(latency_ms=15.0), "latency_p95"),
        (Profile(error_rate=0.2), "error_rate"),
        (Profile(reject=True), "install"),
        (Profile(accuracy=0.7), "accuracy"),
    ],
    ids=["one_class", "ten_times_slower", "errors", "smoke_test_fails", "feedback_accuracy_drop"],
)
async def test_bad_version_is_caught_at_the_first_stage_and_rolled_back(
    r: Rollouts,
    bad: Profile,
    gate: str,
) -> None:
    sim = r.sim({3: bad})
    async with r.running(sim):
        await r.start(3)
        final = await wait_rollout(r.store, r.fleet, lambda s: s.phase == "done")
        await wait_until(lambda: not sim.running(3), timeout=10, what="nobody on v3")
    assert final.status == "rolled_back"
    assert final.stage == 0
    assert final.gates[gate]["outcome"] == "fail", final.gates  # type: ignore[index]
    never = N_NODES - len(sim.ran(3))
    assert never / N_NODES >= 0.95, sim.ran(3)
    assert sim.running(1) == set(sim.nodes)
    kinds = [e.state for e in await _events(r.js, r.fleet)]
    assert kinds[:2] == ["started", "stage_started"]
    assert kinds[-2:] == ["gate_failed", "rolled_back"]
    assert "stage_passed" not in kinds
    # Restored exactly: no node keeps a key of its own, the fleet still says v1.
    assert all(n.own is None for n in sim.nodes.values())
    assert sim.fleet_wide is not None
    assert sim.fleet_wide.version == 1


async def test_restart_mid_rollout_resumes_where_it_was_without_duplicate_events(r: Rollouts) -> None:
    sim = r.sim()
    config = msgspec.structs.replace(FAST, soak_s=1.0)
    async with anyio.create_task_group() as tg:
        await tg.start(sim.run)
        first = RolloutRunner(r.js, interval=0.05)
        async with anyio.create_task_group() as inner:
            await inner.start(first.run)
            await wait_until(lambda: len(first.controller.live_nodes(r.fleet, 0)) == N_NODES, timeout=10)
            await r.start(2, config)
            mid = await wait_rollout(r.store, r.fleet, lambda s: s.stage == 1 and s.phase == "soaking")
            inner.cancel_scope.cancel()  # the cloud dies mid-stage
        assert mid.status == "running"
        second = RolloutRunner(r.js, interval=0.05)
        await tg.start(second.run)
        final = await wait_rollout(r.store, r.fleet, lambda s: s.phase == "done")
        tg.cancel_scope.cancel()
    assert final.status == "completed", final.reason
    assert final.id == mid.id
    # Stage 1's nodes were not assigned afresh: the resumed state kept them.
    assert {n for n, e in final.nodes.items() if e.stage <= 1} == {n for n, e in mid.nodes.items()}
    kinds = [(e.state, e.stage) for e in await _events(r.js, r.fleet)]
    assert len(kinds) == len(set(kinds)), kinds
    assert kinds[-1] == ("completed", 2)
    assert sim.running(2) == set(sim.nodes)


async def test_pause_holds_the_rollout_resume_continues_abort_restores(r: Rollouts) -> None:
    sim = r.sim()
    async with r.running(sim):
        await r.start(2)
        await r.store.command(r.fleet, "pause")
        paused = await wait_rollout(r.store, r.fleet, lambda s: s.status == "paused")
        # Held: well past the soak, it does not leave its stage.
        await anyio.sleep(FAST.soak_s * 4)
        got = await r.store.get(r.fleet)
        assert got is not None
        assert got[0].stage == paused.stage
        assert got[0].status == "paused"
        await r.store.command(r.fleet, "resume")
        await wait_rollout(r.store, r.fleet, lambda s: s.stage >= 1 and s.status == "running")
        await r.store.command(r.fleet, "abort")
        final = await wait_rollout(r.store, r.fleet, lambda s: s.phase == "done")
        await wait_until(lambda: sim.running(1) == set(sim.nodes), timeout=10, what="all back on v1")
    assert final.status == "aborted"
    kinds = [e.state for e in await _events(r.js, r.fleet)]
    assert "paused" in kinds
    assert "resumed" in kinds
    assert kinds[-1] == "aborted"


async def test_nodes_that_fail_the_version_go_back_at_once_and_stay_back_when_it_completes(
    r: Rollouts,
) -> None:
    """Within the failure budget the rollout completes; the node that refused the version and
    the one that rolled back on its own are returned to v1 at once and kept there (pinned),
    never offered v2 again."""
    sim = r.sim()
    stage1 = sorted(cohort(r.fleet, sim.nodes, 25) - cohort(r.fleet, sim.nodes, 5))
    refuser, leaver = stage1[0], stage1[1]
    sim.nodes[refuser].refuse = {2}
    sim.nodes[leaver].abandon = {2}
    config = msgspec.structs.replace(FAST, max_failures=0.45)
    async with r.running(sim):
        await r.start(2, config)
        final = await wait_rollout(r.store, r.fleet, lambda s: s.phase == "done")
        await wait_until(lambda: len(sim.running(2)) == N_NODES - 2, timeout=10, what="the others on v2")
    assert final.status == "completed", final.reason
    assert set(final.failures) == {refuser, leaver}
    assert "rejected" in final.failures[refuser]
    assert "rolled back" in final.failures[leaver]
    assert sim.running(1) == {refuser, leaver}
    assert [r.version for r in sim.nodes[leaver].history].count(2) == 1  # no flapping
    for node in (refuser, leaver):
        own = sim.nodes[node].own
        assert own is not None
        assert own.version == 1
    kinds = [e.state for e in await _events(r.js, r.fleet)]
    assert kinds.count("node_failed") == 1
    assert kinds.count("node_rollback") == 1
