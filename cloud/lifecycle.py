"""A model version's life after push: show it, yank it, remove it (``slmops models show /
yank / rm``). Works on a ``Registry`` and the rollout store; the cloud service need not run.

Yank (``yank``): first the record ``_yanked.<model>.<version>`` (``registry.Yank``), so every
later ``assign`` of the version — by hand, by a rollout stage, by the recalibration loop — is
refused; then each running rollout of it is told to abort; then every assignment naming it
moves to the previous good version: the highest lower version of the model in the registry
that is not yanked itself (the node's own variant if that version has it). Nodes online switch
at once (they watch their keys); a node offline finds the new assignment when it reconnects
and never installs the yanked version again. With no previous good version the assignment keeps
naming the version with ``withdrawn`` set: nodes stop serving the model (its cache goes too)
and answer 503 ``no_model`` with the reason.

Nodes of releases before that field (``Assignment.withdrawn``, added 30 Nov 2026 in 45497a4;
the 06cfd20 release, for one) cannot honour it: they decode the assignment without the field
(wire messages ignore unknown fields) and read it as an assignment of the yanked version, so
one running it keeps serving it, and one running another version (say, offline during the
yank) downloads and installs it on reconnect — the bundle stays in the registry, only
``assign`` refuses it. Nothing the cloud can write stops them: after such a yank, find them in
``slmops fleet status`` (still on the version) and push and assign a fixed version, or stop
them. A yank that moves assignments to an earlier good version works on old nodes too (it is
a plain assignment). ``slmops models yank`` prints this when it withdraws.

Remove (``remove``): refused while an assignment or a running rollout names the version;
otherwise its manifests, bundle indexes and archives go, and each content-addressed file no
other bundle lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
from nats.js import JetStreamContext

from slmops.cloud.registry import Registry, RegistryError, Yank, yank_key
from slmops.shared import names
from slmops.shared.errors import NotFound
from slmops.shared.jetstream import nats_errors
from slmops.shared.kv import kv_values
from slmops.shared.messages import Assignment, BundleIndex, ModelManifest, decode_json, encode_json

__all__ = ["YankResult", "remove_version", "show_version", "yank_version"]


@dataclass
class YankResult:
    yank: Yank
    #: Assignment key -> the version it now names (None: deleted, no good version left).
    moved: dict[str, int | None] = field(default_factory=dict)
    #: Rollouts of the version that were told to abort.
    aborted: list[str] = field(default_factory=list)
    already: bool = False


async def _assignments(js: JetStreamContext) -> dict[str, Assignment]:
    values = await kv_values(js, names.ASSIGNMENTS_BUCKET)
    out = {}
    for key, value in values.items():
        try:
            out[key] = decode_json(value, Assignment)
        except msgspec.DecodeError:
            continue
    return out


async def _versions(registry: Registry, model: str) -> dict[int, dict[str, ModelManifest]]:
    found: dict[int, dict[str, ModelManifest]] = {}
    for m in await registry.manifests():
        if m.name == model:
            found.setdefault(m.version, {})[m.variant] = m
    return found


async def _require(registry: Registry, model: str, version: int) -> dict[int, dict[str, ModelManifest]]:
    names.validate_model_name(model)
    versions = await _versions(registry, model)
    if version not in versions:
        have = sorted(versions)
        raise RegistryError(
            "look-up", f"{model!r} version {version} is not in the registry (versions: {have})"
        )
    return versions


async def _active_rollouts(js: JetStreamContext, url: str, model: str, version: int) -> list[str]:
    from slmops.cloud.rollout import RolloutStore

    store = RolloutStore(js, url=url)
    headers = await store.all(parts=False)
    return [s.fleet for s, _ in headers if s.active and s.model == model and s.version == version]


async def yank_version(
    js: JetStreamContext, registry: Registry, model: str, version: int, *, reason: str, url: str = "<nats>"
) -> YankResult:
    """Yank ``model`` ``version`` (module docstring). Yanking it again re-applies the moves
    (``already`` is then True). Raises ``RegistryError`` for a version not in the registry."""
    from slmops.cloud.rollout import RolloutError, RolloutStore

    versions = await _require(registry, model, version)
    previous = await registry.yanked(model, version)
    good = None
    for v in sorted((v for v in versions if v < version), reverse=True):
        if await registry.yanked(model, v) is None:
            good = v
            break
    yank = Yank(model=model, version=version, reason=reason, at=datetime.now(UTC))
    kv = await js.key_value(names.MODELS_MANIFEST_BUCKET)
    await kv.put(yank_key(model, version), msgspec.json.encode(yank))  # from now on assign refuses it
    result = YankResult(yank=yank, already=previous is not None)
    store = RolloutStore(js, url=url)
    for fleet in await _active_rollouts(js, url, model, version):
        try:
            await store.command(fleet, "abort")
            result.aborted.append(fleet)
        except RolloutError:
            pass  # it ended meanwhile
    assignments_kv = await js.key_value(names.ASSIGNMENTS_BUCKET)
    for key, a in sorted((await _assignments(js)).items()):
        if a.model != model or a.version != version:
            continue
        if good is None:
            why = f"{model} v{version} was yanked ({reason}) and no earlier good version exists"
            withdrawn = msgspec.structs.replace(a, withdrawn=why, assigned_at=datetime.now(UTC))
            await assignments_kv.put(key, encode_json(withdrawn))
            result.moved[key] = None
            continue
        variant = a.variant if a.variant in versions[good] else None
        await registry.assign(a.fleet, good, model=model, node=a.node, variant=variant)
        result.moved[key] = good
    yank.fallbacks = dict(result.moved)
    await kv.put(yank_key(model, version), msgspec.json.encode(yank))
    return result


async def remove_version(js: JetStreamContext, registry: Registry, model: str, version: int, url: str) -> int:
    """Delete ``model`` ``version`` from the registry (module docstring); returns how many
    keys and objects were deleted. ``RegistryError`` while it is assigned or rolling out."""
    versions = await _require(registry, model, version)
    using = sorted(
        k for k, a in (await _assignments(js)).items() if a.model == model and a.version == version
    )
    rolling = await _active_rollouts(js, url, model, version)
    if using or rolling:
        what = [f"assignment {k}" for k in using] + [f"a running rollout in fleet {f}" for f in rolling]
        raise RegistryError(
            "rm", f"{model!r} version {version} is in use ({', '.join(what)}): assign another version first"
        )
    kv = await js.key_value(names.MODELS_MANIFEST_BUCKET)
    obs = await js.object_store(names.MODELS_BUCKET)
    index_values = await kv_values(js, names.MODELS_MANIFEST_BUCKET, "_files.>")
    keep: set[str] = set()  # sha256 of every file and raw manifest another bundle lists
    doomed: set[str] = set()
    for value in index_values.values():
        try:
            index = decode_json(value, BundleIndex)
        except msgspec.DecodeError:
            continue
        manifest = await registry.manifest(index.name, index.version, index.variant)
        shas = {index.manifest_sha256, *(f.sha256 for f in (manifest.files if manifest else []))}
        (doomed if (index.name, index.version) == (model, version) else keep).update(shas)
    deleted = 0
    for variant in versions[version]:
        for key in (
            names.manifest_key(model, version, variant),
            names.bundle_index_key(model, version, variant),
        ):
            await kv.delete(key)
            deleted += 1
        obj = names.model_object_name(model, version, variant)
        try:
            with nats_errors("object", obj):
                await obs.delete(obj)
            deleted += 1
        except NotFound:
            pass  # no archive: a bundle only nodes of runtime 2 and later can run
    for sha in sorted(doomed - keep):
        try:
            with nats_errors("object", names.file_object_name(sha)):
                await obs.delete(names.file_object_name(sha))
            deleted += 1
        except NotFound:
            pass  # already gone
    return deleted


async def show_version(
    js: JetStreamContext, registry: Registry, model: str, version: int
) -> dict[str, object]:
    """Everything about ``model`` ``version``: each variant's manifest summary and files, who
    it is assigned to, and its yank record."""
    versions = await _require(registry, model, version)
    yank = await registry.yanked(model, version)
    assigned = sorted(
        k for k, a in (await _assignments(js)).items() if a.model == model and a.version == version
    )
    variants = []
    for variant, m in sorted(versions[version].items()):
        variants.append(
            {
                "variant": variant,
                "sha256": m.sha256,
                "size_bytes": m.size_bytes,
                "accuracy": m.reference.accuracy if m.reference else None,
                "min_memory_mb": m.min_memory_mb,
                "labels": m.labels,
                "task": m.task,
                "created": m.created.isoformat(),
                "parent_version": m.parent_version,
                "key_id": m.signature.key_id if m.signature else None,
                "files": [{"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256} for f in m.files],
                "notes": m.notes,
            }
        )
    return {
        "model": model,
        "version": version,
        "variants": variants,
        "assigned": assigned,
        "yanked": None if yank is None else msgspec.to_builtins(yank),
        "versions": sorted(versions),
    }
