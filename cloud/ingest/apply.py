"""Applying decoded messages to the fleet state and the detectors, one transaction per batch.

``Applier`` owns the in-memory state of the active instance (loaded from SQLite when it takes
over) and is the only writer of it; a lock serialises the telemetry and status consumers. A
batch is applied in memory, committed in one SQLite transaction, and only then may the caller
ack its messages. If the commit fails the in-memory state is ahead of the disk, so the error
propagates and the service restarts from the stored state.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import structlog
from nats.js import JetStreamContext

from slmops.cloud.drift.detector import DriftDetector
from slmops.cloud.ingest.checks import check_manifest
from slmops.cloud.ingest.dedupe import Admit, SeqTracker
from slmops.cloud.ingest.events import EventPublisher, encode_event
from slmops.cloud.ingest.snapshot import SnapshotWriter
from slmops.cloud.ingest.state import InstallEpoch, NodeState, StateStore
from slmops.shared.errors import JetStreamRefused, NatsUnavailable, NotFound
from slmops.shared.jetstream import nats_errors, url_of
from slmops.shared.messages import (
    ModelManifest,
    ModelRef,
    NodeStatus,
    OpsEvent,
    TelemetryAggregate,
    decode_json,
    encode_json,
)
from slmops.shared.names import MODELS_MANIFEST_BUCKET, events_subject, manifest_key
from slmops.shared.vocabulary import BundleCode

__all__ = ["Applier", "fetch_manifest"]

log = structlog.get_logger(__name__)

#: Seconds a model found missing from the registry is not looked up again.
_UNKNOWN_RECHECK = 60.0
_MANIFEST_CACHE = 10_000
#: Install epochs kept per node id (the least recently stored one goes first; an install
#: that comes back after that is counted from scratch).
MAX_EPOCHS = 16
#: Applied seqs per epoch whose payload hash is kept for the cloned-device check.
RECENT_HASHES = 256


async def fetch_manifest(js: JetStreamContext, model: ModelRef) -> ModelManifest | None:
    """The model's manifest from KV ``slmops_manifests``, or None when absent or unreadable."""
    try:
        key = manifest_key(model.name, model.version, model.variant)
        with nats_errors("kv key", f"{MODELS_MANIFEST_BUCKET}/{key}", url_of(js)):
            kv = await js.key_value(MODELS_MANIFEST_BUCKET)
            entry = await kv.get(key)
    except NotFound:  # no bucket, no key, or a deleted one
        return None
    except (NatsUnavailable, JetStreamRefused, ValueError) as exc:
        log.warning("manifest_fetch_failed", model=model.name, version=model.version, error=repr(exc))
        return None
    if entry.value is None:
        return None
    try:
        return decode_json(entry.value, ModelManifest)
    except msgspec.DecodeError as exc:
        log.warning("manifest_invalid", model=model.name, version=model.version, error=str(exc))
        return None


