"""Assignment by device profile and the device-fit gate (issue 12, fleet side): a node reports
its profile; the cloud assigns it the variant ``models optimize`` made for that profile
(``<profile>``), else one by memory; a variant whose figures measured in the device lab break
the node's profile budgets is never assigned to it — refused with the reason when asked for by
name, left out of a rollout (``RolloutState.unfit``, with the reason) and kept on what it ran
when the rollout completes. Real KV, registry and JetStream statuses; the controller runs on
an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from _models import make_bundle
from slmops.cloud.registry import Registry, RegistryError
from slmops.cloud.rollout import Assigner, RolloutConfig, RolloutController, RolloutStore, start_rollout
from slmops.shared import names
from slmops.shared.bundle import Bundle, TrustStore, write_bundle
from slmops.shared.capabilities import CAPABILITIES
from slmops.shared.messages import (
    Assignment,
    DeviceProfile,
    NodeStatus,
    Optimization,
    decode_json,
    encode_json,
)
from slmops.shared.variants import choose_variant, device_fit

T0 = 1_900_000_000.0
#: What a node configured with deploy/profiles/till.toml / tablet.toml reports.
TILL = DeviceProfile(
    memory_mb=512, profile="till", model_memory_mb=256, latency_factor=0.25, capabilities=CAPABILITIES
)
TABLET = DeviceProfile(
    memory_mb=1024, profile="tablet", model_memory_mb=512, latency_factor=0.5, capabilities=CAPABILITIES
)


def _variant(
    out: Path, key: Ed25519PrivateKey, name: str, version: int, variant: str, *, rss: float, ratio: float
) -> Bundle:
    """A signed bundle as ``models optimize`` writes one for profile ``variant``: its lab
    figures in ``manifest.optimization`` and ``min_memory_mb`` from the peak RSS."""
    b = make_bundle(out, key, name=name, version=version, variant=variant)
    record = Optimization(profile=variant, candidate="int8-l3", peak_rss_mb=rss, latency_ratio=ratio)
    manifest = msgspec.structs.replace(b.manifest, optimization=record, min_memory_mb=int(rss * 1.5))
    return write_bundle(out, b.model_path.read_bytes(), manifest, key)


def test_the_variant_made_for_a_profile_is_chosen_and_measured_figures_decide_fit(tmp_path: Path) -> None:
    needs = {"fp32": 352, "int8": 288, "till": 200}
    assert choose_variant(needs, TILL) == "till"
    assert choose_variant(needs, TABLET) == "fp32"  # no tablet variant: by memory, as before
    small = msgspec.structs.replace(TILL, memory_mb=150)
    assert choose_variant(needs, small) == "till"  # nothing fits: the smallest (refused on the node)
    assert choose_variant({"fp32": 352, "till": 600}, TILL) == "fp32"  # its variant must fit memory

    key = Ed25519PrivateKey.generate()
    till = _variant(tmp_path / "till", key, "m", 1, "till", rss=200, ratio=0.2).manifest
    slow = _variant(tmp_path / "tab", key, "m", 1, "tablet", rss=300, ratio=0.7).manifest
    assert device_fit(till, TILL) is None
    assert device_fit(slow, TABLET) == (
        "variant 'tablet' (measured for profile 'tablet'): p95 0.7x L6 fp32's over profile "
        "'tablet''s 0.5x budget"
    )
    # Memory is judged whatever profile measured it; latency only under the node's own.
    assert device_fit(slow, TILL) == (
        "variant 'tablet' (measured for profile 'tablet'): peak RSS 300 MB over profile "
        "'till''s 256 MB budget"
    )
    assert device_fit(till, TABLET) is None
    # Nothing measured, or a node without a profile: no verdict.
    assert device_fit(msgspec.structs.replace(slow, optimization=None), TABLET) is None
    assert device_fit(slow, DeviceProfile(memory_mb=1024)) is None


async def _status(js: JetStreamContext, fleet: str, node: str, device: DeviceProfile) -> NodeStatus:
    status = NodeStatus(fleet=fleet, node=node, time=datetime.fromtimestamp(T0, UTC), device=device)
    await js.publish(names.status_subject(fleet, node), encode_json(status))
    return status


@pytest.mark.anyio
async def test_assignment_by_profile_and_the_device_fit_gate_in_a_rollout(
    js: JetStreamContext, tmp_path: Path, fleet: str
) -> None:
    key = Ed25519PrivateKey.generate()
    trust = TrustStore([key.public_key()])
    registry = Registry(js)
    model = f"p{fleet}"
    await registry.push(make_bundle(tmp_path / "v1", key, name=model, version=1), trust)
    # v1 also has a variant per profile; the tablet's breaks the tablet's latency budget.
    await registry.push(_variant(tmp_path / "v1t", key, model, 1, "till", rss=200, ratio=0.2), trust)
    await registry.push(_variant(tmp_path / "v1b", key, model, 1, "tablet", rss=300, ratio=0.7), trust)
    await registry.assign(fleet, 1, model=model)
    statuses = {n: await _status(js, fleet, n, d) for n, d in (("t1", TILL), ("b1", TABLET))}

    # Node-specific assignment: the till gets its own variant; the tablet's own variant is
    # refused by name with the measured reason, and it is given another that fits.
    assert (await registry.assign(fleet, 1, model=model, node="t1")).variant == "till"
    with pytest.raises(RegistryError, match=r"node 'b1' does not fit .* p95 0\.7x L6 fp32's over"):
        await registry.assign(fleet, 1, model=model, node="b1", variant="tablet")
    # Of what fits, by memory as before: the till's variant (300 MB) over fp32 (0: unknown).
    assert (await registry.assign(fleet, 1, model=model, node="b1")).variant == "till"
    kv = await js.key_value(names.ASSIGNMENTS_BUCKET)
    for node in ("t1", "b1"):
        await kv.delete(names.assignment_key(fleet, node))

    # v2: both profile variants are over the till's 256 MB; the tablet fits its own.
    await registry.push(_variant(tmp_path / "v2t", key, model, 2, "till", rss=300, ratio=0.2), trust)
    await registry.push(_variant(tmp_path / "v2b", key, model, 2, "tablet", rss=400, ratio=0.4), trust)
    store = RolloutStore(js)
    await start_rollout(
        js, registry, store, fleet=fleet, version=2, model=model, config=RolloutConfig(stages=[100]), now=T0
    )
    assigner = Assigner(js, registry)
    controller = RolloutController(assigner, store, _Events(), fleets=[fleet])
    for status in statuses.values():
        controller.observe_status(status)
    await controller.step(T0 + 1)
    got = await store.get(fleet)
    assert got is not None
    state = got[0]
    assert sorted(state.nodes) == ["b1"]
    assert state.nodes["b1"].variant == "tablet"
    assert state.failures == {}  # left out is not failed: the install gate does not count it
    assert list(state.unfit) == ["t1"]
    assert state.unfit["t1"].startswith(
        "device fit: variant 'tablet' (measured for profile 'tablet'): peak RSS"
    )
    assert (
        "variant 'till' (measured for profile 'till'): peak RSS 300 MB over profile 'till''s 256 MB"
        in (state.unfit["t1"])
    )
    assert (await kv.get(names.assignment_key(fleet, "b1"))).value is not None
    with pytest.raises(Exception, match="not found"):
        await kv.get(names.assignment_key(fleet, "t1"))
    await controller.step(T0 + 2)  # a later step does not take the till in again
    got = await store.get(fleet)
    assert got is not None
    assert sorted(got[0].nodes) == ["b1"]

    # Completing: the fleet key names v2; the till keeps v1 on a key of its own.
    await assigner.complete(got[0])
    fleet_wide = decode_json((await kv.get(names.assignment_key(fleet))).value or b"", Assignment)
    assert fleet_wide.version == 2
    pinned = decode_json((await kv.get(names.assignment_key(fleet, "t1"))).value or b"", Assignment)
    assert (pinned.version, pinned.variant) == (1, "till")


class _Events:
    async def __call__(self, *_: object) -> None:
        return None
