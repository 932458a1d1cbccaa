"""The closed loop on the factory's real model: a label shift in the traffic → the cloud's
prior estimate (EM on predicted-class counts, as in a drift event) → a recalibrated, signed,
pushed version → a rollout (policy auto) or a named proposal (policy suggest) — and on the
shifted traffic the recalibrated version's accuracy, against labels the test knows, comes back
to within 2 points of the accuracy before the shift."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import numpy as np
import numpy.typing as npt
import pytest
from _cloud_util import opened_event
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.js import JetStreamContext

from _nats import read_json, wait_until
from slmops.cloud.drift.labelshift import confusion_matrix, em_priors
from slmops.cloud.factory.build import build, factory_split
from slmops.cloud.factory.quantize import quantize
from slmops.cloud.recalibration.loop import KeyFileError, RecalibrationLoop, load_cloud_key, run_loop
from slmops.cloud.registry import Registry
from slmops.cloud.rollout import RolloutConfig, RolloutState, RolloutStore
from slmops.shared import names
from slmops.shared.bundle import Bundle, TrustStore, new_keypair, read_bundle, unpack_archive
from slmops.shared.messages import DriftEvent, ModelManifest, ModelRef, encode_json
from slmops.shared.runtime import load_session

#: The shift: half the traffic becomes "science" (held-out recall ≈ 0.4), the other half keeps
#: the reference mix. Seeded, so the figures below are reproducible.
SHIFT_CLASS = "science"
N_SHIFTED = 3000


@dataclass
class Scenario:
    bundle: Bundle
    int8: Bundle
    key: Ed25519PrivateKey
    texts: list[str]
    truth: npt.NDArray[np.int64]
    shifted: npt.NDArray[np.int64]  # indices into texts


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    key = Ed25519PrivateKey.generate()
    model = f"topics_{uuid.uuid4().hex[:6]}"
    report = build(tmp_path_factory.mktemp("factory") / "v1", key, name=model, seed=0)
    split = factory_split(report.bundle.manifest)
    assert split is not None
    truth = np.asarray(split.held_out_labels)
    labels = report.bundle.manifest.labels
    prior = np.bincount(truth, minlength=len(labels)) / len(truth)
    target = 0.5 * prior
    target[labels.index(SHIFT_CLASS)] += 0.5
    rng = np.random.default_rng(7)
    shifted = np.concatenate(
        [
            rng.choice(np.flatnonzero(truth == k), size=round(N_SHIFTED * target[k]), replace=True)
            for k in range(len(labels))
        ]
    )
    int8 = quantize(
        report.bundle.path,
        tmp_path_factory.mktemp("factory") / "v1-int8",
        key,
        eval_texts=split.held_out_texts,
        held_out=(split.held_out_texts, split.held_out_labels),
    ).bundle
    return Scenario(report.bundle, int8, key, split.held_out_texts, truth, shifted)


def _accuracy(bundle: Bundle, s: Scenario, idx: npt.NDArray[np.int64] | None) -> float:
    session = load_session(bundle.model_path, bundle.manifest)
    idx = np.arange(len(s.texts)) if idx is None else idx
    probs, _ = session.probs([s.texts[i] for i in idx])
    return float((probs.argmax(axis=1) == s.truth[idx]).mean())


def _estimated_priors(s: Scenario) -> dict[str, float]:
    """What the drift detector puts in the event: EM on the predicted-class counts."""
    m = s.bundle.manifest
    assert m.reference is not None
    session = load_session(s.bundle.model_path, m)
    probs, _ = session.probs([s.texts[i] for i in s.shifted])
    counts = np.bincount(probs.argmax(axis=1), minlength=len(m.labels)).astype(float)
    joint = confusion_matrix(m.labels, m.reference.confusion, m.reference.accuracy)
    return dict(zip(m.labels, em_priors(list(counts), joint), strict=True))


def _event(fleet: str, manifest: ModelManifest, priors: dict[str, float]) -> DriftEvent:
    model = ModelRef(name=manifest.name, version=manifest.version)
    return opened_event(
        fleet, model, statistic="chi2_z", value=12.0, effect_size=0.3, estimated_priors=priors
    )


@pytest.fixture
async def fleet_on_v1(js: JetStreamContext, fleet: str, scenario: Scenario) -> AsyncIterator[Registry]:
    registry = Registry(js)
    for bundle in (scenario.bundle, scenario.int8):
        await registry.push(bundle, TrustStore([scenario.key.public_key()]))
    await registry.assign(fleet, 1, model=scenario.bundle.manifest.name)
    return registry


async def _fetch(js: JetStreamContext, m: ModelManifest, out: Path) -> Bundle:
    store = await js.object_store(names.MODELS_BUCKET)
    archive = out.with_suffix(".tar")
    with archive.open("wb") as f:
        await store.get(names.model_object_name(m.name, m.version, m.variant), writeinto=f)
    return unpack_archive(archive, out)


async def _drift_events(js: JetStreamContext, fleet: str, n: int) -> list[DriftEvent]:
    return await read_json(js, names.drift_subject(fleet), DriftEvent, n)


@pytest.mark.anyio
async def test_label_shift_becomes_a_recalibrated_rollout_that_restores_accuracy(
    js: JetStreamContext, fleet: str, scenario: Scenario, fleet_on_v1: Registry, tmp_path: Path
) -> None:
    registry = fleet_on_v1
    m1 = scenario.bundle.manifest
    before = _accuracy(scenario.bundle, scenario, None)
    shifted = _accuracy(scenario.bundle, scenario, scenario.shifted)
    priors = _estimated_priors(scenario)
    loop = RecalibrationLoop(js, scenario.key, policy="auto", rollout=RolloutConfig(soak_s=1))
    durable = f"loop_{fleet}"
    event = _event(fleet, m1, priors)
    async with anyio.create_task_group() as tg:
        await tg.start(lambda task_status: run_loop(js, loop, durable=durable, task_status=task_status))
        await js.publish(names.drift_subject(fleet), encode_json(event), headers={"Nats-Msg-Id": event.id})
        await wait_until(lambda: _has(registry, m1.name, 2), timeout=60, what="version 2 pushed")
        state = await _wait_rollout(RolloutStore(js), fleet)
        # The drift event is followed by one naming the proposed version and the rollout.
        original, follow = await _drift_events(js, fleet, 2)
        tg.cancel_scope.cancel()
    await js.delete_consumer(names.DRIFT_STREAM, durable)
    assert (state.version, state.previous_version, state.status) == (2, 1, "running")
    m2 = await registry.manifest(m1.name, 2, "fp32")
    assert m2 is not None
    assert m2.parent_version == 1
    assert m2.reference is not None
    assert m2.reference.priors[SHIFT_CLASS] == pytest.approx(priors[SHIFT_CLASS], abs=0.01)  # after the floor
    v2 = read_bundle((await _fetch(js, m2, tmp_path / "v2")).path)
    TrustStore([scenario.key.public_key()]).verify(v2.manifest)  # signed with the cloud's key
    recalibrated = _accuracy(v2, scenario, scenario.shifted)
    print(
        f"\naccuracy: before shift {before:.4f}, after shift {shifted:.4f}, "
        f"recalibrated on shifted traffic {recalibrated:.4f} "
        f"(estimated {SHIFT_CLASS} prior {priors[SHIFT_CLASS]:.3f}, true 0.5+)"
    )
    assert shifted < before - 0.05  # the shift really hurt
    assert recalibrated >= before - 0.02
    assert original.proposed_version is None
    assert (follow.id, follow.proposed_version) == (event.id, 2)
    assert state.id in follow.suggested_action


@pytest.mark.anyio
async def test_suggest_policy_proposes_without_rolling_out_and_only_once(
    js: JetStreamContext, fleet: str, scenario: Scenario, fleet_on_v1: Registry
) -> None:
    loop = RecalibrationLoop(js, scenario.key, policy="suggest")
    m1 = scenario.bundle.manifest
    event = _event(fleet, m1, _estimated_priors(scenario))
    first = await loop.on_drift(event)
    assert first is not None
    assert first.outcome == "suggested"
    assert first.variants == ["fp32", "int8"]  # every variant, so small devices get theirs
    int8 = await fleet_on_v1.manifest(m1.name, first.version, "int8")
    assert int8 is not None
    assert int8.min_memory_mb == scenario.int8.manifest.min_memory_mb
    assert int8.reference is not None
    assert int8.reference.priors["science"] == pytest.approx(first.priors["science"], abs=0.01)
    again = await loop.on_drift(event)  # redelivered or "updated": no second build
    assert again is not None
    assert again.version == first.version
    assert await RolloutStore(js).get(fleet) is None
    (follow,) = (await _drift_events(js, fleet, 1))[-1:]
    assert follow.proposed_version == first.version
    assert f"slmops rollout start --fleet {fleet}" in follow.suggested_action
    # Events that are not a fleet-wide prior shift are not the loop's business.
    node_event = _event(fleet, m1, {"science": 0.9})
    assert await loop.on_drift(msgspec.structs.replace(node_event, scope="node", node="n1")) is None
    assert await loop.on_drift(msgspec.structs.replace(node_event, signal="latency")) is None


@pytest.mark.anyio
async def test_drift_on_a_fresh_recalibration_waits_out_the_cooldown(
    js: JetStreamContext, fleet: str, scenario: Scenario, fleet_on_v1: Registry
) -> None:
    """A recalibrated version's reference comes from an estimate: drift seen on it right after
    its proposal must not chain into v3, v4...; once the cooldown is over it may."""
    m1 = scenario.bundle.manifest
    priors = _estimated_priors(scenario)
    first = await RecalibrationLoop(js, scenario.key, policy="suggest").on_drift(_event(fleet, m1, priors))
    assert first is not None
    await fleet_on_v1.assign(fleet, first.version, model=m1.name)
    m2 = await fleet_on_v1.manifest(m1.name, first.version, "fp32")
    assert m2 is not None
    on_v2 = _event(fleet, m2, {SHIFT_CLASS: 0.2})
    assert await RecalibrationLoop(js, scenario.key, policy="suggest").on_drift(on_v2) is None
    later = await RecalibrationLoop(js, scenario.key, policy="suggest", cooldown=0).on_drift(on_v2)
    assert later is not None
    assert (later.parent_version, later.version) == (first.version, first.version + 1)


def test_cloud_key_must_be_private_to_its_owner(tmp_path: Path) -> None:
    private, _ = new_keypair(tmp_path, "cloud")
    os.chmod(private, 0o600)
    load_cloud_key(private)
    os.chmod(private, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_cloud_key(private)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_cloud_key(tmp_path / "missing.key")


def test_a_public_key_given_as_the_cloud_key_is_named_as_such_not_chmod(tmp_path: Path) -> None:
    """The new-user try gave keys/slmops.pub (mode 644) and was told to chmod it first."""
    _, public = new_keypair(tmp_path, "cloud")
    os.chmod(public, 0o644)
    with pytest.raises(KeyFileError) as err:
        load_cloud_key(public)
    assert "chmod" not in str(err.value)
    assert "private key" in str(err.value).lower()


# -- helpers -------------------------------------------------------------------------------


async def _has(registry: Registry, model: str, version: int) -> bool:
    return bool(await registry.variants(model, version))


async def _wait_rollout(store: RolloutStore, fleet: str) -> RolloutState:
    found = []

    async def check() -> bool:
        got = await store.get(fleet)
        if got is not None:
            found.append(got[0])
        return got is not None

    await wait_until(check, timeout=30, what="rollout recorded")
    return found[-1]
