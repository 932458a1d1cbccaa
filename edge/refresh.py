"""The node follows its model assignment (docs/architecture.md §6, §9).

While online it is woken by every new value (a deletion included) of its own key and the
fleet-wide key of KV ``slmops_assignments`` and of the per-model keys under each
(``<key>.<model>``, models served side by side): core subscriptions on the subjects the
bucket republishes those puts to, headers only (``names.assignment_subjects``; ``_watch``).
No consumer is created, so a node needs no consumer right and has no push target to choose
(issue 13 fault 11). It reads the keys by direct gets by subject (``shared.kv.kv_get_direct``);
on every (re)connect, at start and every ``poll_interval`` it re-reads them, because a
subscription misses what was written while the node was away, and one the server refuses
(permissions of an older release) leaves the node polling. The node's own key overrides the
fleet-wide one. A model whose per-model keys were all deleted is unloaded (``_remove``); a
per-model key holding a bad value unloads nothing.

A wanted version that is not current is fetched file by file. The node reads only the
bundle's small index (``BundleIndex``: memory, requirements, the manifest's sha256) and refuses
what it cannot run before downloading anything; it then fetches the signed manifest by its
sha256 and verifies the signature before any other byte, and fetches each listed file it
does not already hold (content-addressed ``files/<sha256>``, so a new version that changes only
``head.onnx`` does not re-ship the encoder), each capped at its signed size and hash-checked.
Downloads resume where the last attempt stopped (``shared.objects.fetch_resumable`` keeps the
chunk offset beside a partial file in ``.partial/``, across attempts and restarts). An attempt
fails when no chunk arrives for ``STALL_SECONDS`` or when it outlasts ``download_timeout`` plus
the bundle's size at ``MIN_RATE`` bytes/s, so the limit scales with size and progress. A bundle
pushed by an older registry (no index) comes as one archive, also resumable, unpacked
signature-first. The assembled directory is handed to ``ModelManager.install``, which verifies,
smoke-tests and swaps atomically; the temp directory is removed whatever happens (a crash
leaves only ``.tmp-*``, removed at start). Every outcome, every failure included, is reported
with ``NodeStatus.refresh`` (``download_failed`` with the reason).

A bundle refused for what it is (signature, hash, load, smoke test...) is not fetched again
for the same assignment; a failed download is retried with backoff. A version the node's
safety monitor rolled back and blocked is not fetched again at all; every assignment read is
handed to ``on_assigned`` first (the safety monitor learns which versions the cloud withdrew).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import structlog
from nats.js import JetStreamContext

from slmops.edge.config import RefreshTimings
from slmops.edge.models import ModelManager
from slmops.shared import names
from slmops.shared.backoff import Backoff
from slmops.shared.bundle import (
    MANIFEST_FILE,
    Bundle,
    parse_manifest,
    read_bundle,
    sha256_file,
    unpack_archive,
)
from slmops.shared.capabilities import CAPABILITIES, requirements_of, unmet
from slmops.shared.connect import Link, LinkState
from slmops.shared.errors import BundleError, JetStreamRefused, NatsUnavailable, NotFound
from slmops.shared.jetstream import nats_errors
from slmops.shared.kv import kv_get_direct, kv_keys
from slmops.shared.messages import (
    Assignment,
    BundleFile,
    BundleIndex,
    DeviceProfile,
    ModelManifest,
    ModelRef,
    RefreshResult,
    Requirements,
    decode_json,
)
from slmops.shared.objects import STATE_SUFFIX, FetchError, fetch_resumable
from slmops.shared.variants import choose_variant
from slmops.shared.vocabulary import RETRYABLE_CODES, BundleCode, NodeEvent

__all__ = ["RETRYABLE", "RefreshStatistics", "Refresher"]

log = structlog.get_logger(__name__)

#: ``await report(event, refresh=RefreshResult)`` publishes a status (``EdgeNode.report_status``).
Report = Callable[..., Awaitable[bool]]

#: Codes worth trying again later (``shared.vocabulary.RETRYABLE_CODES``).
RETRYABLE = RETRYABLE_CODES

# What a lost link, a slow one or a refusing server raise once translated; OSError covers the
# per-call timeout (TimeoutError) and the partial file of a download.
_NATS_ERRORS = (NatsUnavailable, JetStreamRefused, OSError)
#: An attempt fails when no chunk arrives for this long (chunks are 32 KiB: ~33 s at 1 kB/s).
STALL_SECONDS = 60.0
#: The slowest link an attempt is sized for: its limit is ``download_timeout + bytes / MIN_RATE``.
MIN_RATE = 1024.0
PARTIAL_DIR = ".partial"


@dataclass
class _Counters:
    """The refresher's live counters (``Refresher.stats``); ``statistics()`` copies them."""

    checks: int = 0
    installs: int = 0
    rejections: int = 0
    download_failures: int = 0
    #: Models unloaded because their per-model assignment keys were deleted.
    removals: int = 0
    #: Checks that found the assigned version on the node's block list (``edge.safety``).
    blocked_skips: int = 0
    bytes_downloaded: int = 0
    #: Bundle files taken from bundles the node already held instead of downloaded.
    files_reused: int = 0
    bytes_reused: int = 0
    last: RefreshResult | None = None
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RefreshStatistics:
    """A snapshot of ``Refresher.statistics()``: counts since the node started."""

    checks: int
    installs: int
    rejections: int
    download_failures: int
    #: Checks that found the assigned version on the node's block list (``edge.safety``).
    blocked_skips: int
    bytes_downloaded: int
    #: Bundle files taken from bundles the node already held instead of downloaded.
    files_reused: int
    bytes_reused: int
    last: RefreshResult | None
    #: ``model/version/variant`` → the code it was refused with (a copy).
    rejected: Mapping[str, str]
    #: Models unloaded because their per-model assignment keys were deleted.
    removals: int = 0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Refresher:
    """See the module docstring. ``run`` until cancelled; ``check`` does one pass."""

    def __init__(
        self,
        *,
        fleet: str,
        node: str,
        link: Link,
        models: ModelManager,
        report: Report,
        timings: RefreshTimings | None = None,
        now: Callable[[], datetime] = _utcnow,
        is_blocked: Callable[[ModelRef], bool] | None = None,
        on_assigned: Callable[[str, int], Awaitable[None]] | None = None,
        profile: str = "",
        trust_refresh: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """``timings``: download timeout, operation timeout, poll interval and retry backoff
        (``EdgeConfig.refresh``; validated there). ``profile``: the node's device profile
        name; when an assignment leaves the variant to the node, the one made for that
        profile is taken (``shared.variants.choose_variant``). ``trust_refresh``: re-read the
        fleet's key list (``edge.keys``), True when a newer one was accepted; a bundle signed
        by a key this node does not know is tried once more after it (key rotation)."""
        self._profile = profile
        self._trust_refresh = trust_refresh
        self._node_key = names.assignment_key(fleet, names.validate_id(node, "node"))
        self._fleet_key = names.assignment_key(fleet)
        self._fleet, self._node = fleet, node
        self._link = link
        self.models = models
        self._report = report
        self.set_timings(timings if timings is not None else RefreshTimings())
        self._now = now
        #: Versions this node abandoned on its own (``edge.safety``): never fetched again.
        self._is_blocked = is_blocked or (lambda ref: False)
        #: Told (model, version) of every assignment read, before it is acted on
        #: (``SafetyMonitor.assigned``: the versions the cloud moved the node back from).
        self._on_assigned = on_assigned
        self._failures = 0
        self._wake: anyio.Event | None = None  # made in the event loop, by run()
        #: (ref, assigned_at) of assignments whose bundle was refused: not fetched again.
        self._refused: set[tuple[str, int, str, datetime]] = set()
        self._skipped: set[tuple[str, int, str, datetime]] = set()
        #: The download cut short by cancellation (link lost): reported at the next attempt.
        self._interrupted: tuple[ModelRef, str] | None = None
        self.stats = _Counters()
        self._checking = anyio.Lock()
        #: Keys whose value did not decode in the current check (``_read``).
        self._invalid: set[str] = set()

    def set_timings(self, t: RefreshTimings) -> None:
        """Use ``t`` from the next operation on (pushed fleet configuration)."""
        self._download_timeout = t.download_timeout
        self._op_timeout = t.op_timeout
        self._poll = t.poll_interval
        self._retry = Backoff(t.retry_initial, max(t.retry_initial, t.retry_max))

    def statistics(self) -> RefreshStatistics:
        """A frozen snapshot of the counters (changing it changes nothing here)."""
        c = self.stats
        return RefreshStatistics(
            checks=c.checks,
            installs=c.installs,
            rejections=c.rejections,
            download_failures=c.download_failures,
            blocked_skips=c.blocked_skips,
            bytes_downloaded=c.bytes_downloaded,
            files_reused=c.files_reused,
            bytes_reused=c.bytes_reused,
            last=c.last,
            rejected=MappingProxyType(dict(c.rejected)),
            removals=c.removals,
        )

    # -- the service ------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the assignment for as long as the node runs: one session per time online."""
        while True:
            await self._link.wait_online()
            try:
                await self._online_session()
            except _NATS_ERRORS as exc:
                log.info("refresh_session_ended", error=f"{type(exc).__name__}: {exc}")
            except BaseExceptionGroup as group:  # from the session's task group
                network, rest = group.split(_NATS_ERRORS)
                if rest is not None:
                    raise rest from None
                log.info("refresh_session_ended", error=repr(network))
            if self._link.state is LinkState.ONLINE:
                # Still online, so the session failed on its own: do not spin.
                await anyio.sleep(self._retry_delay(max(1, self._failures)))

    async def _online_session(self) -> None:
        lost = anyio.Event()

        def on_change(state: LinkState) -> None:
            if state is not LinkState.ONLINE:
                lost.set()

        unsubscribe = self._link.on_change(on_change)
        watchers: list[Any] = []
        try:
            js = self._link.js
            async with anyio.create_task_group() as tg:

                async def stop_when_offline() -> None:
                    await lost.wait()
                    log.debug("refresh_offline")
                    tg.cancel_scope.cancel()

                tg.start_soon(stop_when_offline)
                # Watch before the first read, so nothing written in between is missed.
                watchers.extend(await self._watch())
                while True:
                    self._wake = anyio.Event()
                    result = await self._check(js)
                    retry = result is not None and not result.ok and result.code in RETRYABLE
                    wait = self._retry_delay(self._failures) if retry else self._poll
                    with anyio.move_on_after(wait):
                        await self._wake.wait()
        finally:
            unsubscribe()
            with anyio.move_on_after(1.0, shield=True):
                for watcher in watchers:
                    try:
                        with nats_errors("kv watch", "assignment", self._link.url):
                            await watcher.unsubscribe()
                    except _NATS_ERRORS as exc:  # offline: the server drops it on its own
                        log.debug("watcher_stop_failed", error=repr(exc))

    async def _watch(self) -> list[Any]:
        """Wake-ups on every new value of the node's assignment keys: core subscriptions on
        ``names.assignment_subjects`` (its own key, its fleet's, and the per-model keys under
        each), where the bucket republishes each put, headers only. A hint only: the value is
        read by a direct get (``_check``), so a missed message costs at most a poll. A
        subscription the server refuses (permissions of an older release) is reported on
        the link's error callback; the node then polls."""
        nc = self._link.nc

        async def wake(_msg: Any) -> None:
            if self._wake is not None:
                self._wake.set()

        subs: list[Any] = []
        try:
            for subject in names.assignment_subjects(self._fleet, self._node):
                with nats_errors("kv watch", subject, self._link.url):
                    subs.append(await nc.subscribe(subject, cb=wake))
        except BaseException:
            for sub in subs:
                await self._unsubscribe(sub, "assignment")
            raise
        return subs

    async def _unsubscribe(self, sub: Any, key: str) -> None:
        with (
            anyio.move_on_after(1.0, shield=True),
            contextlib.suppress(*_NATS_ERRORS),
            nats_errors("kv watch", key, self._link.url),
        ):
            await sub.unsubscribe()

    def _retry_delay(self, failures: int) -> float:
        return self._retry.delay(failures)

    async def _op(self, op: Awaitable[Any], kind: str, name: str) -> Any:
        """``op`` within the per-call timeout (``TimeoutError``), nats-py's errors translated
        (``NotFound``, ``JetStreamRefused``, ``NatsUnavailable``) naming ``kind`` ``name``."""
        with anyio.fail_after(self._op_timeout), nats_errors(kind, name, self._link.url):
            return await op

    # -- one pass ---------------------------------------------------------------------------

    async def check(self) -> RefreshResult | None:
        """Read the assignment now and install what it names if that is not current.
        Returns the outcome, or None when nothing was to be done. Needs the link online."""
        return await self._check(self._link.js)

    async def _check(self, js: JetStreamContext) -> RefreshResult | None:
        """Follow every assignment (``_assignments``) once. Returns the first outcome worth a
        quick retry, else the last outcome, else None. One check at a time (``check`` may be
        called while the service's own runs): two would download into the same partial file."""
        async with self._checking:
            return await self._check_locked(js)

    async def _check_locked(self, js: JetStreamContext) -> RefreshResult | None:
        self.stats.checks += 1
        outcome: RefreshResult | None = None
        assignments, unassigned = await self._assignments(js)
        for model in unassigned:
            await self._remove(model)
        for assignment in assignments:
            result = await self._follow(js, assignment)
            if result is None:
                continue
            if outcome is None or not (not outcome.ok and outcome.code in RETRYABLE):
                outcome = result
        return outcome

    async def _remove(self, model: str) -> None:
        """Stop serving ``model``, whose per-model keys were all deleted (it was assigned
        side by side and is no longer): unloaded and dropped from the cache, reported."""
        if self.models.get(model) is None:
            return
        why = f"model {model!r} is no longer assigned to this node (its assignment keys were deleted)"
        if await self.models.withdraw(model, why):
            self.stats.removals += 1
            log.warning("model_unassigned", model=model)
            await self._report(NodeEvent.MODEL_REMOVED, last_error=why)

    async def _assignments(self, js: JetStreamContext) -> tuple[list[Assignment], list[str]]:
        """What the node should run, one assignment per model name, default model first;
        and the models whose per-model keys all exist only as deletions (no longer assigned:
        ``_remove``), unless a legacy key names them.

        The legacy keys (``<fleet>.<node>``, else ``<fleet>._fleet``) name the default model,
        as for a single-model node. Per-model keys (``names.assignment_key(..., model=)``)
        assign models side by side; for one model name the node's own per-model key wins,
        then its legacy key (if it names that model), then the fleet's per-model key, then
        the fleet's legacy key. Per-model keys are found by listing the key names
        (``shared.kv.kv_keys``) at each check (each poll, wake-up and reconnect)."""
        self._invalid.clear()
        own = await self._read(js, self._node_key)
        fleet_wide = await self._read(js, self._fleet_key)
        legacy = own or fleet_wide
        found: dict[str, Assignment] = {} if legacy is None else {legacy.model: legacy}
        gone: list[str] = []
        for model, (has_own, has_fleet) in (await self._model_keys(js)).items():
            a = (
                await self._read(js, names.assignment_key(self._fleet, self._node, model))
                if has_own
                else None
            )
            if a is None and own is not None and own.model == model:
                continue  # the node's legacy key already names it
            if a is None and has_fleet:
                a = await self._read(js, names.assignment_key(self._fleet, None, model))
            if a is None:
                keys = {names.assignment_key(self._fleet, n, model) for n in (self._node, None)}
                if not keys & self._invalid:  # deleted, not merely a bad write
                    gone.append(model)
                continue
            if a.model != model:
                log.error("assignment_misfiled", key_model=model, model=a.model, note="ignored")
                continue
            found[model] = a
        return list(found.values()), [m for m in gone if m not in found]

    async def _model_keys(self, js: JetStreamContext) -> dict[str, tuple[bool, bool]]:
        """Model names with a per-model key: ``{model: (node's own key exists, fleet's key
        exists)}`` (deleted keys are listed too: reading them gives None). {} when the
        server refuses the listing (the node then follows its legacy keys only)."""
        out: dict[str, tuple[bool, bool]] = {}
        for node in (self._node, None):
            prefix = names.assignment_key(self._fleet, node) + "."
            try:
                keys = await self._op(kv_keys(js, names.ASSIGNMENTS_BUCKET, prefix + ">"), "kv keys", prefix)
            except (NotFound, JetStreamRefused) as exc:
                log.debug("assignment_keys_unlisted", prefix=prefix, error=str(exc))
                continue
            for key in keys:
                model = key[len(prefix) :]
                try:
                    names.validate_model_name(model)
                except ValueError as exc:  # a key no model can have: someone else's bad write
                    log.error("assignment_key_invalid", key=key, error=str(exc))
                    continue
                mine, theirs = out.get(model, (False, False))
                out[model] = (mine or node is not None, theirs or node is None)
        return out

    async def _follow(self, js: JetStreamContext, assignment: Assignment) -> RefreshResult | None:
        """Install what ``assignment`` names unless its model already runs it."""
        if assignment.withdrawn is not None:  # yanked, no earlier good version: serve none of it
            await self.models.withdraw(assignment.model, assignment.withdrawn)
            return None
        if self._on_assigned is not None:
            await self._on_assigned(assignment.model, assignment.version)
        try:
            ref = await self._wanted(js, assignment)
        except _NATS_ERRORS as exc:  # a timeout reading the registry on a slow link
            failure = BundleError(
                f"{assignment.model}/{assignment.version}",
                f"reading the registry failed: {type(exc).__name__}: {exc}",
                BundleCode.DOWNLOAD_FAILED,
            )
            return await self._refused_result(
                ModelRef(name=assignment.model, version=assignment.version, variant="?"), assignment, failure
            )
        except BundleError as exc:  # no variant's manifest is in the registry (yet)
            return await self._refused_result(
                ModelRef(name=assignment.model, version=assignment.version, variant="?"), assignment, exc
            )
        current = self.models.get(ref.name)
        if current is not None and current.ref == ref:
            self._failures = 0
            return None
        if (ref.name, ref.version, ref.variant, assignment.assigned_at) in self._refused:
            return None
        if self._is_blocked(ref):
            self.stats.blocked_skips += 1
            if (ref.name, ref.version, ref.variant, assignment.assigned_at) not in self._skipped:
                self._skipped.add((ref.name, ref.version, ref.variant, assignment.assigned_at))
                log.warning("refresh_skipped_blocked", model=ref.name, version=ref.version)
            return None
        before = self.stats.bytes_downloaded
        interrupted, self._interrupted = self._interrupted, None
        if interrupted is not None and interrupted[0] == ref:
            # The last attempt was cut off with the link: report it now that we can.
            self.stats.download_failures += 1
            failed = RefreshResult(
                model=ref, ok=False, code=BundleCode.DOWNLOAD_FAILED, reason=interrupted[1], at=self._now()
            )
            self.stats.last = failed
            await self._report(NodeEvent.MODEL_REJECTED, refresh=failed)
        log.info("refresh_start", model=ref.name, version=ref.version, variant=ref.variant)
        try:
            await self._install_trusting(js, ref)
        except BundleError as exc:
            return await self._refused_result(ref, assignment, exc)
        except anyio.get_cancelled_exc_class():
            held = self.stats.bytes_downloaded - before
            self._interrupted = (ref, f"interrupted (link lost or node stopping) after {held} bytes; resumes")
            raise
        self._failures = 0
        self.stats.installs += 1
        result = RefreshResult(model=ref, ok=True, at=self._now())
        self.stats.last = result
        await self._report(NodeEvent.MODEL_INSTALLED, refresh=result)
        return result

    async def _install_trusting(self, js: JetStreamContext, ref: ModelRef) -> None:
        """``_fetch_and_install``; a bundle signed by an unknown key is tried once more after
        a newer key list arrived (it may name the key that signed it: rotation)."""
        try:
            await self._fetch_and_install(js, ref)
        except BundleError as exc:
            if exc.code != BundleCode.UNKNOWN_KEY or self._trust_refresh is None:
                raise
            if not await self._trust_refresh():
                raise
            log.info("refresh_retry_after_keylist", model=ref.name, version=ref.version)
            await self._fetch_and_install(js, ref)

    async def _refused_result(self, ref: ModelRef, assignment: Assignment, exc: BundleError) -> RefreshResult:
        result = RefreshResult(model=ref, ok=False, code=exc.code, reason=exc.reason, at=self._now())
        self.stats.last = result
        if exc.code in RETRYABLE:
            self._failures += 1
            self.stats.download_failures += 1
            log.warning(
                "refresh_failed", model=ref.name, version=ref.version, code=exc.code, reason=exc.reason
            )
        else:
            self._refused.add((ref.name, ref.version, ref.variant, assignment.assigned_at))
            self.stats.rejections += 1
            self.stats.rejected[f"{ref.name}/{ref.version}/{ref.variant}"] = exc.code
            log.error("model_rejected", model=ref.name, version=ref.version, code=exc.code, reason=exc.reason)
        await self._report(NodeEvent.MODEL_REJECTED, refresh=result)
        return result

    async def _read(self, js: JetStreamContext, key: str) -> Assignment | None:
        value = await self._op(kv_get_direct(js, names.ASSIGNMENTS_BUCKET, key), "kv key", key)
        if value is None:  # missing or deleted
            return None
        try:
            a = decode_json(value, Assignment)
            names.validate_model_name(a.model)
            for variant in [a.variant] if a.variant is not None else a.variants:
                names.validate_id(variant, "variant")
            if a.version < 1:
                raise ValueError(f"version must be >= 1, got {a.version!r}")
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            # Someone else's bad write must not stop the node following later good ones,
            # nor unload what the key assigned before (``_assignments``).
            log.error("assignment_invalid", key=key, error=str(exc))
            self._invalid.add(key)
            return None
        return a

    async def _wanted(self, js: JetStreamContext, a: Assignment) -> ModelRef:
        if a.variant is not None:
            return ModelRef(name=a.model, version=a.version, variant=a.variant)
        needs: dict[str, int] = {}
        unmet_by: dict[str, list[str]] = {}
        for variant in a.variants:
            index = await self._index(js, a.model, a.version, variant)
            if index is None:
                continue
            missing = unmet(index.requires or Requirements(), CAPABILITIES)
            if missing:
                unmet_by[variant] = missing
                continue
            needs[variant] = index.min_memory_mb
        if not needs:
            if unmet_by:
                raise BundleError(
                    f"{a.model}/{a.version}",
                    f"this runtime can run none of the variants: {unmet_by} (not downloaded)",
                    BundleCode.INCOMPATIBLE,
                )
            raise BundleError(
                f"{a.model}/{a.version}",
                f"no manifest of variants {a.variants} in the registry",
                BundleCode.DOWNLOAD_FAILED,
            )
        return ModelRef(
            name=a.model,
            version=a.version,
            variant=choose_variant(
                needs, DeviceProfile(memory_mb=self.models.memory_mb, profile=self._profile)
            ),
        )

    async def _index(
        self, js: JetStreamContext, model: str, version: int, variant: str
    ) -> BundleIndex | None:
        """The bundle's small index; for a bundle pushed by an older registry, the index
        fields of its manifest (read whole: older registries wrote nothing smaller)."""
        for key in (
            names.bundle_index_key(model, version, variant),
            names.manifest_key(model, version, variant),
        ):
            value = await self._op(kv_get_direct(js, names.MODELS_MANIFEST_BUCKET, key), "kv key", key)
            if value is None:
                continue
            try:
                if key.startswith("_"):
                    return decode_json(value, BundleIndex)
                m = decode_json(value, ModelManifest)
            except (msgspec.DecodeError, ValueError) as exc:
                log.warning("index_undecodable", key=key, error=str(exc))
                continue
            return BundleIndex(
                name=m.name,
                version=m.version,
                variant=m.variant,
                manifest_sha256="",
                manifest_size=0,
                min_memory_mb=m.min_memory_mb,
                requires=requirements_of(m),
            )
        return None

    # -- download and install ---------------------------------------------------------------

    def _precheck(self, ref: ModelRef, index: BundleIndex) -> None:
        """Refuse before downloading what the registry's index already says cannot run
        here. Only ever refuses: the signed manifest is what install trusts."""
        where = f"{ref.name}/{ref.version}/{ref.variant}"
        missing = unmet(index.requires or Requirements(), CAPABILITIES)
        if missing:
            raise BundleError(
                where,
                f"this runtime cannot run it: needs {', '.join(missing)} (not downloaded)",
                BundleCode.INCOMPATIBLE,
            )
        over = self.models.memory_check(ref.name, index.min_memory_mb)
        if over is not None:
            raise BundleError(where, f"{over} (not downloaded)", BundleCode.TOO_LARGE)

    async def _fetch_and_install(self, js: JetStreamContext, ref: ModelRef) -> None:
        where = f"{ref.name}/{ref.version}/{ref.variant}"
        try:
            index = await self._index(js, ref.name, ref.version, ref.variant)
        except _NATS_ERRORS as exc:
            raise BundleError(
                where,
                f"reading the bundle index failed: {type(exc).__name__}: {exc}",
                BundleCode.DOWNLOAD_FAILED,
            ) from exc
        if index is not None:
            self._precheck(ref, index)
        self.models.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-refresh-", dir=self.models.cache_dir))
        try:
            if index is not None and index.manifest_sha256:
                bundle = await self.download_files(js, ref, index, tmp)
            else:
                bundle = await self.download(js, ref, tmp)
            try:
                await self.models.install(bundle.path, source=f"assignment {ref.name}/{ref.version}")
            except OSError as exc:  # disk full, permissions: the bundle may be fine
                raise BundleError(
                    str(bundle.path), f"cannot install: {exc}", BundleCode.DOWNLOAD_FAILED
                ) from exc
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, tmp, True)

    # -- downloads --------------------------------------------------------------------------

    def _partial(self, name: str) -> Path:
        return self.models.cache_dir / PARTIAL_DIR / name

    def _attempt_limit(self, total_bytes: int) -> float:
        return self._download_timeout + total_bytes / MIN_RATE

    async def _fetch(self, js: JetStreamContext, obj: str, partial: Path, max_size: int | None) -> int:
        """One resumable object download; errors become ``BundleError(download_failed)``
        naming the object and what went wrong (the partial file stays for the next attempt)."""

        def progress(n: int) -> None:
            self.stats.bytes_downloaded += n

        try:
            return await fetch_resumable(
                js,
                names.MODELS_BUCKET,
                obj,
                partial,
                max_size=max_size,
                stall_timeout=STALL_SECONDS,
                on_chunk=progress,
            )
        except NotFound as exc:
            raise BundleError(obj, "no such object in the model store", BundleCode.DOWNLOAD_FAILED) from exc
        except FetchError as exc:
            raise BundleError(obj, f"download incomplete: {exc.reason}", BundleCode.DOWNLOAD_FAILED) from exc
        except _NATS_ERRORS as exc:
            raise BundleError(
                obj, f"download failed: {type(exc).__name__}: {exc}", BundleCode.DOWNLOAD_FAILED
            ) from exc

    async def download_files(
        self, js: JetStreamContext, ref: ModelRef, index: BundleIndex, work_dir: Path
    ) -> Bundle:
        """Fetch ``ref``'s signed manifest (verified before anything else) and each file it
        lists that the node does not hold, into ``work_dir/bundle`` (verification of the files
        is ``ModelManager.install``'s job; each is already hash-checked here). Raises
        ``BundleError``: ``download_failed`` (timeout, stall, network, missing object) or
        what the manifest's checks say (signature, ``invalid``, ``incompatible``)."""
        out = work_dir / "bundle"
        t0 = time.perf_counter()
        limit = self._attempt_limit(index.manifest_size + index.files_bytes)
        try:
            with anyio.fail_after(limit):
                bundle = await self._download_files(js, ref, index, out)
        except TimeoutError as exc:
            raise BundleError(
                f"{ref.name}/{ref.version}/{ref.variant}",
                f"download did not finish within {limit:.0f}s (resumes at the next attempt)",
                BundleCode.DOWNLOAD_FAILED,
            ) from exc
        log.info(
            "model_downloaded",
            model=ref.name,
            version=ref.version,
            seconds=round(time.perf_counter() - t0, 3),
        )
        return bundle

    async def _download_files(
        self, js: JetStreamContext, ref: ModelRef, index: BundleIndex, out: Path
    ) -> Bundle:
        where = f"{ref.name}/{ref.version}/{ref.variant}"
        manifest_obj = names.file_object_name(index.manifest_sha256)
        part = self._partial(index.manifest_sha256)
        await self._fetch(js, manifest_obj, part, index.manifest_size)
        raw = await anyio.to_thread.run_sync(part.read_bytes)
        if hashlib.sha256(raw).hexdigest() != index.manifest_sha256:
            raise BundleError(
                where, "the manifest object does not match the index's sha256", BundleCode.DOWNLOAD_FAILED
            )
        self.models.trust.verify(raw, where)  # signature first: nothing else is fetched for a forgery
        bundle = await anyio.to_thread.run_sync(manifest_only_bundle, out, raw, where)
        if bundle.manifest.ref != ref:
            raise BundleError(
                where, f"manifest is {bundle.manifest.ref}, not the assigned {ref}", BundleCode.INVALID
            )
        for f in bundle.files:
            target = out / f.path
            if await anyio.to_thread.run_sync(self._reuse, f, target):
                continue
            part = self._partial(f.sha256)
            await self._fetch(js, names.file_object_name(f.sha256), part, f.size_bytes)
            await anyio.to_thread.run_sync(_move_checked, part, target, f, where)
        await anyio.to_thread.run_sync(self._clean_partials, index.manifest_sha256)
        return await anyio.to_thread.run_sync(read_bundle, out)

    def _reuse(self, f: BundleFile, target: Path) -> bool:
        """Link (or copy) ``f`` from a bundle the node already holds; False if none has it."""
        held = self.models.find_file(f.sha256, f.size_bytes)
        if held is None:
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(held, target)
        except OSError:
            shutil.copyfile(held, target)
        self.stats.files_reused += 1
        self.stats.bytes_reused += f.size_bytes
        log.info("bundle_file_reused", path=f.path, bytes=f.size_bytes)
        return True

    def _clean_partials(self, manifest_sha: str) -> None:
        d = self.models.cache_dir / PARTIAL_DIR
        for p in (d / manifest_sha, d / (manifest_sha + STATE_SUFFIX)):
            p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty: other partials wait for their next attempt

    async def download(self, js: JetStreamContext, ref: ModelRef, work_dir: Path) -> Bundle:
        """Fetch ``ref``'s archive (a bundle pushed by an older registry) into ``work_dir``,
        resumable, and unpack it there signature-first (not yet verified otherwise: that is
        ``ModelManager.install``'s job). Raises ``BundleError``: ``download_failed``
        (timeout, network, missing object), ``truncated``/``invalid`` (a bad archive)."""
        obj = names.model_object_name(ref.name, ref.version, ref.variant)
        part = self._partial(obj.replace("/", "_") + ".tar")
        t0 = time.perf_counter()
        limit = self._attempt_limit(0)
        try:
            with anyio.fail_after(limit):
                size = await self._fetch(js, obj, part, None)
        except TimeoutError as exc:
            raise BundleError(
                obj, f"download did not finish within {limit:.0f}s", BundleCode.DOWNLOAD_FAILED
            ) from exc
        log.info("model_downloaded", object=obj, bytes=size, seconds=round(time.perf_counter() - t0, 3))
        try:
            bundle = await anyio.to_thread.run_sync(
                unpack_archive, part, work_dir / "bundle", self.models.trust
            )
        finally:
            await anyio.to_thread.run_sync(self._clean_partials, part.name)
        if bundle.manifest.ref != ref:
            raise BundleError(
                obj, f"archive holds {bundle.manifest.ref}, not the assigned {ref}", BundleCode.INVALID
            )
        return bundle


def manifest_only_bundle(out: Path, raw: bytes, where: str) -> Bundle:
    """Write the raw manifest into ``out`` (created) and parse it; file paths validated."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).write_bytes(raw)
    return parse_manifest(out, raw, where)


def _move_checked(part: Path, target: Path, f: BundleFile, where: str) -> None:
    """Move a finished download into the bundle after checking its size and sha256."""
    size = part.stat().st_size
    if size != f.size_bytes or sha256_file(part) != f.sha256:
        part.unlink(missing_ok=True)
        raise BundleError(
            where, f"{f.path}: the downloaded object does not match the manifest", BundleCode.HASH_MISMATCH
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, target)