class Applier:
    """The active instance's state: nodes, detectors, counters; see the module docstring."""

    def __init__(
        self,
        store: StateStore,
        detector: DriftDetector,
        nodes: dict[tuple[str, str], NodeState],
        counters: dict[str, int],
        publisher: EventPublisher,
        snapshots: SnapshotWriter | None,
        *,
        clock: Callable[[], datetime],
        max_pending_seqs: int = 4096,
        max_seq_jump: int = 100_000,
        fence: Callable[[], None] = lambda: None,
        manifest_source: Callable[[JetStreamContext, ModelRef], Awaitable[ModelManifest | None]] = (
            fetch_manifest
        ),
    ) -> None:
        self.store = store
        self.detector = detector
        self.nodes = nodes
        self.counters = counters
        self.publisher = publisher
        self.snapshots = snapshots
        self._clock = clock
        self._max_pending = max_pending_seqs
        self._max_seq_jump = max_seq_jump
        #: (fleet, node, install) whose seq jump this instance reported (one event each).
        self._jumps_reported: set[tuple[str, str, str]] = set()
        self._fence = fence
        self._manifest_source = manifest_source
        self.lock = anyio.Lock()
        #: Events (drift and ops rows) of the batch being committed: made, not yet handed to
        #: the publisher (``CloudService.statistics().events_pending`` counts them).
        self.events_in_commit = 0
        self._manifests: dict[tuple[str, int, str], tuple[ModelManifest | None, float]] = {}
        #: Groups already reported as unregistered by this instance (one event each; the
        #: event id is deterministic, so a restart's repeat is dropped by the stream).
        self._unregistered_seen: set[str] = set()
        self._clones_reported: set[tuple[str, str, str]] = set()

    async def _manifest(self, js: JetStreamContext, model: ModelRef) -> ModelManifest | None:
        """The model's manifest, cached: a found one for good (a version never changes), a
        missing one for ``_UNKNOWN_RECHECK`` seconds (the model may be pushed later)."""
        key = (model.name, model.version, model.variant)
        hit = self._manifests.get(key)
        now = time.monotonic()
        if hit is not None and (hit[0] is not None or now - hit[1] < _UNKNOWN_RECHECK):
            return hit[0]
        manifest = await self._manifest_source(js, model)
        if len(self._manifests) >= _MANIFEST_CACHE:
            self._manifests.clear()
        self._manifests[key] = (manifest, now)
        return manifest

    def _ops_event(
        self, fleet: str, kind: str, ident: str, now: datetime, *, routine: bool = False, **fields: Any
    ) -> tuple[str, str, bytes]:
        """The event (id, subject, body) to publish, logged: a warning, or info when ``routine``
        (a node's first install: a fleet of N new nodes is not N warnings)."""
        event = OpsEvent(id=f"{fleet}.{kind}.{ident}", fleet=fleet, kind=kind, time=now, **fields)
        (log.info if routine else log.warning)(
            "ops_event", id=event.id, kind=kind, fleet=fleet, detail=event.detail
        )
        return event.id, events_subject(fleet), encode_json(event)

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _node(self, fleet: str, node: str, now: datetime) -> NodeState:
        key = (fleet, node)
        state = self.nodes.get(key)
        if state is None:
            state = self.nodes[key] = NodeState(fleet=fleet, node=node, first_seen=now)
        return state

    def _epoch(
        self, node: NodeState, agg: TelemetryAggregate, stored: datetime, ops: list[tuple[str, str, bytes]]
    ) -> InstallEpoch:
        """The seq epoch of ``agg``'s install, created (and reported, for a real install id)
        when new; checks whether another install of this node id is live at the same time."""
        install = agg.install
        epochs = node.epochs
        epoch = epochs.get(install)
        if epoch is None and (install == "" or not epochs):
            # The previous release's single tracker is the legacy epoch's.
            legacy = node.seqs
            if legacy.contiguous or legacy.runs or legacy.abandoned:
                epochs[""] = InstallEpoch(seqs=legacy)
                node.seqs = SeqTracker()
            epoch = epochs.get(install)
        if epoch is None:
            previous = [(k, e) for k, e in epochs.items() if e.aggregates]
            epoch = epochs[install] = InstallEpoch(first_stored=stored)
            if len(epochs) > MAX_EPOCHS:
                oldest = min(
                    (k for k in epochs if k != install),
                    key=lambda k: epochs[k].last_stored or datetime.min.replace(tzinfo=UTC),
                )
                del epochs[oldest]
            if install:
                self._count("installs")
                before = ", ".join(f"{k or 'legacy'} at seq {e.seqs.high}" for k, e in previous[-3:])
                ops.append(
                    self._ops_event(
                        agg.fleet,
                        "install_new",
                        f"{agg.node}.{install}",
                        stored,
                        routine=not previous,
                        node=agg.node,
                        install=install,
                        detail=f"new seq epoch (install {install})"
                        + (f" after {before}" if before else ": the node's first install"),
                    )
                )
            node.install = install
        if epoch.first_stored is None or stored < epoch.first_stored:
            epoch.first_stored = stored
        if epoch.last_stored is None or stored > epoch.last_stored:
            epoch.last_stored = stored
        for other, e in epochs.items():
            if other == install or e.first_stored is None or e.last_stored is None:
                continue
            # Both live: each has an aggregate stored after the other's first one.
            if e.first_stored < stored and epoch.first_stored < e.last_stored:
                pair = "/".join(sorted((other or "legacy", install or "legacy")))
                if pair not in node.conflicts:
                    node.conflicts = [*node.conflicts[-7:], pair]
                    self._count("install_conflicts")
                    ops.append(
                        self._ops_event(
                            agg.fleet,
                            "install_conflict",
                            f"{agg.node}.{pair.replace('/', '.')}",
                            stored,
                            node=agg.node,
                            install=install,
                            detail=f"two installs live on node id {agg.node!r}: {pair} "
                            "(two devices configured with one node id?)",
                        )
                    )
        return epoch

    def _check_clone(
        self,
        node: NodeState,
        epoch: InstallEpoch,
        agg: TelemetryAggregate,
        digest: str | None,
        stored: datetime,
        ops: list[tuple[str, str, bytes]],
    ) -> None:
        """A seen (install, seq) with another payload than the one applied: a cloned device."""
        if digest is None:
            return
        was = epoch.recent.get(agg.seq)
        if was is None or was == digest:
            return
        node.clones += 1
        self._count("clones")
        detail = (
            f"seq {agg.seq} of install {agg.install or 'legacy'} arrived again with other "
            "content: a copied data directory (cloned device)?"
        )
        self._report_once(self._clones_reported, agg, "cloned_device", stored, detail, ops)

    def _report_once(
        self,
        reported: set[tuple[str, str, str]],
        agg: TelemetryAggregate,
        kind: str,
        at: datetime,
        detail: str,
        ops: list[tuple[str, str, bytes]],
    ) -> None:
        """An ops event of ``kind`` about ``agg``'s (node, install), unless this instance
        reported one already (``reported``, bounded): counted each time, reported once."""
        key = (agg.fleet, agg.node, agg.install)
        if key in reported:
            return
        if len(reported) >= _MANIFEST_CACHE:
            reported.clear()
        reported.add(key)
        ident = f"{agg.node}.{agg.install or 'legacy'}"
        event = self._ops_event(agg.fleet, kind, ident, at, node=agg.node, install=agg.install, detail=detail)
        ops.append(event)

    def _seq_jump(
        self,
        node: NodeState,
        agg: TelemetryAggregate,
        high: int,
        at: datetime,
        ops: list[tuple[str, str, bytes]],
    ) -> str:
        """Count a quarantined seq jump (``SeqTracker.jump``), report the first of each
        (node, install) seen by this instance as an ops event; return the dead-letter reason."""
        node.seq_jumps += 1
        self._count("seq_jumps")
        install = agg.install or "legacy"
        reason = (
            f"seq_jump: seq {agg.seq} is more than max_seq_jump ({self._max_seq_jump}) above the highest "
            f"applied seq {high} of install {install}: quarantined, not counted, not missing"
        )
        self._report_once(self._jumps_reported, agg, "seq_jump", at, reason, ops)
        return reason

    async def apply_aggregates(
        self,
        js: JetStreamContext,
        aggs: Sequence[TelemetryAggregate],
        stored: Sequence[datetime] | None = None,
        digests: Sequence[str] | None = None,
    ) -> tuple[int, list[tuple[int, str]]]:
        """Apply a batch (duplicates are dropped) and commit it. Returns how many were new
        and the aggregates refused, as ``(index in aggs, reason)``: labels or histogram
        edges their model does not have, or any error while the detector took them in (the
        caller dead-letters those; nothing of them was applied). An aggregate of a model the
        registry does not know is counted but not drift-tested ("unregistered model")."""
        manifests = {}
        for agg in aggs:
            key = (agg.model.name, agg.model.version, agg.model.variant)
            if key not in manifests:
                manifests[key] = await self._manifest(js, agg.model)
        rejected: list[tuple[int, str]] = []
        async with self.lock:
            now = self._clock()
            dirty: set[tuple[str, str]] = set()
            events = []
            ops: list[tuple[str, str, bytes]] = []
            applied = 0
            for i, agg in enumerate(aggs):
                node = self._node(agg.fleet, agg.node, now)
                at = stored[i] if stored is not None else now
                digest = digests[i] if digests is not None else None
                epoch = self._epoch(node, agg, at, ops)
                dirty.add((agg.fleet, agg.node))
                if epoch.seqs.seen(agg.seq):
                    node.duplicates += 1
                    self._count("duplicates")
                    self._check_clone(node, epoch, agg, digest, at, ops)
                    continue
                high = epoch.seqs.high
                if epoch.seqs.jump(agg.seq, self._max_seq_jump):
                    rejected.append((i, self._seq_jump(node, agg, high, at, ops)))
                    continue
                manifest = manifests[(agg.model.name, agg.model.version, agg.model.variant)]
                try:
                    if manifest is None:
                        new_events = None
                    else:
                        check_manifest(agg, manifest)
                        if not self.detector.has_group(agg.fleet, agg.model):
                            self.detector.add_group(agg.fleet, agg.model, manifest)
                        new_events = self.detector.observe(agg)
                except Exception as exc:  # one message's fault: dead-letter it, go on
                    rejected.append((i, f"{type(exc).__name__}: {exc}"[:1000]))
                    continue
                if new_events is None:
                    node.unregistered += 1
                    self._count("unregistered")
                    gkey = f"{agg.fleet}/{agg.model.name}/{agg.model.version}/{agg.model.variant}"
                    if gkey not in self._unregistered_seen:
                        self._unregistered_seen.add(gkey)
                        ops.append(
                            self._ops_event(
                                agg.fleet,
                                "unregistered_model",
                                f"{agg.model.name}.{agg.model.version}.{agg.model.variant}",
                                now,
                                node=agg.node,
                                model=agg.model,
                                detail="unregistered model: counted, not drift-tested "
                                "(no manifest in the registry)",
                            )
                        )
                else:
                    events += new_events
                seqs = epoch.seqs
                before_gaps = seqs.gaps_opened
                kind = seqs.admit(agg.seq, self._max_pending)
                epoch.aggregates += 1
                if digest is not None:
                    epoch.recent[agg.seq] = digest
                    if len(epoch.recent) > RECENT_HASHES:
                        del epoch.recent[min(epoch.recent)]
                if kind is Admit.LATE:
                    node.late += 1
                    self._count("late")
                if seqs.gaps_opened != before_gaps:
                    self._count("gaps")
                    log.warning(
                        "seq_gap",
                        fleet=agg.fleet,
                        node=agg.node,
                        install=agg.install,
                        seq=agg.seq,
                        missing=seqs.missing,
                        ranges=seqs.missing_ranges(5),
                    )
                applied += 1
                node.inferences += agg.count
                node.errors += agg.errors
                node.windows += agg.windows
                node.aggregates += 1
                node.dropped_inferences += agg.dropped_inferences
                node.dropped_aggregates += agg.dropped_aggregates
                node.model = agg.model
                if node.last_seen is None or at > node.last_seen:
                    node.last_seen = at  # server time (fault 6), never the node's clock
                node.model_registered = new_events is not None
                if node.last_window_end is None or agg.window_end > node.last_window_end:
                    node.last_window_end = agg.window_end
            self._count("aggregates", applied)
            groups, units = self.detector.take_dirty()
            for g, signal, reason in self.detector.take_quarantines():
                self._count("quarantines")
                ops.append(
                    self._ops_event(
                        g.fleet,
                        "signal_quarantined",
                        f"{g.model.name}.{g.model.version}.{g.model.variant}.{signal}.{g.rounds}",
                        now,
                        model=g.model,
                        signal=signal,
                        detail=f"{reason}; counting goes on, the signal is rebuilt from the "
                        f"windows after round {g.quarantine.get(signal, g.rounds)}",
                    )
                )
            rows = [encode_event(e) for e in events] + ops
            self._fence()
            self.events_in_commit = len(rows)
            try:
                await self.store.commit(
                    nodes=[self.nodes[k] for k in dirty],
                    groups=groups,
                    units=units,
                    counters=self.counters,
                    events=rows,
                    rounds=self.detector.take_rounds(),
                )
            except BaseException:
                self.events_in_commit = 0
                raise
        for e in events:
            log.info(
                "drift_event",
                id=e.id,
                state=e.state,
                scope=e.scope,
                node=e.node,
                signal=e.signal,
                effect=e.effect_size,
                p_value=e.p_value,
            )
        self.publisher.add(rows)
        self.events_in_commit = 0
        if self.snapshots is not None:
            self.snapshots.mark(dirty)
        return applied, rejected

    async def apply_statuses(
        self, statuses: Sequence[NodeStatus], stored: Sequence[datetime] | None = None
    ) -> None:
        """Fold node status reports into the fleet state and commit them. ``stored``: each
        report's server (JetStream) time, which orders them and dates ``last_seen``; the
        node's own ``time`` is only shown, with its difference to the server as the node's
        clock skew (a node whose clock ran hours ahead and was corrected is not ignored)."""
        async with self.lock:
            now = self._clock()
            dirty: set[tuple[str, str]] = set()
            for i, st in enumerate(statuses):
                node = self._node(st.fleet, st.node, now)
                at = stored[i] if stored is not None else now
                if node.status_stored is not None and at < node.status_stored:
                    continue  # an older report arriving late must not overwrite a newer one
                dirty.add((st.fleet, st.node))
                node.status_stored = at
                node.clock_skew_s = round((st.time - at).total_seconds(), 3)
                node.status_time = st.time
                node.status_event = st.event
                node.device = st.device
                if st.model is not None:
                    node.model = st.model
                node.outbox_depth = st.outbox_depth
                node.served = st.served
                node.status_dropped_inferences = st.dropped_inferences
                node.status_dropped_aggregates = st.dropped_aggregates
                node.last_error = st.last_error
                node.key_list_version = st.key_list_version
                node.config_version, node.config_seen = st.config_version, st.config_seen
                node.config_state, node.config_reason = st.config_state, st.config_reason
                r = st.refresh
                if r is not None and not r.ok and r.code == BundleCode.INCOMPATIBLE:
                    node.cannot_run = f"{r.model.name} v{r.model.version} {r.model.variant}: {r.reason}"
                elif r is not None and r.ok:
                    node.cannot_run = None
                if node.last_seen is None or at > node.last_seen:
                    node.last_seen = at
            self._count("statuses", len(statuses))
            self._fence()
            await self.store.commit(nodes=[self.nodes[k] for k in dirty], counters=self.counters)
        if self.snapshots is not None:
            self.snapshots.mark(dirty)

    async def count_deadletters(self, n: int, suppressed: int = 0) -> None:
        """Count dead letters stored, and those terminated without a copy (rate limit)."""
        async with self.lock:
            self._count("deadlettered", n)
            if suppressed:
                self._count("deadletter_suppressed", suppressed)
            await self.store.commit(counters=self.counters)
