"""The node's models: a local cache holding, per model name, the current and the previous
bundle; verified installs, atomic swaps and rollback (docs/architecture.md §6).

A node serves several models side by side (issue 11: a classifier and an embedder now, a
generator later), one *slot* per model name, in the order they were first installed; the
first is the node's default (``current``). Installing version 2 of "clf" swaps only the slot
"clf"; installing a model of a new name adds a slot.

Cache layout under ``cache_dir``: one directory per bundle, ``<name>__<version>__<variant>``
(``manifest.json`` + the files it lists), and ``state.json``: ``{"models": [{"name",
"current", "previous"}, ...]}`` in slot order, plus the default slot's ``current`` and
``previous`` at the top level (the only keys a single-model build wrote and reads, so a cache
moves between builds either way). ``state.json`` is replaced atomically, so a crash at any
instant leaves the old or the new choice, never a mix; unfinished copies are ``.tmp-*``
directories removed at the next start.

A swap replaces one reference: requests already running keep the session they started with.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import structlog

from slmops.edge.status import device_profile
from slmops.shared.bundle import MANIFEST_FILE, Bundle, TrustStore, check_files, read_bundle
from slmops.shared.errors import BundleError
from slmops.shared.generation import GenerationSession
from slmops.shared.messages import ModelManifest, ModelRef
from slmops.shared.runtime import Session, verify_bundle
from slmops.shared.vocabulary import BundleCode, NodeEvent

__all__ = ["ActiveModel", "ModelManager"]

log = structlog.get_logger(__name__)

_STATE = "state.json"
#: errno of a full or failing disk: an install is then served without being cached.
_DISK_FAILING = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


class ActiveModel(msgspec.Struct, frozen=True, kw_only=True):
    """A loaded model as inference uses it; immutable, swapped as a whole."""

    #: A ``GenerationSession`` for task "generation" (``shared.generation``).
    session: Session | GenerationSession
    manifest: ModelManifest
    path: Path
    #: The buffer's id for this model's events.
    model_id: int

    @property
    def ref(self) -> ModelRef:
        return self.manifest.ref


#: ``await register(manifest)`` → the buffer's model id (called before a model goes live).
Register = Callable[[ModelManifest], Awaitable[int]]


def _dirname(ref: ModelRef) -> str:
    return f"{ref.name}__{ref.version}__{ref.variant}"


def _no_trusted_version(name: str, why: str) -> str:
    return f"model {name!r} is not served: {why}, and the cache holds no version with a trusted signer"


class _Slot:
    """One model name's current model and the ref of its previous one."""

    __slots__ = ("current", "previous")

    def __init__(self, current: ActiveModel, previous: ModelRef | None) -> None:
        self.current = current
        self.previous = previous


