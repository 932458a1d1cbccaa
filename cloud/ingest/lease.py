"""Single-active cloud instance: a lease in the KV bucket ``slmops_leases``.

The holder creates the key (``create`` succeeds only when it is absent) and renews it every
third of the TTL with a revision compare-and-set (``update(last=revision)``), so two instances
can never both renew the same lease. The bucket's TTL (``max_age``) removes a lease its holder
stopped renewing (crash, partition), and a standby takes over after at most one TTL.

``valid()`` is the fence the ingest loop checks before each commit: it is false as soon as the
last successful renewal is older than ``ttl * FENCE``, i.e. before the key can have expired
and been taken by someone else, so a holder that was paused never commits after losing it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import structlog
from anyio.abc import TaskStatus
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from slmops.cloud.errors import LeaseLost
from slmops.shared import names
from slmops.shared.config import positive
from slmops.shared.errors import JetStreamRefused, NatsUnavailable, WrongLastSequence
from slmops.shared.jetstream import ensure_kv, nats_errors, stream_info, url_of

__all__ = ["LEASES_BUCKET", "Lease", "ensure_leases_bucket"]

log = structlog.get_logger(__name__)

LEASES_BUCKET = names.LEASES_BUCKET
#: Fraction of the TTL after the last renewal during which the holder may still commit.
FENCE = 0.6


async def ensure_leases_bucket(js: JetStreamContext, ttl: float) -> tuple[KeyValue, float]:
    """The leases bucket, created with ``ttl`` if missing (an existing one is kept as is), and
    the TTL it really has: that one, not ours, decides when an unrenewed lease vanishes, so
    the caller must renew and fence by it."""
    kv = await ensure_kv(js, LEASES_BUCKET, ttl=ttl)
    info = await stream_info(js, f"KV_{LEASES_BUCKET}")
    if info is None:
        raise NatsUnavailable(url_of(js), f"KV {LEASES_BUCKET} vanished right after it was made")
    actual = info.config.max_age or 0.0
    if actual <= 0:
        log.warning("lease_bucket_without_ttl", bucket=LEASES_BUCKET, note="a crashed holder keeps the lease")
        return kv, ttl
    if abs(actual - ttl) > 1e-3:
        log.warning(
            "lease_ttl_differs", bucket=LEASES_BUCKET, configured=ttl, bucket_ttl=actual, using=actual
        )
    return kv, float(actual)


class Lease:
    """One named lease held by ``holder``. ``acquire`` waits for it; ``keep`` renews it."""

    def __init__(
        self,
        kv: KeyValue,
        key: str,
        holder: str,
        ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = positive("ttl", ttl)
        self.key = key
        self.holder = holder
        self._kv = kv
        self._clock = clock
        self._revision: int | None = None
        self._renewed = float("-inf")

    @property
    def held(self) -> bool:
        return self._revision is not None

    def valid(self) -> bool:
        """True while this instance may commit (see the module docstring)."""
        return self._revision is not None and self._clock() - self._renewed < self.ttl * FENCE

    async def try_acquire(self) -> bool:
        started = self._clock()
        try:
            with nats_errors("lease", self.key):
                self._revision = await self._kv.create(self.key, self.holder.encode())
        except WrongLastSequence:
            return False
        self._renewed = started
        log.info("lease_acquired", key=self.key, holder=self.holder, revision=self._revision)
        return True

    async def acquire(self, poll: float | None = None) -> None:
        """Wait until this instance holds the lease (polls every third of the TTL)."""
        interval = poll if poll is not None else self.ttl / 3
        waited = False
        while True:
            try:
                if await self.try_acquire():
                    return
            except (NatsUnavailable, JetStreamRefused) as exc:
                log.warning("lease_acquire_failed", key=self.key, error=str(exc))
            if not waited:
                log.info("lease_standby", key=self.key, holder=self.holder)
                waited = True
            await anyio.sleep(interval)

    async def keep(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Renew until the lease is lost; then raise ``LeaseLost``."""
        task_status.started()
        while True:
            await anyio.sleep(self.ttl / 3)
            started = self._clock()
            try:
                with nats_errors("lease", self.key), anyio.fail_after(self.ttl / 3):
                    self._revision = await self._kv.update(
                        self.key, self.holder.encode(), last=self._revision
                    )
            except WrongLastSequence as exc:
                self._revision = None
                raise LeaseLost(self.key, self.holder, "someone else holds it now") from exc
            except (NatsUnavailable, JetStreamRefused) as exc:
                if not self.valid():
                    self._revision = None
                    raise LeaseLost(self.key, self.holder, f"cannot renew: {exc}") from exc
                log.warning("lease_renew_failed", key=self.key, error=str(exc))
                continue
            self._renewed = started

    async def release(self) -> None:
        """Give the lease up at once (a clean stop), so a standby need not wait for the TTL."""
        revision, self._revision = self._revision, None
        if revision is None:
            return
        try:
            with nats_errors("lease", self.key), anyio.fail_after(self.ttl / 3):
                await self._kv.delete(self.key, last=revision)
            log.info("lease_released", key=self.key, holder=self.holder)
        except JetStreamRefused as exc:
            # 10071: the revision moved on — a renewal cut off by our own shutdown landed, or
            # someone else holds the lease now. Either way it expires on its own.
            log.info("lease_release_skipped", key=self.key, error=exc.description, code=exc.code)
        except NatsUnavailable as exc:
            log.warning("lease_release_failed", key=self.key, error=str(exc))
