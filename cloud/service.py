"""``CloudService``: ingest, fleet state, drift detection and events in one task group.

**One active instance, by a lease.** Several ``slmops cloud`` processes may run against the
same NATS (for availability); exactly one is *active*: the holder of the lease key ``cloud``
(or ``cloud-<fleets>`` for an instance limited to some fleets) in the KV bucket
``slmops_leases`` (``lease.py``: create-if-absent, renewals by revision compare-and-set, TTL).
Standbys poll for the lease and touch nothing else: no consumer, no state, no events — so a
second instance can neither count an aggregate twice nor publish an event twice. The active
instance fences every commit on its lease (it stops committing before the lease can expire),
and on taking over an instance loads the state from its SQLite file, so with a shared state
directory (same host or shared volume) a failover resumes exactly where the last commit left
it; with a separate state directory the new active instance counts from its own (empty or old)
state onwards, and nothing is counted twice in either. Partitioning nodes across instances was
not chosen: drift pooling needs the whole fleet in one place.

Inside the active instance (each a task of one group): lease renewal, the telemetry consumer
(``ingest.py``), the status consumer (``status.py``), the drift-event publisher
(``events.py``) and the fleet snapshot writer (``snapshot.py``). Losing the lease cancels them
all and the instance goes back to standby.

``extra_tasks`` run in the same group, only while active, so a standby never acts on drift
events either. ``assemble(config)`` is the one composition of the cloud: the service with the
rollout controller and the recalibration loop as ``config`` says (``controller_tasks``);
``slmops cloud`` runs it, and ``slmops rollout run`` runs the same controller tasks alone
(``run_controllers``), so both read the same config the same way.

Resources beyond docs/architecture.md §3 (``slmops_leases``, ``slmops_fleet``) are created idempotently here.
"""

from __future__ import annotations

import gc
import os
import socket
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.abc
import structlog
from anyio.abc import TaskGroup
from nats.js import JetStreamContext

from slmops.cloud.analyst.baseline import serve_baselines
from slmops.cloud.analyst.metrics import MetricsRefresher
from slmops.cloud.analyst.web import serve_http
from slmops.cloud.analyst.webhook import run_webhook
from slmops.cloud.audit import serve_changes
from slmops.cloud.config import CloudConfig
from slmops.cloud.drift.calibrate import shared_calibrator
from slmops.cloud.drift.detector import DriftDetector
from slmops.cloud.errors import LeaseLost
from slmops.cloud.fleetconfig import run_config_rollouts
from slmops.cloud.ingest.apply import Applier
from slmops.cloud.ingest.consumers import Consumer, PullLoop, TelemetryIngest, consumer_name
from slmops.cloud.ingest.events import EventPublisher
from slmops.cloud.ingest.lease import Lease, ensure_leases_bucket
from slmops.cloud.ingest.snapshot import SnapshotWriter, ensure_fleet_bucket
from slmops.cloud.ingest.state import NodeState, StateStore
from slmops.cloud.ingest.status import StatusIngest
from slmops.shared.connect import Link, connect_once
from slmops.shared.provision import ensure_resources

__all__ = [
    "ActiveTask",
    "CloudService",
    "ServiceStatistics",
    "assemble",
    "controller_tasks",
    "run_controllers",
    "tune_gc",
]

#: ``await task(js, task_status=...)``: extra work that must run only in the active instance
#: (e.g. the recalibration loop); started after the consumers, cancelled on losing the lease.
ActiveTask = Callable[..., Coroutine[Any, Any, None]]

log = structlog.get_logger(__name__)

C = TypeVar("C", bound=Consumer)


def tune_gc() -> None:
    """Tune the cyclic garbage collector for an ingest process (call once, from the command).

    Ingest allocates many short-lived objects per aggregate (decoded Structs, count lists);
    with the default gen-0 threshold of 700 the collector ran every few aggregates and took
    10-20% of the time (`slmops bench ingest`: 207 → 170 µs per aggregate at 100,000). Cycles
    are rare here, so collecting less often costs little memory.
    """
    gc.set_threshold(100_000, 20, 50)


