"""The model registry: verified bundles in the ``slmops_models`` object store, their manifests in
KV ``slmops_manifests``, and assignments in KV ``slmops_assignments`` (docs/architecture.md §3, §7).

A pushed version is immutable: pushing the same bundle again is a no-op, pushing different
bytes under an existing name/version/variant is refused. Bundle files are stored once by
sha256 (``files/<sha256>``), so a version that changes only a small head file re-uses the
encoder; the archive and files are stored before the manifest and index, so a manifest in KV
always has its objects behind it.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
import msgspec
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from slmops.cloud.errors import CloudError
from slmops.shared import names
from slmops.shared.bundle import (
    MANIFEST_FILE,
    Bundle,
    TrustStore,
    pack_archive,
    parse_manifest,
    read_bundle,
    unpack_archive,
)
from slmops.shared.capabilities import requirements_of, unmet
from slmops.shared.connect import connect_once
from slmops.shared.errors import JetStreamRefused, NatsUnavailable, NotFound
from slmops.shared.jetstream import nats_errors
from slmops.shared.keylist import apply_to, read_signed
from slmops.shared.kv import kv_keys, kv_values
from slmops.shared.messages import (
    Assignment,
    BundleIndex,
    ModelManifest,
    NodeStatus,
    decode_json,
    encode_json,
)
from slmops.shared.objects import FetchError, fetch_object, recorded_sha256
from slmops.shared.provision import ensure_resources
from slmops.shared.runtime import verify_bundle as run_verification
from slmops.shared.variants import PREFERENCE, choose_variant, device_fit

__all__ = [
    "PushResult",
    "Registry",
    "RegistryError",
    "Yank",
    "node_assignment",
    "open_registry",
    "verify_bundle",
    "yank_key",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: Chunk size of content-addressed file objects: small enough that a chunk arrives well within
#: a node's stall timeout on a slow link (32 KiB at 1 kB/s: ~33 s), so progress is visible.
FILE_CHUNK_BYTES = 32 * 1024


class RegistryError(CloudError):
    """A registry operation cannot be done as asked (unknown version, immutable version...)."""

    def __init__(self, operation: str, reason: str) -> None:
        self.operation = operation
        self.reason = reason
        super().__init__(f"registry {operation}: {reason}")


class Yank(msgspec.Struct, kw_only=True):
    """KV ``slmops_manifests`` value of ``_yanked.<model>.<version>`` (``yank_key``): a version
    withdrawn by an operator (``slmops models yank``); ``assign`` refuses it from then on."""

    model: str
    version: int
    reason: str
    at: datetime
    #: What the nodes were moved to: a version per assignment key, or None (nothing of it).
    fallbacks: dict[str, int | None] = {}


def yank_key(model: str, version: int) -> str:
    """``_yanked.<model>.<version>``: starts with "_", so listing manifests skips it."""
    return f"_yanked.{names.validate_model_name(model).replace('.', '_')}.{int(version)}"


@dataclass(frozen=True, slots=True)
class PushResult:
    manifest: ModelManifest
    object_name: str
    #: False when exactly this bundle was already in the registry (nothing written).
    stored: bool


def verify_bundle(bundle: Bundle, trust: TrustStore) -> ModelManifest:
    """Everything a node will check, checked before anything is published: the edge's own
    ``shared.runtime.verify_bundle`` (signature over the raw manifest, requirements, every
    file's size and sha256, ONNX Runtime load, smoke tests and hostile inputs). Raises
    ``BundleError`` whose ``code`` names the failed check. CPU-bound."""
    run_verification(bundle, trust)
    return bundle.manifest


@asynccontextmanager
async def open_registry(url: str, *, timeout: float = 30.0) -> AsyncIterator[Registry]:
    """Connect (failing fast with ``NatsUnavailable``), provision the resources of docs/architecture.md §3
    if missing, yield a ``Registry``; the connection is drained on exit. For commands."""
    nc = await connect_once(url, timeout=min(timeout, 10.0), name="slmops-registry")
    try:
        js = nc.jetstream()
        await ensure_resources(js)
        yield Registry(js, url=url, timeout=timeout)
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.drain()


class Registry:
    """Registry operations on one JetStream context (the caller provisions the resources with
    ``shared.provision.ensure_resources`` and owns the connection)."""

    def __init__(self, js: JetStreamContext, *, url: str = "<nats>", timeout: float = 30.0) -> None:
        self._js = js
        self._url = url
        self._timeout = timeout
        self._kv: dict[str, KeyValue] = {}
        self._obs: ObjectStore | None = None

    # -- plumbing: every NATS call goes through _call, so callers only see our errors -------

    async def _call(self, what: str, op: Awaitable[T]) -> T:
        try:
            with anyio.fail_after(self._timeout), nats_errors("registry", what, self._url):
                return await op
        except TimeoutError as exc:  # ours (fail_after); nats-py's is NatsUnavailable already
            raise NatsUnavailable(self._url, f"{what}: timed out") from exc
        except JetStreamRefused as exc:
            raise RegistryError(what, f"server refused: {exc.description} (err_code {exc.code})") from exc
        except FetchError as exc:
            raise RegistryError(what, exc.reason) from exc

    async def _bucket(self, bucket: str) -> KeyValue:
        if bucket not in self._kv:
            self._kv[bucket] = await self._call(f"open KV {bucket}", self._js.key_value(bucket))
        return self._kv[bucket]

    async def _store(self) -> ObjectStore:
        if self._obs is None:
            self._obs = await self._call("open object store", self._js.object_store(names.MODELS_BUCKET))
        return self._obs

    async def _kv_get(self, bucket: str, key: str) -> bytes | None:
        kv = await self._bucket(bucket)
        try:
            entry = await self._call(f"read {bucket} {key}", kv.get(key))
        except RegistryError as exc:
            if isinstance(exc.__cause__, NotFound):  # missing or deleted
                return None
            raise
        return entry.value

    # -- push ------------------------------------------------------------------------------

    async def _key_list(self) -> bytes | None:
        """The signed key list's bytes (None: no list, or no key-list bucket on a server
        provisioned by an older release). A server that does not answer is an error: a
        push is never let through unchecked because the list could not be read."""
        try:
            return await read_signed(self._js)
        except NatsUnavailable:
            try:
                with nats_errors("kv bucket", names.KEYS_BUCKET, self._url):
                    await self._js.stream_info(f"KV_{names.KEYS_BUCKET}")
            except NotFound:
                return None
            raise

    async def push(
        self, bundle: Bundle, trust: TrustStore, *, roots: Sequence[Ed25519PublicKey] = ()
    ) -> PushResult:
        """Verify ``bundle`` (see ``verify_bundle``; a ``BundleError`` means nothing was
        written), then store it: each listed file and the raw signed manifest by sha256
        (``files/<sha256>``, skipped when already there with that size and the digest nats-py
        recorded at put: a new version re-uses the unchanged files of the old; an object there
        holding other bytes is put again, logged as ``model_file_replaced``), the archive
        (``<model>/<version>/<variant>``, only for bundles the n-gram runtime of older nodes
        can run), then the raw manifest and the small ``BundleIndex`` in KV.
        ``RegistryError`` if this name/version/variant already holds a different bundle.

        The fleet's key list (KV ``slmops_keys``) amends ``trust`` (``shared.keylist.apply_to``):
        a bundle signed by a key it retires or marks compromised is refused (``revoked_key``);
        with ``roots`` the list must verify against them and its active keys are trusted."""
        listed = await self._key_list()
        if listed is not None:
            trust = apply_to(trust, listed, roots)
        manifest = await anyio.to_thread.run_sync(verify_bundle, bundle, trust)
        raw = bundle.raw or encode_json(manifest)
        obj = names.model_object_name(manifest.name, manifest.version, manifest.variant)
        key = names.manifest_key(manifest.name, manifest.version, manifest.variant)
        existing = await self.manifest(manifest.name, manifest.version, manifest.variant)
        store = await self._store()
        if existing is not None and (
            existing.sha256 != manifest.sha256 or existing.signature != manifest.signature
        ):
            raise RegistryError(
                "push",
                f"{obj} already holds a different bundle (sha256 {existing.sha256[:12]}…, "
                f"pushing {manifest.sha256[:12]}…); versions are immutable, push a new version",
            )
        stored = await self._store_files(store, bundle, raw)
        legacy = requirements_of(manifest).min_runtime <= 1 and not manifest.files
        # The archive is for nodes of the n-gram runtime only: a bundle they cannot run is not
        # stored where they look, so they never download it.
        if legacy and await self._object_info(store, obj) is None:
            archive = await anyio.to_thread.run_sync(pack_archive, bundle)
            meta = js_api.ObjectMeta(
                name=obj,
                description=f"{manifest.name} v{manifest.version} {manifest.variant} "
                f"sha256={manifest.sha256}",
            )
            await self._call(f"store {obj}", store.put(obj, archive, meta=meta))
            log.info("model_archive_stored", object=obj, size_bytes=len(archive))
            stored += 1
        kv = await self._bucket(names.MODELS_MANIFEST_BUCKET)
        index_key = names.bundle_index_key(manifest.name, manifest.version, manifest.variant)
        if existing is None:
            await self._call(f"store manifest {key}", kv.put(key, raw))
            stored += 1
        if await self._kv_get(names.MODELS_MANIFEST_BUCKET, index_key) is None:
            index = BundleIndex(
                name=manifest.name,
                version=manifest.version,
                variant=manifest.variant,
                manifest_sha256=hashlib.sha256(raw).hexdigest(),
                manifest_size=len(raw),
                min_memory_mb=manifest.min_memory_mb,
                requires=requirements_of(manifest),
                files_bytes=sum(f.size_bytes for f in bundle.files),
            )
            await self._call(f"store index {index_key}", kv.put(index_key, encode_json(index)))
            stored += 1
        if not stored:
            log.info("model_push_unchanged", object=obj)
            return PushResult(manifest, obj, stored=False)
        log.info("model_pushed", object=obj, sha256=manifest.sha256, writes=stored)
        return PushResult(manifest, obj, stored=True)

    async def _store_files(self, store: ObjectStore, bundle: Bundle, raw: bytes) -> int:
        """Put the raw manifest and each listed file under ``files/<sha256>`` unless there;
        returns how many objects were written."""
        written = 0
        items: list[tuple[str, int, Path | bytes]] = [(hashlib.sha256(raw).hexdigest(), len(raw), raw)]
        items += [(f.sha256, f.size_bytes, bundle.path / f.path) for f in bundle.files]
        for sha, size, src in items:
            name = names.file_object_name(sha)
            info = await self._object_info(store, name)
            if info is not None:
                if info.size == size and recorded_sha256(info) == bytes.fromhex(sha):
                    continue
                # Damaged, or put by hand: every bundle sharing this file would stay
                # undeliverable if a push trusted the name.
                log.warning("model_file_replaced", object=name, size_bytes=info.size, want_bytes=size,
                            reason="holds other bytes than its sha256")  # fmt: skip
            meta = js_api.ObjectMeta(
                name=name,
                description=f"sha256={sha} size={size}",
                options=js_api.ObjectMetaOptions(max_chunk_size=FILE_CHUNK_BYTES),
            )
            if isinstance(src, bytes):
                await self._call(f"store {name}", store.put(name, src, meta=meta))
            else:
                with src.open("rb") as f:
                    await self._call(f"store {name}", store.put(name, f, meta=meta))
            written += 1
        return written

    async def fetch_bundle(self, model: str, version: int, variant: str, work: Path) -> Bundle:
        """The bundle as pushed, assembled in ``work`` (created) from its content-addressed
        files (or, for one pushed before they existed, from its archive). Each file is checked
        against its sha256; the bundle is not verified otherwise (``verify_bundle``)."""
        store = await self._store()
        where = f"{model}/{version}/{variant}"
        work = Path(work)
        await anyio.Path(work).mkdir(parents=True, exist_ok=True)
        data = await self._kv_get(
            names.MODELS_MANIFEST_BUCKET, names.bundle_index_key(model, version, variant)
        )
        if data is None:
            obj = names.model_object_name(model, version, variant)
            archive = work / "bundle.tar"
            # Streamed to disk by shared.objects: unlike store.get(writeinto=), a timeout or
            # cancellation leaves no subscription filling memory behind.
            f = await anyio.to_thread.run_sync(archive.open, "wb")
            try:
                await self._call(f"fetch {obj}", fetch_object(self._js, names.MODELS_BUCKET, obj, f))
            finally:
                f.close()  # at once: an await here would not run under cancellation
            return await anyio.to_thread.run_sync(unpack_archive, archive, work / "bundle")
        index = decode_json(data, BundleIndex)
        raw = await self._object_bytes(store, index.manifest_sha256)
        bundle = await anyio.to_thread.run_sync(parse_manifest, work / "bundle", raw, where)
        for entry in bundle.files:
            body = await self._object_bytes(store, entry.sha256)
            await anyio.to_thread.run_sync(_write_file, bundle.path / entry.path, body)
        await anyio.to_thread.run_sync(_write_file, bundle.path / MANIFEST_FILE, raw)
        return await anyio.to_thread.run_sync(read_bundle, bundle.path)

    async def _object_bytes(self, store: ObjectStore, sha256: str) -> bytes:
        name = names.file_object_name(sha256)
        buf = io.BytesIO()
        # Not store.get(): cancelled by a timeout it leaves its subscription (shared.objects).
        await self._call(f"fetch {name}", fetch_object(self._js, names.MODELS_BUCKET, name, buf))
        body = buf.getvalue()
        if hashlib.sha256(body).hexdigest() != sha256:
            raise RegistryError("fetch", f"object {name} does not hold the bytes of its sha256")
        return body

    async def _object_info(self, store: ObjectStore, obj: str) -> js_api.ObjectInfo | None:
        """The object's metadata, or None if there is no such object (or it was deleted)."""
        try:
            info = await self._call(f"look up {obj}", store.get_info(obj))
        except RegistryError as exc:
            if isinstance(exc.__cause__, NotFound):
                return None
            raise
        return None if info.deleted else info

    # -- read ------------------------------------------------------------------------------

    async def manifest(self, model: str, version: int, variant: str) -> ModelManifest | None:
        data = await self._kv_get(names.MODELS_MANIFEST_BUCKET, names.manifest_key(model, version, variant))
        return None if data is None else decode_json(data, ModelManifest)

    async def manifests(self) -> list[ModelManifest]:
        """Every manifest in the registry, sorted by name, version, variant. A value that does
        not decode is logged and skipped (someone else wrote it). No manifest bucket yet (a
        server nothing was pushed to): an empty list, and nothing is created."""
        try:
            await self._bucket(names.MODELS_MANIFEST_BUCKET)
        except RegistryError as exc:
            if isinstance(exc.__cause__, NotFound):
                return []
            raise
        values = await self._call("list manifests", kv_values(self._js, names.MODELS_MANIFEST_BUCKET))
        found: list[ModelManifest] = []
        for key, data in values.items():
            if key.startswith("_"):  # bundle indexes (names.bundle_index_key), not manifests
                continue
            try:
                found.append(decode_json(data, ModelManifest))
            except msgspec.DecodeError as exc:
                log.warning("manifest_undecodable", key=key, error=str(exc))
        return sorted(found, key=lambda m: (m.name, m.version, _variant_rank(m.variant)))

    async def yanked(self, model: str, version: int) -> Yank | None:
        """The yank record of ``model`` ``version``, or None when it was never yanked."""
        data = await self._kv_get(names.MODELS_MANIFEST_BUCKET, yank_key(model, version))
        return None if data is None else msgspec.json.decode(data, type=Yank)

    async def variants(self, model: str, version: int) -> dict[str, ModelManifest]:
        return {m.variant: m for m in await self.manifests() if m.name == model and m.version == version}

    async def latest_status(self, fleet: str, node: str) -> NodeStatus | None:
        """The node's last status report on ``SLMOPS_STATUS``, or None (none, or undecodable)."""
        subject = names.status_subject(fleet, node)
        try:
            msg = await self._call(f"read {subject}", self._js.get_last_msg(names.STATUS_STREAM, subject))
        except RegistryError as exc:
            if isinstance(exc.__cause__, NotFound):
                return None
            raise
        try:
            return decode_json(msg.data or b"", NodeStatus)
        except msgspec.DecodeError as exc:
            log.warning("status_undecodable", subject=subject, error=str(exc))
            return None

    # -- assign ----------------------------------------------------------------------------

    async def assign(
        self,
        fleet: str,
        version: int,
        *,
        model: str | None = None,
        node: str | None = None,
        variant: str | None = None,
        now: datetime | None = None,
        side_by_side: bool = False,
    ) -> Assignment:
        """Write the assignment of ``model`` ``version`` for one node, or fleet-wide when
        ``node`` is None. The variant is ``variant`` if given; else, for a node whose last
        status reports its device, the one ``shared.variants.choose_variant`` picks; else None
        (the node picks from ``variants`` itself). ``side_by_side`` writes the per-model key
        (``names.assignment_key(..., model=)``): the node serves the model beside its others
        instead of as its default model (nodes of a single-model build ignore that key)."""
        names.validate_id(fleet, "fleet")
        if node is not None:
            names.validate_id(node, "node")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"version must be a positive int, got {version!r}")
        manifests = await self.manifests()
        if model is None:
            models = sorted({m.name for m in manifests})
            if len(models) != 1:
                raise RegistryError("assign", f"the registry holds models {models}; name one with --model")
            model = models[0]
        available = {m.variant: m for m in manifests if m.name == model and m.version == version}
        yank = await self.yanked(model, version)
        if yank is not None:
            raise RegistryError(
                "assign",
                f"{model!r} version {version} was yanked at {yank.at:%Y-%m-%d %H:%M}Z "
                f"({yank.reason}); assign another version",
            )
        if not available:
            have = sorted({m.version for m in manifests if m.name == model})
            raise RegistryError(
                "assign", f"{model!r} version {version} is not in the registry (versions: {have})"
            )
        if variant is not None and variant not in available:
            raise RegistryError(
                "assign", f"{model!r} v{version} has no variant {variant!r} (has {sorted(available)})"
            )
        status = None if node is None else await self.latest_status(fleet, node)
        assignment = node_assignment(fleet, node, model, version, variant, available, status, now)
        if status is not None and variant is None:
            log.info(
                "variant_chosen",
                node=node,
                variant=assignment.variant,
                memory_mb=status.device.memory_mb,
                profile=status.device.profile,
            )
        kv = await self._bucket(names.ASSIGNMENTS_BUCKET)
        key = names.assignment_key(fleet, node, model if side_by_side else None)
        await self._call(f"write assignment {key}", kv.put(key, encode_json(assignment)))
        log.info("model_assigned", key=key, model=model, version=version, variant=variant)
        return assignment

    async def fleet_nodes(self, fleet: str) -> list[str]:
        """Node ids that ever reported a status in ``fleet`` (``SLMOPS_STATUS`` subjects)."""
        wanted = names.status_filter(fleet)
        prefix = wanted.removesuffix("*")
        info = await self._call(
            f"list nodes of {fleet}", self._js.stream_info(names.STATUS_STREAM, subjects_filter=wanted)
        )
        return sorted(s[len(prefix) :] for s in (info.state.subjects or {}) if s.startswith(prefix))

    async def pin_incapable(
        self,
        fleet: str,
        model: str,
        version: int,
        *,
        side_by_side: bool = False,
        statuses: Mapping[str, NodeStatus] | None = None,
    ) -> list[str]:
        """After a fleet-wide assignment of ``model`` ``version``: give each node of the fleet
        that follows the fleet-wide key (no key of its own) and whose last status says its
        runtime can run no variant of that version (an old node reports no capabilities: the
        n-gram runtime) a key of its own naming the newest earlier version, not yanked, it
        can run; a node that can run none keeps no key of its own and is named in the
        result (it will refuse the version: ``fleet status`` shows it). Returns one line
        per node handled, saying what and why. ``side_by_side``: the assignment was of the
        per-model keys (``assign(side_by_side=True)``), so are the nodes' keys read and
        written here. ``statuses``: the nodes' last statuses by node, when the caller has
        them (the rollout controller): then none is read, and the nodes' own keys are listed
        once instead of read one by one. Raises ``RegistryError``."""
        key_model = model if side_by_side else None
        manifests = [m for m in await self.manifests() if m.name == model]
        by_version: dict[int, dict[str, ModelManifest]] = {}
        for m in manifests:
            by_version.setdefault(m.version, {})[m.variant] = m
        kv = await self._bucket(names.ASSIGNMENTS_BUCKET)
        notes: list[str] = []
        own_keys: set[str] | None = None
        if statuses is not None:
            pattern = f"{fleet}.*" if key_model is None else f"{fleet}.*.{key_model}"
            found = kv_keys(self._js, names.ASSIGNMENTS_BUCKET, pattern)
            own_keys = set(await self._call(f"list assignments of {fleet}", found))
        for node in sorted(statuses) if statuses is not None else await self.fleet_nodes(fleet):
            status = statuses[node] if statuses is not None else await self.latest_status(fleet, node)
            if status is None:
                continue
            caps = status.device.capabilities
            wanted = by_version.get(version, {})
            lacks = sorted({x for m in wanted.values() for x in unmet(requirements_of(m), caps)})
            if not wanted or any(not unmet(requirements_of(m), caps) for m in wanted.values()):
                continue
            own_key = names.assignment_key(fleet, node, key_model)
            if own_keys is not None and own_key not in own_keys:
                pass  # never written: no key of its own (a listed one may be deleted: read it)
            elif await self._kv_get(names.ASSIGNMENTS_BUCKET, own_key) is not None:
                continue  # it follows its own key: not this assignment's to change
            fallback = None
            for v in sorted((v for v in by_version if v < version), reverse=True):
                runnable = {k: m for k, m in by_version[v].items() if not unmet(requirements_of(m), caps)}
                if runnable and await self.yanked(model, v) is None:
                    fallback = (v, runnable)
                    break
            what = (
                f"its runtime lacks {', '.join(lacks)} (capabilities {caps or 'none reported: an old node'})"
            )
            if fallback is None:
                notes.append(f"node {node}: can run no version of {model!r}; {what}")
                log.warning("assignment_unrunnable", fleet=fleet, node=node, model=model, version=version)
                continue
            v, runnable = fallback
            variant = choose_variant({k: m.min_memory_mb for k, m in runnable.items()}, status.device)
            pinned = node_assignment(fleet, node, model, v, variant, runnable, None)
            await self._call(f"write assignment {own_key}", kv.put(own_key, encode_json(pinned)))
            notes.append(f"node {node}: kept on v{v} ({variant}), the newest it can run; {what}")
            log.info("assignment_pinned", fleet=fleet, node=node, model=model, version=v, wanted=version)
        return notes


