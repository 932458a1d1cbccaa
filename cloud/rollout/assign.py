"""What a rollout writes into KV ``slmops_assignments``, and how a rollout is started.

A rollout gives each cohort node a key of its own (``<fleet>.<node>``), which overrides the
fleet-wide key. Rolling back restores each node's key to what it was before the rollout —
deleted when the node followed the fleet-wide key — so nothing is left pinned. Completing
writes the fleet-wide key and then deletes the nodes' own keys (they already run the version
the fleet key now names, so nothing moves), then pins the nodes whose runtime can run no
variant of the version to the newest earlier one they can (``Registry.pin_incapable``, as a
fleet-wide ``models assign`` does).

A rollout of a model served side by side (``RolloutState.side_by_side``) does the same on that
model's per-model keys (``<fleet>.<node>.<model>``, ``<fleet>._fleet.<model>``), so the nodes'
default model is never touched.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping

import anyio
import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from slmops.cloud.config import RolloutConfig
from slmops.cloud.registry import Registry, RegistryError
from slmops.cloud.rollout.state import RolloutError, RolloutState, RolloutStore
from slmops.shared import names
from slmops.shared.jetstream import nats_errors
from slmops.shared.kv import kv_get
from slmops.shared.messages import Assignment, DeviceProfile, ModelManifest, decode_json, encode_json
from slmops.shared.variants import PREFERENCE, choose_fitting

__all__ = ["Assigner", "DeviceUnfit", "start_rollout", "variants_of"]

log = structlog.get_logger(__name__)


class DeviceUnfit(RolloutError):
    """No variant of the rollout's version fits a node's device profile (device-fit gate)."""

    def __init__(self, fleet: str, node: str, why: str) -> None:
        self.node = node
        self.why = why
        super().__init__(fleet, f"node {node!r}: no variant fits its device profile: {why}")


class Assigner:
    """Node and fleet assignment writes for rollouts, through ``Registry.assign``."""

    def __init__(self, js: JetStreamContext, registry: Registry, *, url: str = "<nats>") -> None:
        self._js = js
        self.registry = registry
        self._url = url
        self._kv: KeyValue | None = None
        self._manifests: dict[tuple[str, int], dict[str, ModelManifest]] = {}

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            with nats_errors("kv bucket", names.ASSIGNMENTS_BUCKET, self._url), anyio.fail_after(10):
                self._kv = await self._js.key_value(names.ASSIGNMENTS_BUCKET)
        return self._kv

    async def current(self, fleet: str, node: str | None, model: str | None = None) -> Assignment | None:
        """The assignment under the node's own key (or the fleet-wide key when None); with
        ``model``, under its per-model key (models side by side)."""
        kv = await self._bucket()
        key = names.assignment_key(fleet, node, model)
        entry = await kv_get(kv, key, self._url)
        if entry is None:
            return None
        try:
            return decode_json(entry.value or b"", Assignment)
        except msgspec.DecodeError as exc:
            log.warning("assignment_undecodable", key=key, error=str(exc))
            return None

    async def variant_manifests(self, model: str, version: int) -> dict[str, ModelManifest]:
        """The manifests of a version by variant (cached: versions are immutable)."""
        key = (model, version)
        if key not in self._manifests:
            found = await variants_of(self.registry, model, version)
            if not found:
                return {}
            self._manifests[key] = found
        return self._manifests[key]

    async def assign_node(self, state: RolloutState, node: str, device: DeviceProfile | None) -> str | None:
        """Give ``node`` the rollout's version, in the variant its device profile calls for:
        the one made for its profile, else by memory (None when its device is unknown: the
        node then picks by the same rule), never one whose measured figures break its
        profile's budgets (``shared.variants.device_fit``). Raises ``DeviceUnfit`` naming why
        when no variant fits the node (nothing is written then)."""
        manifests = await self.variant_manifests(state.model, state.version)
        variant: str | None = None
        if manifests and device is not None:
            variant, unfit = choose_fitting(manifests, device)
            if variant is None:
                raise DeviceUnfit(state.fleet, node, "; ".join(unfit[v] for v in sorted(unfit)))
        await self.registry.assign(
            state.fleet,
            state.version,
            model=state.model,
            node=node,
            variant=variant,
            side_by_side=state.side_by_side,
        )
        return variant

    async def restore_node(
        self, fleet: str, node: str, prior: Assignment | None, model: str | None = None
    ) -> None:
        """Put back the node's own key (with ``model``: its per-model key) as it was before
        the rollout (delete it if none)."""
        kv = await self._bucket()
        key = names.assignment_key(fleet, node, model)
        with nats_errors("kv key", key, self._url), anyio.fail_after(10):
            if prior is None:
                await kv.delete(key)
            else:
                await kv.put(key, encode_json(prior))
        log.info("assignment_restored", key=key, version=None if prior is None else prior.version)

    async def complete(self, state: RolloutState) -> list[str]:
        """Fleet-wide key to the new version, then the nodes' own keys removed — except on
        nodes that failed the version (``state.failures``): they keep a key of their own
        naming what they ran before, so the fleet-wide key does not offer it to them again
        (``slmops rollout status`` lists them; assigning them by hand clears it); so do the
        nodes the device-fit gate left out (``state.unfit``). Then the
        fleet's nodes whose runtime can run no variant of the version are pinned to the
        newest earlier one they can (``Registry.pin_incapable``); returns its notes."""
        sbs = state.side_by_side
        key_model = state.model if sbs else None
        await self.registry.assign(state.fleet, state.version, model=state.model, side_by_side=sbs)
        for node, entry in sorted(state.nodes.items()):
            if node not in state.failures:
                await self.restore_node(state.fleet, node, None, key_model)
            elif entry.prior is not None:
                await self.restore_node(state.fleet, node, entry.prior, key_model)
            elif state.previous_version is not None:
                await self.registry.assign(
                    state.fleet, state.previous_version, model=state.model, node=node, side_by_side=sbs
                )
        for node in sorted(state.unfit):  # the device-fit gate kept the version from them
            own = await self.current(state.fleet, node, key_model)
            if own is None and state.previous_version is not None:
                try:
                    await self.registry.assign(
                        state.fleet, state.previous_version, model=state.model, node=node, side_by_side=sbs
                    )
                except RegistryError as exc:  # the previous version does not fit it either
                    log.warning("rollout_unfit_not_pinned", fleet=state.fleet, node=node, reason=exc.reason)
        notes = await self.registry.pin_incapable(state.fleet, state.model, state.version, side_by_side=sbs)
        for note in notes:
            log.warning("rollout_node_pinned", fleet=state.fleet, rollout=state.id, note=note)
        return notes


async def variants_of(registry: Registry, model: str, version: int) -> dict[str, ModelManifest]:
    """The manifests of a version by variant. The usual variants are read by key first: a
    listing of the manifest bucket (``Registry.variants``) was seen to come back short while
    the bucket was busy, and a rollout must not be refused for that."""
    found: dict[str, ModelManifest] = {}
    for variant in PREFERENCE:
        m = await registry.manifest(model, version, variant)
        if m is not None:
            found[variant] = m
    # Variants made per device profile (``<profile>``, ``models optimize``) have no usual
    # name: the listing adds them (when it comes back short, the usual ones are still there).
    return {**await registry.variants(model, version), **found}


async def start_rollout(
    js: JetStreamContext,
    registry: Registry,
    store: RolloutStore,
    *,
    fleet: str,
    version: int,
    model: str | None = None,
    config: RolloutConfig | None = None,
    now: float | None = None,
    extra: Mapping[str, str] | None = None,
    side_by_side: bool | None = None,
) -> RolloutState:
    """Validate and record a new rollout for a controller to drive. ``side_by_side``: roll
    out on the model's per-model keys (``RolloutState.side_by_side``); None = decide: yes when
    the fleet already has a per-model key for the model, or its legacy fleet key names
    another model. Raises ``RolloutError`` (active rollout, unknown version) or
    ``NatsUnavailable``."""
    names.validate_id(fleet, "fleet")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive int, got {version!r}")
    assigner = Assigner(js, registry)
    fleet_wide = await assigner.current(fleet, None)
    if model is None:
        if fleet_wide is not None:
            model = fleet_wide.model
        else:
            models = sorted({m.name for m in await registry.manifests()})
            if len(models) != 1:
                raise RolloutError(fleet, f"the registry holds models {models}; name one with --model")
            model = models[0]
    names.validate_model_name(model)
    try:
        variants = await variants_of(registry, model, version)
    except RegistryError as exc:
        raise RolloutError(fleet, exc.reason) from exc
    if not variants:
        raise RolloutError(fleet, f"{model!r} version {version} is not in the registry (push it first)")
    yank = await registry.yanked(model, version)
    if yank is not None:
        raise RolloutError(fleet, f"{model!r} version {version} was yanked ({yank.reason}): roll out another")
    per_model = await assigner.current(fleet, None, model)
    if side_by_side is None:
        side_by_side = per_model is not None or (fleet_wide is not None and fleet_wide.model != model)
    if side_by_side:
        previous = per_model.version if per_model is not None and per_model.model == model else None
    else:
        previous = fleet_wide.version if fleet_wide is not None and fleet_wide.model == model else None
    if previous == version:
        raise RolloutError(fleet, f"the fleet already runs {model!r} version {version}")
    t = time.time() if now is None else now
    state = RolloutState(
        id=f"{fleet}-{model.replace('.', '_')}-v{version}-{secrets.token_hex(3)}",
        fleet=fleet,
        model=model,
        version=version,
        previous_version=previous,
        side_by_side=side_by_side,
        config=config or RolloutConfig(),
        created=t,
        stage_started=t,
        updated=t,
        reason=", ".join(f"{k}={v}" for k, v in (extra or {}).items()),
    )
    await store.create(state)
    where = {"fleet": fleet, "rollout": state.id, "side_by_side": side_by_side}
    log.info("rollout_created", model=model, version=version, previous=previous, **where)
    return state
