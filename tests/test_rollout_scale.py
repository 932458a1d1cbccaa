"""Rollouts of fleets far larger than one KV value (issue 18): the state is kept in parts, the
assignments are written in bounded batches, a stage's event carries a count and a bounded
sample, a controller killed mid-stage resumes without writing again what it wrote, and a
state an older cloud wrote as one value is read and migrated.

Nodes are fed to the controller as statuses (the way the runner feeds it), so no node process
is needed; KV, the registry and the streams are the session's real nats-server.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import msgspec
import pytest
from nats.js import JetStreamContext

from _rollout import two_versions
from slmops.cloud.registry import Registry
from slmops.cloud.rollout import Assigner, RolloutConfig, RolloutController, RolloutStore, start_rollout
from slmops.cloud.rollout.state import NodeEntry, RolloutState
from slmops.shared import names
from slmops.shared.kv import kv_keys, kv_values
from slmops.shared.messages import Assignment, DeviceProfile, ModelRef, NodeStatus, RolloutEvent, decode_json
from slmops.shared.messages import encode_json as encode_wire

T0 = 1_900_000_000.0
#: Over the size at which the old single value passed the 1 MiB limit (~13,000 nodes).
BIG = 14_000


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[RolloutEvent, int]] = []

    async def __call__(self, fleet: str, event: RolloutEvent, msg_id: str) -> None:
        self.seen.append((event, len(encode_wire(event))))

    def of(self, state: str) -> list[tuple[RolloutEvent, int]]:
        return [(e, size) for e, size in self.seen if e.state == state]


def _status(fleet: str, node: str, t: float, model: str, version: int) -> NodeStatus:
    return NodeStatus(
        fleet=fleet,
        node=node,
        time=datetime.fromtimestamp(t, UTC),
        event="periodic",
        device=DeviceProfile(memory_mb=4096),
        model=ModelRef(name=model, version=version),
    )


@pytest.fixture
async def world(js: JetStreamContext, tmp_path: Path, fleet: str) -> tuple[Registry, str]:
    """The registry with the model's versions 1 and 2, the fleet on version 1."""
    model = f"sc_{fleet}"
    return await two_versions(js, tmp_path, fleet, model), model


async def _own_keys(js: JetStreamContext, fleet: str) -> dict[str, Assignment]:
    """Every node's own assignment in the fleet (the fleet-wide key left out)."""
    values = await kv_values(js, names.ASSIGNMENTS_BUCKET, f"{fleet}.*", timeout=30)
    return {
        key.split(".", 1)[1]: decode_json(v, Assignment)
        for key, v in values.items()
        if not key.endswith("._fleet")
    }


@pytest.mark.anyio
async def test_a_rollout_of_a_fleet_over_one_kv_value_starts_and_advances(
    js: JetStreamContext, fleet: str, world: tuple[Registry, str]
) -> None:
    registry, model = world
    nodes = [f"n{i:05d}" for i in range(BIG)]
    pinned = nodes[::2000]  # these ran their own key before: what a rollback must restore
    for node in pinned:
        await registry.assign(fleet, 1, model=model, node=node)
    store, events = RolloutStore(js), Events()
    controller = RolloutController(Assigner(js, registry), store, events, fleets=[fleet])
    for node in nodes:
        controller.observe_status(_status(fleet, node, T0, model, 1), T0)
    await start_rollout(
        js, registry, store, fleet=fleet, version=2, model=model, config=RolloutConfig(stages=[100]), now=T0
    )
    began = time.perf_counter()
    await controller.step(T0 + 1)
    took = time.perf_counter() - began

    got = await store.get(fleet)
    assert got is not None
    state = got[0]
    assert (state.phase, len(state.nodes)) == ("installing", BIG), (state.phase, state.reason)
    assert all(state.nodes[n].prior is not None and state.nodes[n].prior.version == 1 for n in pinned)
    assert sum(e.prior is not None for e in state.nodes.values()) == len(pinned)
    # The rollout's own key stays small whatever the fleet's size.
    header = await (await js.key_value(names.ROLLOUTS_BUCKET)).get(fleet)
    assert len(header.value or b"") < 16_384, len(header.value or b"")
    # Every node has its own key naming the version.
    own = await _own_keys(js, fleet)
    assert len(own) == BIG
    assert {a.version for a in own.values()} == {2}
    # The stage's event: the count, and a bounded sample of the nodes.
    ((started, size),) = events.of("stage_started")
    assert started.node_count == BIG
    assert 0 < len(started.nodes) <= 100
    assert set(started.nodes) <= set(nodes)
    assert size < 16_384, size
    assert took < 100, f"assigning {BIG} nodes took {took:.1f} s"

    # The nodes report the version installed: the stage moves on to its soak.
    for node in nodes:
        controller.observe_status(_status(fleet, node, T0 + 2, model, 2), T0 + 2)
    await controller.step(T0 + 3)
    got = await store.get(fleet)
    assert got is not None
    assert got[0].phase == "soaking", (got[0].phase, got[0].reason)