@dataclass(frozen=True, slots=True)
class ServiceStatistics:
    """A snapshot of ``CloudService.statistics()`` (a standby's counts are zero)."""

    holder: str
    active: bool
    takeovers: int  #: times this instance became the active one
    counters: dict[str, int]  #: the applier's counters (aggregates, duplicates, deadlettered...)
    nodes: int
    events_published: int
    events_pending: int  #: made and not yet published (queued, or in a batch being committed)
    batches: int
    messages: int


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CloudService:
    """``async with CloudService(config) as svc:`` runs the service until the block exits.

    Entering returns at once (connecting happens in the background); ``wait_active`` waits
    until this instance holds the lease and consumes. ``statistics()`` is a cheap snapshot.
    """

    def __init__(
        self,
        config: CloudConfig,
        *,
        clock: Callable[[], datetime] = _utcnow,
        holder: str | None = None,
        extra_tasks: Sequence[ActiveTask] = (),
    ) -> None:
        if not isinstance(config, CloudConfig):
            raise TypeError(f"config must be a CloudConfig, got {type(config).__name__}")
        self.config = config
        self._clock = clock
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_key = consumer_name("cloud", config.fleets)
        self._link = Link(config.nats_url, name=f"slmops-cloud {self.holder}", options=config.connect_options)
        self._tg: TaskGroup | None = None
        self._active = anyio.Event()
        self._applier: Applier | None = None
        self._ingest: TelemetryIngest | None = None
        self._status: StatusIngest | None = None
        self._publisher: EventPublisher | None = None
        self._extra = list(extra_tasks)
        self.takeovers = 0
        #: Figures for ``/metrics`` that need a round trip (refreshed while active).
        self.metrics = MetricsRefresher(self)
        #: (host, port) the console and ``/metrics`` listen on, once serving (``config.http``).
        self.http_address: tuple[str, int] | None = None

    @property
    def active(self) -> bool:
        return self._active.is_set()

    @property
    def nodes(self) -> dict[tuple[str, str], NodeState]:
        """The active instance's fleet state (empty on a standby)."""
        return dict(self._applier.nodes) if self._applier is not None else {}

    @property
    def store(self) -> StateStore | None:
        """The active instance's state store (None on a standby)."""
        return self._applier.store if self._applier is not None else None

    @property
    def ingest_loop(self) -> PullLoop | None:
        """The active instance's telemetry pull loop (None on a standby)."""
        return self._ingest.loop if self._ingest is not None else None

    @property
    def detector(self) -> DriftDetector | None:
        return self._applier.detector if self._applier is not None else None

    async def wait_active(self, timeout: float | None = None) -> None:
        """Return once this instance is the active one; ``TimeoutError`` after ``timeout``."""
        with anyio.fail_after(timeout):
            await self._active.wait()

    def statistics(self) -> ServiceStatistics:
        a = self._applier
        return ServiceStatistics(
            holder=self.holder,
            active=self.active,
            takeovers=self.takeovers,
            counters=dict(a.counters) if a is not None else {},
            nodes=len(a.nodes) if a is not None else 0,
            events_published=self._publisher.published if self._publisher else 0,
            # Queued for publishing, plus those of a batch still being committed (its nodes'
            # counts already show it applied: without them a reader saw "applied, nothing
            # pending" while the batch's events were not yet queued).
            events_pending=(self._publisher.pending if self._publisher else 0)
            + (a.events_in_commit if a is not None else 0),
            batches=self._ingest.loop.batches if self._ingest else 0,
            messages=self._ingest.loop.messages if self._ingest else 0,
        )

    async def __aenter__(self) -> Self:
        await self._link.__aenter__()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        if self.config.http is not None:
            try:
                self.http_address = await tg.start(serve_http, self, self.metrics)
            except BaseException:
                tg.cancel_scope.cancel()
                await tg.__aexit__(None, None, None)
                await self._link.__aexit__(None, None, None)
                raise
        tg.start_soon(self._run, name="cloud-service")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                await self._drain()
                tg.cancel_scope.cancel()
                await tg.__aexit__(exc_type, exc, tb)
        finally:
            await self._link.__aexit__(exc_type, exc, tb)
        return None

    async def _drain(self) -> None:
        """Let the consumers finish their current fetch and batch (bounded), so no message is
        left pending on the server for ``ack_wait`` when this instance stops."""
        loops = [x.loop for x in (self._ingest, self._status) if x is not None]
        for loop in loops:
            loop.request_stop()
        with anyio.move_on_after(self.config.fetch_timeout + 5, shield=True):
            for loop in loops:
                await loop.wait_stopped()

    async def _run(self) -> None:
        await self._link.wait_online()
        js = self._link.js
        await ensure_resources(js)
        leases, ttl = await ensure_leases_bucket(js, self.config.lease_ttl)
        fleet_kv = await ensure_fleet_bucket(js)
        lease = Lease(leases, self.lease_key, self.holder, ttl)
        while True:
            await lease.acquire()
            self.takeovers += 1
            try:
                await self._serve(js, lease, fleet_kv)
            except* LeaseLost as group:
                log.warning("lease_lost", key=self.lease_key, reason=str(group.exceptions[0]))
            finally:
                self._active = anyio.Event()
                with anyio.CancelScope(shield=True):
                    await lease.release()

    def _consumer(self, kind: type[C], js: JetStreamContext, applier: Applier, **extra: Any) -> C:
        cfg = self.config
        return kind(
            self._link.nc,
            js,
            applier,
            fleets=cfg.fleets,
            batch=cfg.batch_size,
            fetch_timeout=cfg.fetch_timeout,
            ack_wait=cfg.ack_wait,
            **extra,
        )

    async def _serve(self, js: JetStreamContext, lease: Lease, fleet_kv: Any) -> None:
        cfg = self.config

        def fence() -> None:
            if not lease.valid():
                raise LeaseLost(lease.key, lease.holder, "not renewed in time; refusing to commit")

        path = Path(cfg.state_dir) / "cloud.sqlite3"
        async with StateStore(path) as store:
            stored = await store.load()
            calibrator = shared_calibrator(cfg.drift.cusum_allowance, cfg.drift.calibration_windows)
            detector = DriftDetector(cfg.drift, self._clock, calibrator.non_blocking())
            detector.load(stored.groups, stored.units)
            publisher = EventPublisher(js, store, stored.outbox)
            snapshots = SnapshotWriter(fleet_kv, stored.nodes, cfg.snapshot_interval)
            applier = Applier(
                store,
                detector,
                stored.nodes,
                stored.counters,
                publisher,
                snapshots,
                clock=self._clock,
                max_pending_seqs=cfg.max_pending_seqs,
                max_seq_jump=cfg.max_seq_jump,
                fence=fence,
            )
            ingest = self._consumer(
                TelemetryIngest,
                js,
                applier,
                max_clock_skew=cfg.max_clock_skew,
                max_window_age=cfg.max_window_age,
            )
            status = self._consumer(StatusIngest, js, applier)
            self._applier, self._ingest, self._publisher = applier, ingest, publisher
            self._status = status
            log.info(
                "cloud_active",
                holder=self.holder,
                state=str(path),
                nodes=len(stored.nodes),
                groups=len(stored.groups),
                pending_events=len(stored.outbox),
            )
            async with anyio.create_task_group() as tg:
                await tg.start(lease.keep)
                await tg.start(detector.calibrator.run_worker)
                await tg.start(publisher.run)
                await tg.start(snapshots.run)
                await tg.start(ingest.run)
                await tg.start(status.run)
                await tg.start(partial(serve_baselines, self._link.nc, applier))
                await tg.start(
                    partial(
                        serve_changes,
                        self._link.nc,
                        js,
                        fleets=cfg.fleets,
                        url=cfg.nats_url,
                        audit_accounts=cfg.audit_accounts,
                    )
                )
                await tg.start(partial(run_config_rollouts, js, fleets=cfg.fleets, url=cfg.nats_url))
                await tg.start(self.metrics.run, self._link.nc, js)
                if cfg.webhook_url is not None:
                    await tg.start(partial(run_webhook, js, cfg.webhook_url, cfg.fleets))
                for task in self._extra:
                    await tg.start(partial(task, js))
                self._active.set()