def node_assignment(
    fleet: str,
    node: str | None,
    model: str,
    version: int,
    variant: str | None,
    available: Mapping[str, ModelManifest],
    status: NodeStatus | None,
    now: datetime | None = None,
) -> Assignment:
    """The assignment of ``model`` ``version`` for ``node`` given its last ``status`` (None:
    unknown, the node picks), without I/O: ``available`` (variant -> manifest of that version)
    is cut to what the node's runtime can run and its device profile fits, and the variant is
    ``variant`` if given, else chosen by memory (``shared.variants.choose_variant``). Raises
    ``RegistryError`` naming why when the node can run, or fit, none (or not ``variant``).
    ``Registry.assign`` and the rollout's batched writes both build assignments here."""
    if node is not None and status is not None:
        available = _runnable_fitting(node, model, version, variant, available, status)
        if variant is None:
            variant = choose_variant({v: m.min_memory_mb for v, m in available.items()}, status.device)
    return Assignment(
        fleet=fleet,
        node=node,
        model=model,
        version=version,
        variant=variant,
        variants=sorted(available, key=_variant_rank),
        assigned_at=now or datetime.now(UTC),
    )


def _runnable_fitting(
    node: str,
    model: str,
    version: int,
    variant: str | None,
    available: Mapping[str, ModelManifest],
    status: NodeStatus,
) -> dict[str, ModelManifest]:
    """``available`` cut to the variants the node's runtime can run and whose measured
    figures keep to its device profile (``shared.variants.device_fit``, issue 12's device-fit
    check); ``RegistryError`` naming why when none, or not ``variant``, is left."""
    # Never send a node a bundle its runtime cannot run (an old node reports no
    # capabilities: the n-gram runtime).
    caps = status.device.capabilities
    missing = {v: unmet(requirements_of(m), caps) for v, m in available.items()}
    runnable = {v: m for v, m in available.items() if not missing[v]}
    if variant is not None and missing[variant]:
        raise RegistryError(
            "assign",
            f"node {node!r} cannot run {model!r} v{version} {variant}: it lacks "
            f"{', '.join(missing[variant])} "
            f"(capabilities {caps or 'none reported: an old node'})",
        )
    if not runnable:
        raise RegistryError(
            "assign",
            f"node {node!r} can run no variant of {model!r} v{version}: "
            + "; ".join(f"{v} needs {', '.join(m)}" for v, m in sorted(missing.items())),
        )
    unfit = {v: why for v, m in runnable.items() if (why := device_fit(m, status.device)) is not None}
    if variant is not None and variant in unfit:
        raise RegistryError("assign", f"node {node!r} does not fit {model!r} v{version}: {unfit[variant]}")
    if unfit and len(unfit) == len(runnable):
        raise RegistryError(
            "assign",
            f"node {node!r}: no variant of {model!r} v{version} fits its device profile: "
            + "; ".join(unfit[v] for v in sorted(unfit)),
        )
    for v, why in sorted(unfit.items()):
        log.info("variant_unfit", node=node, model=model, version=version, variant=v, reason=why)
    return {v: m for v, m in runnable.items() if v not in unfit}


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _variant_rank(variant: str) -> tuple[int, str]:
    return (PREFERENCE.index(variant) if variant in PREFERENCE else len(PREFERENCE), variant)
