"""The node follows its model assignment (DESIGN §6, §9).

While online it watches its own key and the fleet-wide key of KV ``slmops_assignments``; on
every (re)connect, at start and every ``poll_interval`` it re-reads both, because a watch can
miss updates (a watcher took 10-20 s to recover after a server restart here). The node's own
key overrides the fleet-wide one. A wanted version that is not current is downloaded from the
``slmops_models`` object store into a temp file (streamed to disk, linear, unlike a plain get;
``edge._fetch`` says why not ``get(writeinto=...)``) under an overall timeout, unpacked into a
temp directory inside the model cache, and handed to ``ModelManager.install``, which
verifies, smoke-tests and swaps atomically. The temp directory
is removed whatever happens (and a crash leaves only ``.tmp-*``, which the cache removes at
start). Every outcome is reported with ``NodeStatus.refresh``.

A bundle refused for what it is (signature, hash, load, smoke test...) is not fetched again
for the same assignment; a failed download is retried with backoff. A version the node's
safety monitor rolled back and blocked is not fetched again at all.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js import errors as js_errors
from nats.js.kv import KeyValue

from slmops.edge._fetch import FetchError, fetch_object
from slmops.edge.models import ModelManager
from slmops.shared import names
from slmops.shared.bundle import Bundle, unpack_archive
from slmops.shared.connect import Link, LinkState
from slmops.shared.errors import BundleError, NatsUnavailable
from slmops.shared.messages import (
    Assignment,
    DeviceProfile,
    ModelManifest,
    ModelRef,
    RefreshResult,
    decode_json,
)
from slmops.shared.variants import choose_variant

__all__ = ["RETRYABLE", "RefreshStatistics", "Refresher"]

log = structlog.get_logger(__name__)

#: ``await report(event, refresh=RefreshResult)`` publishes a status (``EdgeNode.report_status``).
Report = Callable[..., Awaitable[bool]]

#: Codes worth trying again later: the bundle may be fine, the way to it was not.
RETRYABLE = frozenset({"download_failed"})

_NATS_ERRORS = (nats.errors.Error, OSError, NatsUnavailable)


@dataclass
class RefreshStatistics:
    checks: int = 0
    installs: int = 0
    rejections: int = 0
    download_failures: int = 0
    #: Checks that found the assigned version on the node's block list (``edge.safety``).
    blocked_skips: int = 0
    bytes_downloaded: int = 0
    last: RefreshResult | None = None
    rejected: dict[str, str] = field(default_factory=dict)


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
        download_timeout: float = 120.0,
        op_timeout: float = 10.0,
        poll_interval: float = 60.0,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        now: Callable[[], datetime] = _utcnow,
        is_blocked: Callable[[ModelRef], bool] | None = None,
    ) -> None:
        self._node_key = names.assignment_key(fleet, names.validate_id(node, "node"))
        self._fleet_key = names.assignment_key(fleet)
        for what, value in (
            ("download_timeout", download_timeout),
            ("op_timeout", op_timeout),
            ("poll_interval", poll_interval),
            ("retry_initial", retry_initial),
            ("retry_max", retry_max),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
        self._link = link
        self.models = models
        self._report = report
        self._download_timeout = download_timeout
        self._op_timeout = op_timeout
        self._poll = poll_interval
        self._retry = (retry_initial, retry_max)
        self._now = now
        #: Versions this node abandoned on its own (``edge.safety``): never fetched again.
        self._is_blocked = is_blocked or (lambda ref: False)
        self._failures = 0
        self._wake: anyio.Event | None = None  # made in the event loop, by run()
        #: (ref, assigned_at) of assignments whose bundle was refused: not fetched again.
        self._refused: set[tuple[str, int, str, datetime]] = set()
        self._skipped: set[tuple[str, int, str, datetime]] = set()
        self.stats = RefreshStatistics()

    def statistics(self) -> RefreshStatistics:
        return self.stats

    # -- the service ------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the assignment for as long as the node runs: one session per time online."""
        while True:
            await self._link.wait_online()
            try:
                await self._online_session()
            except _NATS_ERRORS as exc:
                log.info("refresh_session_ended", error=f"{type(exc).__name__}: {exc}")
            if self._link.state is LinkState.ONLINE:
                # Still online, so the session failed on its own: do not spin.
                await anyio.sleep(self._retry_delay(max(1, self._failures)))

    async def _online_session(self) -> None:
        lost = anyio.Event()

        def on_change(state: LinkState) -> None:
            if state is not LinkState.ONLINE:
                lost.set()

        unsubscribe = self._link.on_change(on_change)
        watchers: list[KeyValue.KeyWatcher] = []
        try:
            js = self._link.js
            kv = await self._op(js.key_value(names.ASSIGNMENTS_BUCKET))
            async with anyio.create_task_group() as tg:

                async def stop_when_offline() -> None:
                    await lost.wait()
                    log.debug("refresh_offline")
                    tg.cancel_scope.cancel()

                tg.start_soon(stop_when_offline)
                # Watch before the first read, so nothing written in between is missed.
                for key in (self._node_key, self._fleet_key):
                    watcher = await self._op(kv.watch(key))
                    watchers.append(watcher)
                    tg.start_soon(self._pump, watcher)
                while True:
                    self._wake = anyio.Event()
                    result = await self._check(js, kv)
                    retry = result is not None and not result.ok and result.code in RETRYABLE
                    wait = self._retry_delay(self._failures) if retry else self._poll
                    with anyio.move_on_after(wait):
                        await self._wake.wait()
        finally:
            unsubscribe()
            with anyio.move_on_after(1.0, shield=True):
                for watcher in watchers:
                    try:
                        await watcher.stop()  # type: ignore[no-untyped-call]
                    except _NATS_ERRORS as exc:  # offline: the server drops it on its own
                        log.debug("watcher_stop_failed", error=repr(exc))

    async def _pump(self, watcher: KeyValue.KeyWatcher) -> None:
        async for _ in watcher:  # entries, delete markers, the initial "up to date" None
            if self._wake is not None:
                self._wake.set()

    def _retry_delay(self, failures: int) -> float:
        initial, cap = self._retry
        return float(min(cap, initial * 2.0 ** max(0, failures - 1)))

    async def _op(self, op: Awaitable[Any]) -> Any:
        with anyio.fail_after(self._op_timeout):
            return await op

    # -- one pass ---------------------------------------------------------------------------

    async def check(self) -> RefreshResult | None:
        """Read the assignment now and install what it names if that is not current.
        Returns the outcome, or None when nothing was to be done. Needs the link online."""
        js = self._link.js
        kv = await self._op(js.key_value(names.ASSIGNMENTS_BUCKET))
        return await self._check(js, kv)

    async def _check(self, js: JetStreamContext, kv: KeyValue) -> RefreshResult | None:
        self.stats.checks += 1
        assignment = await self._read(kv, self._node_key) or await self._read(kv, self._fleet_key)
        if assignment is None:
            return None
        try:
            ref = await self._wanted(js, assignment)
        except BundleError as exc:  # no variant's manifest is in the registry (yet)
            return await self._refused_result(
                ModelRef(name=assignment.model, version=assignment.version, variant="?"), assignment, exc
            )
        current = self.models.current
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
        log.info("refresh_start", model=ref.name, version=ref.version, variant=ref.variant)
        try:
            await self._fetch_and_install(js, ref)
        except BundleError as exc:
            return await self._refused_result(ref, assignment, exc)
        self._failures = 0
        self.stats.installs += 1
        result = RefreshResult(model=ref, ok=True, at=self._now())
        self.stats.last = result
        await self._report("model_installed", refresh=result)
        return result

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
        await self._report("model_rejected", refresh=result)
        return result

    async def _read(self, kv: KeyValue, key: str) -> Assignment | None:
        try:
            entry = await self._op(kv.get(key))
        except js_errors.NotFoundError:  # missing or deleted
            return None
        if entry.value is None:
            return None
        try:
            a = decode_json(entry.value, Assignment)
            names.validate_model_name(a.model)
            for variant in [a.variant] if a.variant is not None else a.variants:
                names.validate_id(variant, "variant")
            if a.version < 1:
                raise ValueError(f"version must be >= 1, got {a.version!r}")
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            # Someone else's bad write must not stop the node following later good ones.
            log.error("assignment_invalid", key=key, error=str(exc))
            return None
        return a

    async def _wanted(self, js: JetStreamContext, a: Assignment) -> ModelRef:
        if a.variant is not None:
            return ModelRef(name=a.model, version=a.version, variant=a.variant)
        kv = await self._op(js.key_value(names.MODELS_MANIFEST_BUCKET))
        needs: dict[str, int] = {}
        for variant in a.variants:
            try:
                entry = await self._op(kv.get(names.manifest_key(a.model, a.version, variant)))
                needs[variant] = decode_json(entry.value or b"", ModelManifest).min_memory_mb
            except js_errors.NotFoundError:
                continue
            except (msgspec.DecodeError, ValueError) as exc:
                log.warning("manifest_undecodable", variant=variant, error=str(exc))
        if not needs:
            raise BundleError(
                f"{a.model}/{a.version}",
                f"no manifest of variants {a.variants} in the registry",
                "download_failed",
            )
        return ModelRef(
            name=a.model,
            version=a.version,
            variant=choose_variant(needs, DeviceProfile(memory_mb=self.models.memory_mb)),
        )

    # -- download and install ---------------------------------------------------------------

    async def _precheck(self, js: JetStreamContext, ref: ModelRef) -> None:
        """Refuse before downloading what the registry's manifest already says cannot run
        here. Only ever refuses: the signed manifest inside the bundle is what install trusts."""
        memory = self.models.memory_mb
        if memory <= 0:
            return
        kv = await self._op(js.key_value(names.MODELS_MANIFEST_BUCKET))
        try:
            entry = await self._op(kv.get(names.manifest_key(ref.name, ref.version, ref.variant)))
            need = decode_json(entry.value or b"", ModelManifest).min_memory_mb
        except (js_errors.NotFoundError, msgspec.DecodeError):
            return  # the download will tell
        if need > memory:
            raise BundleError(
                f"{ref.name}/{ref.version}/{ref.variant}",
                f"needs {need} MB of memory, this device has {memory} MB (not downloaded)",
                "too_large",
            )

    async def _fetch_and_install(self, js: JetStreamContext, ref: ModelRef) -> None:
        await self._precheck(js, ref)
        self.models.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-refresh-", dir=self.models.cache_dir))
        try:
            bundle = await self.download(js, ref, tmp)
            try:
                await self.models.install(bundle.path, source=f"assignment {ref.name}/{ref.version}")
            except OSError as exc:  # disk full, permissions: the bundle may be fine
                raise BundleError(str(bundle.path), f"cannot install: {exc}", "download_failed") from exc
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, tmp, True)

    async def download(self, js: JetStreamContext, ref: ModelRef, work_dir: Path) -> Bundle:
        """Fetch ``ref``'s archive into ``work_dir`` and unpack it there (not yet verified:
        that is ``ModelManager.install``'s job). Raises ``BundleError``: ``download_failed``
        (timeout, network, missing object), ``truncated``/``invalid`` (a bad archive)."""
        obj = names.model_object_name(ref.name, ref.version, ref.variant)
        archive = work_dir / "bundle.tar"
        t0 = time.perf_counter()
        try:
            with anyio.fail_after(self._download_timeout), archive.open("wb") as f:
                await fetch_object(js, names.MODELS_BUCKET, obj, f)
        except TimeoutError as exc:
            raise BundleError(
                obj, f"download did not finish within {self._download_timeout}s", "download_failed"
            ) from exc
        except js_errors.NotFoundError as exc:
            raise BundleError(obj, "no such object in the model store", "download_failed") from exc
        except FetchError as exc:
            raise BundleError(obj, f"download incomplete: {exc.reason}", "download_failed") from exc
        except (*_NATS_ERRORS,) as exc:
            raise BundleError(
                obj, f"download failed: {type(exc).__name__}: {exc}", "download_failed"
            ) from exc
        size = archive.stat().st_size
        self.stats.bytes_downloaded += size
        log.info("model_downloaded", object=obj, bytes=size, seconds=round(time.perf_counter() - t0, 3))
        bundle = await anyio.to_thread.run_sync(
            unpack_archive, archive, work_dir / "bundle", self.models.trust
        )
        archive.unlink()
        if bundle.manifest.ref != ref:
            raise BundleError(obj, f"archive holds {bundle.manifest.ref}, not the assigned {ref}", "invalid")
        return bundle
