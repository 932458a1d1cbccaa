"""The controller as a plain object with an injected clock (real KV and registry): timeouts are
driven by the time given to ``step``, not by waiting."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from _models import make_bundle
from _rollout import start_and_step
from slmops.cloud.registry import Registry
from slmops.cloud.rollout import Assigner, RolloutConfig, RolloutController, RolloutStore, start_rollout
from slmops.shared.bundle import TrustStore
from slmops.shared.messages import DeviceProfile, ModelRef, NodeStatus, RolloutEvent

T0 = 1_900_000_000.0
NODES = [f"c{i:02d}" for i in range(20)]


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, fleet: str, event: RolloutEvent, msg_id: str) -> None:
        self.seen.append((event.state, msg_id))

    @property
    def kinds(self) -> list[str]:
        return [k for k, _ in self.seen]


def _status(fleet: str, node: str, t: float, model: ModelRef, event: str = "periodic") -> NodeStatus:
    return NodeStatus(
        fleet=fleet,
        node=f"{fleet}-{node}",
        time=datetime.fromtimestamp(t, UTC),
        event=event,
        device=DeviceProfile(memory_mb=4096),
        model=model,
    )


@pytest.fixture
async def world(
    js: JetStreamContext, fleet: str, tmp_path: Path
) -> tuple[RolloutController, RolloutStore, Events, Registry, str]:
    key = Ed25519PrivateKey.generate()
    registry = Registry(js)
    model = f"ctl_{fleet}"
    for version in (1, 2):
        await registry.push(
            make_bundle(tmp_path / f"v{version}", key, version=version, name=model),
            TrustStore([key.public_key()]),
        )
    await registry.assign(fleet, 1, model=model)
    store, events = RolloutStore(js), Events()
    # Its own fleet only: the session server holds other tests' rollouts too.
    controller = RolloutController(Assigner(js, registry), store, events, fleets=[fleet])
    for node in NODES:
        controller.observe_status(_status(fleet, node, T0, ModelRef(name=model, version=1)))
    return controller, store, events, registry, model


@pytest.mark.anyio
async def test_a_stage_nobody_installs_is_rolled_back_after_the_install_timeout(
    js: JetStreamContext, fleet: str, world: tuple[RolloutController, RolloutStore, Events, Registry, str]
) -> None:
    controller, store, events, _, model = world
    config = RolloutConfig(install_timeout_s=60, soak_s=10)
    state = await start_and_step(js, controller, store, fleet=fleet, model=model, config=config, now=T0)
    assert (state.phase, len(state.nodes)) == ("installing", 1)
    (node,) = state.nodes
    assert await controller.assigner.current(fleet, node) is not None  # its own key: v2
    await controller.step(T0 + 30)
    got = await store.get(fleet)
    assert got is not None
    assert got[0].phase == "installing"
    await controller.step(T0 + 62)
    got = await store.get(fleet)
    assert got is not None
    assert (got[0].status, got[0].phase) == ("rolled_back", "done")
    assert "no node installed" in got[0].reason
    assert await controller.assigner.current(fleet, node) is None  # restored: the fleet key again
    assert events.kinds == ["started", "stage_started", "gate_failed", "rolled_back"]
    assert len({msg_id for _, msg_id in events.seen}) == 4


@pytest.mark.anyio
async def test_too_few_samples_pause_the_rollout_for_a_person_instead_of_passing(
    js: JetStreamContext, fleet: str, world: tuple[RolloutController, RolloutStore, Events, Registry, str]
) -> None:
    controller, store, events, _, model = world
    config = RolloutConfig(soak_s=10, sample_timeout_s=300, min_samples=200)
    state = await start_and_step(js, controller, store, fleet=fleet, model=model, config=config, now=T0)
    (node,) = state.nodes
    controller.observe_status(
        _status(
            fleet, node.removeprefix(f"{fleet}-"), T0 + 2, ModelRef(name=model, version=2), "model_installed"
        )
    )
    await controller.step(T0 + 3)
    got = await store.get(fleet)
    assert got is not None
    assert got[0].phase == "soaking"
    await controller.step(T0 + 100)  # soaked, but no telemetry: the gates wait
    got = await store.get(fleet)
    assert got is not None
    assert (got[0].status, got[0].stage) == ("running", 0)
    await controller.step(T0 + 400)
    got = await store.get(fleet)
    assert got is not None
    assert got[0].status == "paused"
    assert "too few samples" in got[0].reason
    assert got[0].gates["error_rate"]["outcome"] == "waiting"  # type: ignore[index]
    await store.command(fleet, "resume")
    await controller.step(T0 + 401)
    got = await store.get(fleet)
    assert got is not None
    assert (got[0].status, got[0].soak_started) == ("running", T0 + 401)
    assert events.kinds == ["started", "stage_started", "paused", "resumed"]


@pytest.mark.anyio
async def test_a_controller_limited_to_some_fleets_leaves_the_others_rollouts_alone(
    js: JetStreamContext, fleet: str, world: tuple[RolloutController, RolloutStore, Events, Registry, str]
) -> None:
    """`slmops cloud --fleet A` runs A's rollouts only: a rollout of fleet B in the same
    bucket is neither advanced nor announced by A's controller."""
    controller, store, events, registry, model = world
    other = f"{fleet}b"
    await registry.assign(other, 1, model=model)
    for f in (fleet, other):
        await start_rollout(js, registry, store, fleet=f, version=2, model=model,
                            config=RolloutConfig(install_timeout_s=60), now=T0)  # fmt: skip
    before = await store.get(other)
    assert before is not None
    await controller.step(T0 + 1)
    mine, theirs = await store.get(fleet), await store.get(other)
    assert mine is not None
    assert theirs is not None
    assert mine[0].phase == "installing"  # advanced
    assert theirs == before  # untouched: same state, same revision
    assert events.kinds == ["started", "stage_started"]
    assert all(msg_id.startswith(mine[0].id) for _, msg_id in events.seen)