def controller_tasks(config: CloudConfig) -> list[ActiveTask]:
    """What only the active cloud runs beside ingest, from ``config``: the rollout controller
    (``rollouts``, every ``rollout_interval``, limited to ``fleets``) and the recalibration
    loop (``recalibrate`` with ``key``, ``rollout`` and ``recalibration_cooldown``). Reads the
    key now: raises ``cloud.recalibration.loop.KeyFileError`` for an unusable key file."""
    tasks: list[ActiveTask] = []
    if config.rollouts:
        from slmops.cloud.rollout import RolloutRunner

        async def run_rollouts(js: JetStreamContext, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            runner = RolloutRunner(
                js, url=config.nats_url, interval=config.rollout_interval, fleets=config.fleets
            )
            await runner.run(task_status=task_status)

        tasks.append(run_rollouts)
    if config.recalibrate != "off" and config.key is not None:
        from slmops.cloud.recalibration.loop import RecalibrationLoop, load_cloud_key, run_loop

        key = load_cloud_key(Path(config.key))

        async def run_recalibration(
            js: JetStreamContext, *, task_status: Any = anyio.TASK_STATUS_IGNORED
        ) -> None:
            loop = RecalibrationLoop(
                js,
                key,
                policy=config.recalibrate,
                rollout=config.rollout.config(),
                cooldown=config.recalibration_cooldown,
                url=config.nats_url,
            )
            await run_loop(js, loop, task_status=task_status)

        tasks.append(run_recalibration)
    return tasks


def assemble(config: CloudConfig) -> CloudService:
    """The cloud as ``config`` describes it: ingest, drift and events, plus the controller
    tasks (``controller_tasks``) while active. ``async with assemble(config) as svc:``."""
    return CloudService(config, extra_tasks=controller_tasks(config))


async def run_controllers(
    config: CloudConfig, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run ``controller_tasks(config)`` alone (no ingest, no lease) until cancelled: connect
    (``NatsUnavailable`` if the server cannot be reached within 5 s), provision, start each
    task, then report started. Safe beside a cloud service: rollout state writes are
    compare-and-set, and drift events reach the loop through one durable consumer."""
    tasks = controller_tasks(config)
    nc = await connect_once(
        config.nats_url, timeout=5.0, name="slmops-controllers", options=config.connect_options
    )
    try:
        js = nc.jetstream()
        await ensure_resources(js)
        async with anyio.create_task_group() as tg:
            for task in tasks:
                await tg.start(partial(task, js))
            task_status.started()
    finally:
        with anyio.move_on_after(5, shield=True):
            await nc.drain()