class ModelManager:
    """Installs, caches and swaps models, one slot per model name (module docstring).
    ``current`` (the default model) is None until a model is installed."""

    def __init__(
        self,
        cache_dir: Path,
        trust: TrustStore,
        *,
        register: Register,
        intra_op_threads: int = 1,
        memory_mb: int | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.trust = trust
        #: Device memory (MB) the served models' ``min_memory_mb`` must fit in *together*
        #: (``memory_check``); None at construction means this machine's physical memory;
        #: 0 = unknown, no check.
        self.memory_mb = device_profile(self.cache_dir).memory_mb if memory_mb is None else memory_mb
        self._register = register
        self._threads = intra_op_threads
        #: Slots by model name, in the order first installed (the first is the default).
        self._slots: dict[str, _Slot] = {}
        #: Model name -> why it is no longer served (its version yanked with no earlier good one).
        self.withdrawn: dict[str, str] = {}
        self._lock = anyio.Lock()
        self._listeners: list[Callable[[str, ActiveModel], object]] = []

    @property
    def current(self) -> ActiveModel | None:
        """The default model: the first slot's current one (None before any install)."""
        slot = next(iter(self._slots.values()), None)
        return None if slot is None else slot.current

    @property
    def previous(self) -> ModelRef | None:
        """The default model's previous version (what ``rollback()`` restores)."""
        slot = next(iter(self._slots.values()), None)
        return None if slot is None else slot.previous

    def get(self, name: str | None = None) -> ActiveModel | None:
        """The current model named ``name`` (None: the default model); None if not held."""
        if name is None:
            return self.current
        slot = self._slots.get(name)
        return None if slot is None else slot.current

    def previous_of(self, name: str) -> ModelRef | None:
        """The previous version of model ``name``, if the cache holds one."""
        slot = self._slots.get(name)
        return None if slot is None else slot.previous

    def all(self) -> list[ActiveModel]:
        """Every served model, default first."""
        return [slot.current for slot in self._slots.values()]

    @property
    def names(self) -> list[str]:
        """Names of the served models, default first."""
        return list(self._slots)

    def on_change(self, callback: Callable[[str, ActiveModel], object]) -> None:
        """Call ``callback(event, model)`` after every swap; event is ``model_installed``
        or ``rollback``. Callbacks must not block."""
        self._listeners.append(callback)

    # -- start ------------------------------------------------------------------------------

    async def open(self) -> ActiveModel | None:
        """Load every cached model (for each, the current bundle or, if it fails its checks,
        the previous one); returns the default model, None when none loaded."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        for junk in self.cache_dir.glob(".tmp-*"):
            shutil.rmtree(junk, ignore_errors=True)
        for junk in self.cache_dir.glob(".state-*"):
            junk.unlink(missing_ok=True)
        for entry in self._read_state():
            for role in ("current", "previous"):
                name = entry.get(role)
                if not name:
                    continue
                try:
                    active = await self._load(self.cache_dir / name, check_memory=True)
                except BundleError as exc:
                    log.error("cached_model_rejected", role=role, dir=name, code=exc.code, reason=exc.reason)
                    if exc.code == BundleCode.REVOKED_KEY and entry.get("name"):
                        # Kept in the cache (a newer key list may trust it again); requests
                        # are told why nothing is served.
                        self.withdrawn[entry["name"]] = _no_trusted_version(entry["name"], exc.reason)
                    continue
                if active.ref.name in self._slots:
                    log.error("cached_model_duplicate", dir=name, model=active.ref.name)
                    break
                other = entry.get("previous") if role == "current" else None
                self._slots[active.ref.name] = _Slot(active, self._ref_of(other) if other else None)
                self.withdrawn.pop(active.ref.name, None)  # a trusted version was found
                log.info("model_loaded", model=active.ref.name, version=active.ref.version, role=role)
                break
        return self.current

    def _read_state(self) -> list[dict[str, str]]:
        """Slot entries ``{"current": dir, "previous": dir}`` in slot order."""
        try:
            data = json.loads((self.cache_dir / _STATE).read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.error("model_state_unreadable", error=repr(exc))
            return []
        if not isinstance(data, dict):
            return []

        def strings(d: object) -> dict[str, str]:
            return {k: v for k, v in d.items() if isinstance(v, str)} if isinstance(d, dict) else {}

        models = data.get("models")
        if isinstance(models, list):
            return [strings(d) for d in models]
        legacy = strings(data)  # written by a single-model build
        return [legacy] if legacy else []

    def _ref_of(self, dirname: str) -> ModelRef | None:
        try:
            return read_bundle(self.cache_dir / dirname).manifest.ref
        except BundleError:
            return None

    def find_file(self, sha256: str, size: int) -> Path | None:
        """A file with this sha256 and size in a bundle the cache holds (current, previous),
        for a download to re-use instead of fetching; None if there is none. Blocking."""
        for d in sorted(self.cache_dir.iterdir()) if self.cache_dir.is_dir() else []:
            if not d.is_dir() or d.name.startswith("."):
                continue
            try:
                bundle = read_bundle(d)
            except BundleError:
                continue
            for f in bundle.files:
                p = d / f.path
                if f.sha256 == sha256 and f.size_bytes == size and p.is_file() and p.stat().st_size == size:
                    return p
        return None

    def memory_check(self, name: str, need_mb: int) -> str | None:
        """Why a bundle of model ``name`` needing ``need_mb`` MB (its ``min_memory_mb``) does
        not fit beside the other served models, or None when it fits. The models served
        together must fit in ``memory_mb`` *summed* (a new version of ``name`` replaces that
        model's share). The sum over-counts: each ``min_memory_mb`` is the peak RSS of a
        process serving that bundle alone (``shared.variants``), interpreter and ORT
        included, so two models share one interpreter this sum counts twice; it errs on
        the side of refusing."""
        if self.memory_mb <= 0:
            return None
        others = {
            n: s.current.manifest.min_memory_mb
            for n, s in self._slots.items()
            if n != name and s.current.manifest.min_memory_mb > 0
        }
        total = need_mb + sum(others.values())
        if total <= self.memory_mb:
            return None
        if not others:
            return f"needs {need_mb} MB of memory, this device has {self.memory_mb} MB"
        beside = ", ".join(f"{n} {mb} MB" for n, mb in others.items())
        return (
            f"needs {need_mb} MB of memory beside the models served with it ({beside}): "
            f"{total} MB in all, over this device's {self.memory_mb} MB"
        )

    # -- install ----------------------------------------------------------------------------

    async def install(self, bundle_dir: Path, *, source: str) -> ModelRef:
        """Verify ``bundle_dir`` (hash, signature against the trusted keys, load, smoke
        tests), copy it into the cache and make it current. Raises ``BundleError`` with a
        ``code`` on any failure; then nothing changed and no partial file is left."""
        async with self._lock:
            bundle = read_bundle(Path(bundle_dir))
            ref = bundle.manifest.ref
            cur = self.get(ref.name)
            if cur is not None and cur.ref == ref:
                log.info("model_already_current", model=ref.name, version=ref.version, source=source)
                return ref
            over = self.memory_check(ref.name, bundle.manifest.min_memory_mb)
            if over is not None:
                raise BundleError(str(bundle.path), over, BundleCode.TOO_LARGE)
            session = await self._session(bundle)
            try:
                path = await anyio.to_thread.run_sync(self._copy_into_cache, bundle)
                cached = True
            except OSError as exc:
                if exc.errno not in _DISK_FAILING:
                    raise
                # A full disk must not stop the node serving (issue 13): the session is
                # loaded; the cache and state.json stay as they were (a restart loads the
                # cached model, then installs this one again).
                log.error("model_not_cached", model=ref.name, version=ref.version, error=str(exc))
                path, cached = bundle.path, False
            model_id = await self._register(bundle.manifest)
            active = ActiveModel(session=session, manifest=bundle.manifest, path=path, model_id=model_id)
            self._swap(active, "model_installed", cached=cached)
            log.info(
                "model_installed", model=ref.name, version=ref.version, variant=ref.variant, source=source
            )
            return ref

    async def rollback(self, name: str | None = None) -> ModelRef:
        """Make model ``name``'s (None: the default model's) previous version current again.
        Raises ``BundleError`` (code ``no_previous`` or a verification code) when that is
        not possible."""
        async with self._lock:
            prev = self.previous if name is None else self.previous_of(name)
            if prev is None:
                raise BundleError(
                    "cache", "there is no previous model to roll back to", BundleCode.NO_PREVIOUS
                )
            active = await self._load(self.cache_dir / _dirname(prev))
            self._swap(active, "rollback")
            log.warning("model_rolled_back", model=prev.name, version=prev.version)
            return prev

    async def _session(self, bundle: Bundle, *, serving: bool = False) -> Session | GenerationSession:
        """``shared.runtime.verify_bundle``: the same checks as ``models push``. ``serving``:
        a bundle that already ran here (cache, rollback), which a retired signer may have
        signed; a new install needs a key the key list still calls active."""
        if len(self.trust) == 0 and not self.trust.revoked:  # (revoked: its verify says why)
            raise BundleError(
                str(bundle.path), "no trusted keys are configured (--trust)", BundleCode.UNKNOWN_KEY
            )
        trust = self.trust.serving() if serving else self.trust
        return await anyio.to_thread.run_sync(
            lambda: verify_bundle(bundle, trust, memory_mb=self.memory_mb, intra_op_threads=self._threads)
        )

    async def _load(self, path: Path, *, check_memory: bool = False) -> ActiveModel:
        bundle = read_bundle(path)
        m = bundle.manifest
        over = self.memory_check(m.name, m.min_memory_mb) if check_memory else None
        if over is not None:
            raise BundleError(str(path), over, BundleCode.TOO_LARGE)
        session = await self._session(bundle, serving=True)
        model_id = await self._register(bundle.manifest)
        return ActiveModel(session=session, manifest=bundle.manifest, path=path, model_id=model_id)

    def _copy_into_cache(self, bundle: Bundle) -> Path:
        final = self.cache_dir / _dirname(bundle.manifest.ref)
        if final.exists():
            try:
                cached = read_bundle(final)
                check_files(cached)
                if cached.raw == bundle.raw:
                    return final
            except BundleError:
                pass
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.cache_dir))
        try:
            for name in [MANIFEST_FILE, *(f.path for f in bundle.files)]:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(bundle.path / name, tmp / name)
                with (tmp / name).open("rb") as f:
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    async def apply_trust(self, trust: TrustStore) -> list[tuple[str, str]]:
        """Judge from now on with ``trust`` (a new key list), and stop serving every model
        whose current bundle's signer it marks compromised: fall back to that model's previous
        version when its signer is still trusted, else serve nothing of it (requests get 503
        with the reason) while its cache stays as it is. Returns ``(model, what happened)``
        per model touched, for the status report."""
        async with self._lock:
            self.trust = trust
            touched: list[tuple[str, str]] = []
            for name, slot in list(self._slots.items()):
                sig = slot.current.manifest.signature
                signer = None if sig is None else sig.key_id
                if signer is None or trust.status_of(signer) != "compromised":
                    continue
                version = slot.current.ref.version
                why = f"v{version} is signed by key {signer}, which the key list marks compromised"
                fallback = await self._fallback(slot)
                if fallback is not None:
                    self._swap_in(name, slot, fallback)
                    note = f"{why}; fell back to v{fallback.ref.version}"
                    log.error(
                        "model_signer_compromised", model=name, fallback=fallback.ref.version, reason=why
                    )
                else:
                    self.withdrawn[name] = _no_trusted_version(name, why)
                    self._keep_only({k: v for k, v in self._slots.items() if k != name}, cached=False)
                    note = f"{why}; no cached version with a trusted signer: not served (503)"
                    log.error("model_signer_compromised", model=name, fallback=None, reason=why)
                touched.append((name, note))
            return touched

    async def _fallback(self, slot: _Slot) -> ActiveModel | None:
        if slot.previous is None:
            return None
        try:
            return await self._load(self.cache_dir / _dirname(slot.previous))
        except BundleError as exc:
            log.error(
                "fallback_refused", model=slot.previous.name, version=slot.previous.version, reason=exc.reason
            )
            return None

    def _swap_in(self, name: str, slot: _Slot, active: ActiveModel) -> None:
        """``active`` (the previous version) current in place of a revoked one, which leaves
        the served set but stays in the cache directory (not deleted: the key list decides)."""
        slots = dict(self._slots)
        slots[name] = _Slot(active, None)
        self._keep_only(slots, cached=False)
        for callback in list(self._listeners):
            try:
                callback(NodeEvent.KEYS_FALLBACK, active)
            except Exception:
                log.exception("model_listener_failed", callback=repr(callback))

    def why_not(self, name: str | None = None) -> str:
        """Why model ``name`` (None: the default) is not served: its withdrawal, or not yet."""
        if name is None:
            return next(iter(self.withdrawn.values()), "no model installed yet") if not self._slots else ""
        return self.withdrawn.get(name, f"model {name!r} is not installed")

    async def withdraw(self, name: str, reason: str) -> bool:
        """Stop serving model ``name`` (every version, current and previous: its cache goes
        too, so a restart does not bring it back); ``reason`` is what requests for it are
        told. Returns True when it was being served."""
        async with self._lock:
            self.withdrawn[name] = reason
            slot = self._slots.get(name)
            if slot is None:
                return False
            slots = {k: v for k, v in self._slots.items() if k != name}
            self._keep_only(slots, cached=True)
            log.warning("model_withdrawn", model=name, version=slot.current.ref.version, reason=reason)
            return True

    def _keep_only(self, slots: dict[str, _Slot], *, cached: bool) -> None:
        """Make ``slots`` the served models; with ``cached``, write them to the state file
        and remove every other bundle from the cache."""
        entries = []
        for s in slots.values():
            entry = {"name": s.current.ref.name, "current": s.current.path.name}
            if s.previous is not None:
                entry["previous"] = _dirname(s.previous)
            entries.append(entry)
        default = {k: v for k, v in entries[0].items() if k != "name"} if entries else {}
        if cached:
            self._write_state({**default, "models": entries})
        self._slots = slots
        keep = {v for e in entries for k, v in e.items() if k != "name"}
        for d in self.cache_dir.iterdir() if cached else ():
            if d.is_dir() and not d.name.startswith(".") and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def _swap(self, active: ActiveModel, event: str, *, cached: bool = True) -> None:
        """Make ``active`` its model's current version; ``cached=False``: it is served from
        outside the cache (a full disk), so the cache and its state file are left as they are."""
        name = active.ref.name
        self.withdrawn.pop(name, None)  # assigned a good version again
        slot = self._slots.get(name)
        old = None if slot is None else slot.current
        previous = None if slot is None else slot.previous
        if old is not None and old.ref != active.ref:
            previous = old.ref
        slots = dict(self._slots)
        slots[name] = _Slot(active, previous)
        self._keep_only(slots, cached=cached)
        for callback in list(self._listeners):
            try:
                callback(event, active)
            except Exception:
                log.exception("model_listener_failed", callback=repr(callback))

    def _write_state(self, state: dict[str, object]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".state-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.cache_dir / _STATE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