@pytest.mark.anyio
async def test_a_controller_killed_mid_stage_resumes_without_writing_again_what_it_wrote(
    js: JetStreamContext, fleet: str, world: tuple[Registry, str]
) -> None:
    registry, model = world
    nodes = [f"r{i:04d}" for i in range(2_400)]
    pinned = nodes[::600]
    for node in pinned:
        await registry.assign(fleet, 1, model=model, node=node)
    store = RolloutStore(js)
    await start_rollout(
        js, registry, store, fleet=fleet, version=2, model=model, config=RolloutConfig(stages=[100]), now=T0
    )

    def controller() -> RolloutController:
        c = RolloutController(Assigner(js, Registry(js)), RolloutStore(js), Events(), fleets=[fleet])
        for node in nodes:
            c.observe_status(_status(fleet, node, T0, model, 1), T0)
        return c

    async def written() -> int:
        keys = await kv_keys(js, names.ASSIGNMENTS_BUCKET, f"{fleet}.*")
        return len(keys) - 1  # the fleet-wide key

    # The first controller is killed once more than half the nodes have their key.
    async with anyio.create_task_group() as tg:
        tg.start_soon(controller().step, T0 + 1)
        with anyio.fail_after(100):
            while await written() < 1_300:  # noqa: ASYNC110 -- polling KV, not a local flag
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    killed_at = datetime.now(UTC)
    before = await _own_keys(js, fleet)
    assert len(before) < len(nodes), "the first controller finished before it was killed"

    await controller().step(T0 + 2)
    got = await store.get(fleet)
    assert got is not None
    state = got[0]
    assert (state.phase, sorted(state.nodes)) == ("installing", nodes)
    # What to restore was read before anything was written, and kept.
    assert {n for n, e in state.nodes.items() if e.prior is not None} == set(pinned)
    own = await _own_keys(js, fleet)
    assert len(own) == len(nodes)
    assert {a.version for a in own.values()} == {2}
    done = {n for n, a in before.items() if a.version == 2}  # the pinned ones hold v1
    rewritten = [n for n, a in own.items() if a.assigned_at > killed_at and n in done]
    # Only the batch cut short is written again (at most one part of the state).
    assert len(rewritten) <= 500, len(rewritten)


@pytest.mark.anyio
async def test_a_state_an_older_cloud_wrote_as_one_value_is_migrated_and_rolled_back(
    js: JetStreamContext, fleet: str, world: tuple[Registry, str]
) -> None:
    nodes = [f"o{i:02d}" for i in range(30)]
    registry, model = world
    prior = await registry.assign(fleet, 1, model=model, node=nodes[0])
    for node in nodes:
        await registry.assign(fleet, 2, model=model, node=node)
    # The value an older cloud wrote: every node inside the one key, mid-stage.
    old = RolloutState(
        id=f"{fleet}-old-v2-abcdef",
        fleet=fleet,
        model=model,
        version=2,
        previous_version=1,
        config=RolloutConfig(stages=[100]),
        phase="installing",
        created=T0,
        stage_started=T0,
        events=2,
        nodes={n: NodeEntry(stage=0, assigned_at=T0, prior=prior if n == nodes[0] else None) for n in nodes},
    )
    value = msgspec.to_builtins(old)
    value["v"] = 1  # and none of the fields added since
    for field in ("parts", "written"):
        del value[field]
    for entry in value["nodes"].values():
        del entry["part"]
    kv = await RolloutStore(js).bucket()
    await kv.create(fleet, msgspec.json.encode(value))
    events = Events()
    controller = RolloutController(Assigner(js, registry), RolloutStore(js), events, fleets=[fleet])
    for node in nodes:
        controller.observe_status(_status(fleet, node, T0, model, 1), T0)
    await controller.step(T0 + 1)

    header = msgspec.json.decode((await kv.get(fleet)).value or b"")
    assert header["nodes"] == {}, "the nodes are still inside the one value"
    got = await RolloutStore(js).get(fleet)
    assert got is not None
    assert sorted(got[0].nodes) == nodes
    assert got[0].nodes[nodes[0]].prior == prior

    await RolloutStore(js).command(fleet, "abort")
    await controller.step(T0 + 2)
    got = await RolloutStore(js).get(fleet)
    assert got is not None
    assert (got[0].status, got[0].phase) == ("aborted", "done")
    own = await _own_keys(js, fleet)
    assert list(own) == [nodes[0]]
    assert own[nodes[0]].version == 1
    ((aborted, _),) = events.of("aborted")
    assert aborted.node_count == len(nodes)
