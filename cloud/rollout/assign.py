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

Per-node work is batched (issue 18: a rollout of 10,000 nodes): what to restore is read from
the keys that exist only (one listing), assignments are planned without I/O from the nodes'
statuses (``cloud.registry.node_assignment``) and written ``PARALLEL`` at a time.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import anyio
import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from slmops.cloud.config import RolloutConfig
from slmops.cloud.registry import Registry, RegistryError, node_assignment
from slmops.cloud.rollout.state import RolloutError, RolloutState, RolloutStore, bounded
from slmops.shared import names
from slmops.shared.jetstream import nats_errors
from slmops.shared.kv import kv_get, kv_keys
from slmops.shared.messages import (
    Assignment,
    ModelManifest,
    NodeStatus,
    decode_json,
    encode_json,
)
from slmops.shared.variants import PREFERENCE, choose_fitting

__all__ = ["Assigner", "start_rollout", "variants_of"]

log = structlog.get_logger(__name__)


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

    async def priors(self, state: RolloutState, nodes: Iterable[str]) -> dict[str, Assignment]:
        """The own assignments (per-model ones for a side-by-side rollout) of those of
        ``nodes`` that have one: the keys are listed once and only existing ones are read,
        ``PARALLEL`` at a time. A value that does not decode counts as none."""
        model = _key_model(state)
        pattern = f"{state.fleet}.*" if model is None else f"{state.fleet}.*.{model}"
        await self._bucket()
        with nats_errors("kv bucket", names.ASSIGNMENTS_BUCKET, self._url), anyio.fail_after(30):
            existing = set(await kv_keys(self._js, names.ASSIGNMENTS_BUCKET, pattern))
        found: dict[str, Assignment] = {}

        async def read(node: str) -> None:
            got = await self.current(state.fleet, node, model)
            if got is not None:
                found[node] = got

        wanted = [n for n in nodes if names.assignment_key(state.fleet, n, model) in existing]
        await bounded(wanted, read)
        return found

    async def plan(
        self, state: RolloutState, nodes: Mapping[str, tuple[NodeStatus | None, str | None]]
    ) -> tuple[dict[str, Assignment], dict[str, str]]:
        """What to write for each node (node -> ``(last status or None, variant asked or
        None)``), without writing: ``(assignments, unfit)``, ``unfit`` naming why a node can
        have no variant of the version (its device profile: the device-fit gate; or its
        runtime). A node's variant is the one asked, else the one made for its profile, else
        by memory, never one whose measured figures break its profile's budgets
        (``shared.variants.device_fit``); None when its device is unknown (the node then
        picks by the same rule). Raises ``RegistryError`` when the version was yanked."""
        manifests = await self.variant_manifests(state.model, state.version)
        if not manifests:
            raise RolloutError(
                state.fleet, f"{state.model!r} v{state.version} has no manifest in the registry"
            )
        yank = await self.registry.yanked(state.model, state.version)
        if yank is not None:
            raise RegistryError(
                "assign", f"{state.model!r} version {state.version} was yanked ({yank.reason})"
            )
        planned: dict[str, Assignment] = {}
        unfit: dict[str, str] = {}
        now = datetime.now(UTC)
        for node, (status, variant) in nodes.items():
            if variant is None and status is not None:
                variant, why = choose_fitting(manifests, status.device)
                if variant is None:
                    unfit[node] = "device fit: " + "; ".join(why[v] for v in sorted(why))
                    continue
            try:
                planned[node] = node_assignment(
                    state.fleet, node, state.model, state.version, variant, manifests, status, now
                )
            except RegistryError as exc:  # its runtime runs no variant: left out like an unfit one
                unfit[node] = exc.reason
        return planned, unfit

    async def write(self, state: RolloutState, assignments: Mapping[str, Assignment]) -> None:
        """Write each node's assignment under its own key, ``PARALLEL`` at a time."""
        model = _key_model(state)
        await self.put_many({names.assignment_key(state.fleet, n, model): a for n, a in assignments.items()})
        log.info("assignments_written", fleet=state.fleet, rollout=state.id, nodes=len(assignments))

    async def put_many(self, values: Mapping[str, Assignment | None]) -> None:
        """Write (None: delete) each key of the assignments bucket, ``PARALLEL`` at a time."""
        kv = await self._bucket()

        async def put(key: str) -> None:
            value = values[key]
            with nats_errors("kv key", key, self._url), anyio.fail_after(10):
                if value is None:
                    await kv.delete(key)
                else:
                    await kv.put(key, encode_json(value))

        await bounded(sorted(values), put)

    async def restore(self, state: RolloutState, nodes: Iterable[str]) -> None:
        """Put back each node's own key as it was before the rollout (``state.nodes[node]
        .prior``; deleted if none), ``PARALLEL`` at a time."""
        model = _key_model(state)
        values = {names.assignment_key(state.fleet, n, model): state.nodes[n].prior for n in nodes}
        await self.put_many(values)
        log.info("assignments_restored", fleet=state.fleet, rollout=state.id, nodes=len(values))

    async def restore_node(
        self, fleet: str, node: str, prior: Assignment | None, model: str | None = None
    ) -> None:
        """Put back the node's own key (with ``model``: its per-model key) as it was before
        the rollout (delete it if none)."""
        key = names.assignment_key(fleet, node, model)
        await self.put_many({key: prior})
        log.info("assignment_restored", key=key, version=None if prior is None else prior.version)

    async def complete(
        self, state: RolloutState, statuses: Mapping[str, NodeStatus] | None = None
    ) -> list[str]:
        """Fleet-wide key to the new version, then the nodes' own keys removed — except on
        nodes that failed the version (``state.failures``): they keep a key of their own
        naming what they ran before, so the fleet-wide key does not offer it to them again
        (``slmops rollout status`` lists them; assigning them by hand clears it); so do the
        nodes the device-fit gate left out (``state.unfit``). Then the
        fleet's nodes whose runtime can run no variant of the version are pinned to the
        newest earlier one they can (``Registry.pin_incapable``; ``statuses``: the fleet's
        last statuses by node, when the caller has them: then none is read); returns its notes."""
        sbs = state.side_by_side
        key_model = state.model if sbs else None
        await self.registry.assign(state.fleet, state.version, model=state.model, side_by_side=sbs)
        keys: dict[str, Assignment | None] = {}
        for node, entry in state.nodes.items():
            if node not in state.failures:
                keys[names.assignment_key(state.fleet, node, key_model)] = None
            elif entry.prior is not None:
                keys[names.assignment_key(state.fleet, node, key_model)] = entry.prior
        await self.put_many(keys)
        for node, entry in sorted(state.nodes.items()):
            if node in state.failures and entry.prior is None and state.previous_version is not None:
                await self.registry.assign(
                    state.fleet, state.previous_version, model=state.model, node=node, side_by_side=sbs
                )
        own = await self.priors(state, state.unfit)
        for node in sorted(state.unfit):  # the device-fit gate kept the version from them
            if node not in own and state.previous_version is not None:
                try:
                    await self.registry.assign(
                        state.fleet, state.previous_version, model=state.model, node=node, side_by_side=sbs
                    )
                except RegistryError as exc:  # the previous version does not fit it either
                    log.warning("rollout_unfit_not_pinned", fleet=state.fleet, node=node, reason=exc.reason)
        notes = await self.registry.pin_incapable(
            state.fleet, state.model, state.version, side_by_side=sbs, statuses=statuses
        )
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
    if config is not None and config.min_quality is not None:
        # The quality gate could only fail (after installing on the canaries): refuse now.
        lacking = sorted(v for v, m in variants.items() if m.generation is None or not m.generation.quality)
        if lacking:
            raise RolloutError(
                fleet,
                f"--min-quality needs a quality set (prompts with expected answers) in every variant "
                f"of {model!r} version {version}; {', '.join(lacking)} "
                f"{'has' if len(lacking) == 1 else 'have'} none (only generation bundles carry one)",
            )
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


def _key_model(state: RolloutState) -> str | None:
    """The model whose per-model keys the rollout writes, or None for the legacy keys."""
    return state.model if state.side_by_side else None
