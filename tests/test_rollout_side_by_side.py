"""Rollouts of a model served side by side (issue 11): the rollout writes that model's
per-model keys (``<fleet>.<node>.<model>``, ``<fleet>._fleet.<model>``) and never the legacy
keys that name the nodes' default model; completing it pins the nodes whose runtime can run
no variant of the version, as a fleet-wide ``models assign`` does. Real KV and registry; the
controller is driven with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from _transformer import make_transformer_bundle
from fixtures.messages_06cfd20 import DeviceProfile as OldDevice
from fixtures.messages_06cfd20 import NodeStatus as OldStatus
from nats.js import JetStreamContext
from nats.js import errors as js_errors

from _edge_util import Keys
from _models import make_bundle
from _nats import wait_until
from slmops.cloud.registry import Registry
from slmops.cloud.rollout import Assigner, RolloutConfig, RolloutController, RolloutStore, start_rollout
from slmops.shared import names
from slmops.shared.bundle import TrustStore
from slmops.shared.capabilities import CAPABILITIES
from slmops.shared.messages import Assignment, DeviceProfile, ModelRef, NodeStatus, decode_json, encode_json

pytestmark = pytest.mark.anyio
T0 = 1_900_000_000.0


class _Events:
    async def __call__(self, *_: object) -> None:
        return None


async def test_a_side_by_side_rollout_writes_per_model_keys_and_pins_nodes_that_cannot_run_it(
    js: JetStreamContext, tmp_path: Path, fleet: str
) -> None:
    keys = Keys(tmp_path / "keys")
    registry = Registry(js)
    trust = TrustStore([keys.key.public_key()])
    default, beside = f"d{fleet}", f"b{fleet}"
    await registry.push(make_bundle(tmp_path / "d1", keys.key, name=default, version=1), trust)
    await registry.push(make_bundle(tmp_path / "b1", keys.key, name=beside, version=1), trust)
    b2 = make_transformer_bundle(tmp_path / "b2", keys.key, name=beside, version=2)
    await registry.push(b2, trust)
    await registry.assign(fleet, 1, model=default)
    await registry.assign(fleet, 1, model=beside, side_by_side=True)
    now = datetime.fromtimestamp(T0, UTC)
    # "old": a 06cfd20 node (n-gram only: cannot run v2, a transformer); "new": this runtime.
    old = OldStatus(fleet=fleet, node="old", time=now, device=OldDevice(memory_mb=4096))
    await js.publish(names.status_subject(fleet, "old"), msgspec.json.encode(old))
    new = NodeStatus(
        fleet=fleet,
        node="new",
        time=now,
        device=DeviceProfile(memory_mb=4096, capabilities=CAPABILITIES),
        model=ModelRef(name=default, version=1),
        models=[ModelRef(name=default, version=1), ModelRef(name=beside, version=1)],
    )
    await js.publish(names.status_subject(fleet, "new"), encode_json(new))
    kv = await js.key_value(names.ASSIGNMENTS_BUCKET)

    async def value(key: str) -> Assignment | None:
        try:
            entry = await kv.get(key)
        except js_errors.KeyNotFoundError:
            return None
        return decode_json(entry.value or b"", Assignment) if entry.value else None

    store = RolloutStore(js)
    # Decided by itself: the fleet assigns this model side by side already.
    config = RolloutConfig(stages=[100], soak_s=60, min_samples=1)
    state = await start_rollout(
        js, registry, store, fleet=fleet, version=2, model=beside, config=config, now=T0
    )
    assert (state.side_by_side, state.previous_version) == (True, 1)

    assigner = Assigner(js, registry)
    controller = RolloutController(assigner, store, _Events(), fleets=[fleet])
    controller.observe_status(new)
    await controller.step(T0 + 1)
    got = await store.get(fleet)
    assert got is not None
    assert sorted(got[0].nodes) == ["new"]
    # The canary got the per-model key; the legacy keys (the default model) are untouched.
    mine = await value(names.assignment_key(fleet, "new", beside))
    assert mine is not None
    assert (mine.model, mine.version) == (beside, 2)
    assert await value(names.assignment_key(fleet, "new")) is None
    fleet_default = await value(names.assignment_key(fleet))
    assert fleet_default is not None
    assert (fleet_default.model, fleet_default.version) == (default, 1)

    # The canary serving v2 beside its default model counts as installed.
    controller.observe_status(
        msgspec.structs.replace(
            new,
            time=datetime.fromtimestamp(T0 + 2, UTC),
            models=[ModelRef(name=default, version=1), ModelRef(name=beside, version=2)],
        )
    )
    assert controller.nodes.installed(got[0]) == {"new"}
    # Its safety monitor takes the side-by-side model back to v1: a failure of the rollout.
    back = msgspec.structs.replace(
        new,
        time=datetime.fromtimestamp(T0 + 3, UTC),
        models=[ModelRef(name=default, version=1), ModelRef(name=beside, version=1)],
        previous_models=[ModelRef(name=beside, version=2)],
    )
    controller.observe_status(back)
    assert controller.nodes.failures(got[0]) == {"new": "rolled back on the node (local health limits)"}
    controller.observe_status(msgspec.structs.replace(back, time=datetime.fromtimestamp(T0 + 4, UTC)))

    # Completing: the fleet's per-model key names v2, the canary's own key is gone, the old
    # node is pinned on its per-model key to v1 (the newest it can run), and said so.
    notes = await assigner.complete(got[0])
    assert len(notes) == 1
    assert notes[0].startswith("node old: kept on v1 (fp32), the newest it can run; its runtime lacks ")
    fleet_beside = await value(names.assignment_key(fleet, None, beside))
    assert fleet_beside is not None
    assert (fleet_beside.model, fleet_beside.version) == (beside, 2)
    assert await value(names.assignment_key(fleet, "new", beside)) is None
    pinned = await value(names.assignment_key(fleet, "old", beside))
    assert pinned is not None
    assert (pinned.model, pinned.version) == (beside, 1)
    assert await value(names.assignment_key(fleet, "old")) is None  # its default model's key: untouched
    fleet_default = await value(names.assignment_key(fleet))
    assert fleet_default is not None
    assert (fleet_default.model, fleet_default.version) == (default, 1)


async def test_a_rollout_of_the_default_model_completes_with_capability_pinning(
    js: JetStreamContext, tmp_path: Path, fleet: str
) -> None:
    """The single-model path: completing a rollout pins an n-gram-only node to the newest
    version it can run (before, only ``models assign`` did, and a rollout left the old node
    offered a transformer it refuses)."""
    keys = Keys(tmp_path / "keys")
    registry = Registry(js)
    trust = TrustStore([keys.key.public_key()])
    model = f"m{fleet}"
    await registry.push(make_bundle(tmp_path / "m1", keys.key, name=model, version=1), trust)
    await registry.push(make_transformer_bundle(tmp_path / "m2", keys.key, name=model, version=2), trust)
    await registry.assign(fleet, 1, model=model)
    old = OldStatus(fleet=fleet, node="old", time=datetime.fromtimestamp(T0, UTC), device=OldDevice())
    await js.publish(names.status_subject(fleet, "old"), msgspec.json.encode(old))
    await wait_until(lambda: _has_status(registry, fleet, "old"), 10, what="the old node's status")
    store = RolloutStore(js)
    state = await start_rollout(
        js, registry, store, fleet=fleet, version=2, model=model, config=RolloutConfig(), now=T0
    )
    assert state.side_by_side is False
    notes = await Assigner(js, registry).complete(state)
    assert [n.split(";")[0] for n in notes] == ["node old: kept on v1 (fp32), the newest it can run"]
    kv = await js.key_value(names.ASSIGNMENTS_BUCKET)
    pinned = decode_json((await kv.get(names.assignment_key(fleet, "old"))).value or b"", Assignment)
    assert (pinned.model, pinned.version) == (model, 1)


async def _has_status(registry: Registry, fleet: str, node: str) -> bool:
    return await registry.latest_status(fleet, node) is not None
