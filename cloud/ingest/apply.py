"""Applying decoded messages to the fleet state and the detectors, one transaction per batch.

``Applier`` owns the in-memory state of the active instance (loaded from SQLite when it takes
over) and is the only writer of it; a lock serialises the telemetry and status consumers. A
batch is applied in memory, committed in one SQLite transaction, and only then may the caller
ack its messages. If the commit fails the in-memory state is ahead of the disk, so the error
propagates and the service restarts from the stored state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

import anyio
import msgspec
import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js import errors as js_errors

from slmops.cloud.drift.detector import DriftDetector
from slmops.cloud.ingest.dedupe import Admit
from slmops.cloud.ingest.events import EventPublisher, encode_event
from slmops.cloud.ingest.snapshot import SnapshotWriter
from slmops.cloud.ingest.state import NodeState, StateStore
from slmops.shared.messages import ModelManifest, ModelRef, NodeStatus, TelemetryAggregate, decode_json
from slmops.shared.names import MODELS_MANIFEST_BUCKET, manifest_key

__all__ = ["Applier", "fetch_manifest"]

log = structlog.get_logger(__name__)


async def fetch_manifest(js: JetStreamContext, model: ModelRef) -> ModelManifest | None:
    """The model's manifest from KV ``slmops_manifests``, or None when absent or unreadable."""
    try:
        kv = await js.key_value(MODELS_MANIFEST_BUCKET)
        entry = await kv.get(manifest_key(model.name, model.version, model.variant))
    except (js_errors.BucketNotFoundError, js_errors.KeyNotFoundError):
        return None
    except (nats.errors.Error, OSError, ValueError) as exc:
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
        fence: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.detector = detector
        self.nodes = nodes
        self.counters = counters
        self.publisher = publisher
        self.snapshots = snapshots
        self._clock = clock
        self._max_pending = max_pending_seqs
        self._fence = fence
        self.lock = anyio.Lock()

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _node(self, fleet: str, node: str, now: datetime) -> NodeState:
        key = (fleet, node)
        state = self.nodes.get(key)
        if state is None:
            state = self.nodes[key] = NodeState(fleet=fleet, node=node, first_seen=now)
        return state

    async def apply_aggregates(self, js: JetStreamContext, aggs: Sequence[TelemetryAggregate]) -> int:
        """Apply a batch (duplicates are dropped) and commit it; returns how many were new."""
        for agg in aggs:
            if not self.detector.has_group(agg.fleet, agg.model):
                manifest = await fetch_manifest(js, agg.model)
                self.detector.add_group(agg.fleet, agg.model, manifest)
        async with self.lock:
            now = self._clock()
            dirty: set[tuple[str, str]] = set()
            events = []
            applied = 0
            for agg in aggs:
                node = self._node(agg.fleet, agg.node, now)
                dirty.add((agg.fleet, agg.node))
                before_gaps = node.seqs.gaps_opened
                kind = node.seqs.admit(agg.seq, self._max_pending)
                if kind is Admit.DUPLICATE:
                    node.duplicates += 1
                    self._count("duplicates")
                    continue
                if kind is Admit.LATE:
                    node.late += 1
                    self._count("late")
                if node.seqs.gaps_opened != before_gaps:
                    self._count("gaps")
                    log.warning(
                        "seq_gap",
                        fleet=agg.fleet,
                        node=agg.node,
                        seq=agg.seq,
                        missing=node.seqs.missing,
                        ranges=node.seqs.missing_ranges(5),
                    )
                applied += 1
                node.inferences += agg.count
                node.errors += agg.errors
                node.windows += agg.windows
                node.aggregates += 1
                node.dropped_inferences += agg.dropped_inferences
                node.dropped_aggregates += agg.dropped_aggregates
                node.model = agg.model
                node.last_seen = now
                if node.last_window_end is None or agg.window_end > node.last_window_end:
                    node.last_window_end = agg.window_end
                events += self.detector.observe(agg)
            self._count("aggregates", applied)
            groups, units = self.detector.take_dirty()
            rows = [encode_event(e) for e in events]
            self._fence()
            await self.store.commit(
                nodes=[self.nodes[k] for k in dirty],
                groups=groups,
                units=units,
                counters=self.counters,
                events=rows,
            )
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
        if self.snapshots is not None:
            self.snapshots.mark(dirty)
        return applied

    async def apply_statuses(self, statuses: Sequence[NodeStatus]) -> None:
        """Fold node status reports into the fleet state and commit them."""
        async with self.lock:
            now = self._clock()
            dirty: set[tuple[str, str]] = set()
            for st in statuses:
                node = self._node(st.fleet, st.node, now)
                if node.status_time is not None and st.time < node.status_time:
                    continue  # an older report arriving late must not overwrite a newer one
                dirty.add((st.fleet, st.node))
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
                r = st.refresh
                if r is not None and not r.ok and r.code == "incompatible":
                    node.cannot_run = f"{r.model.name} v{r.model.version} {r.model.variant}: {r.reason}"
                elif r is not None and r.ok:
                    node.cannot_run = None
                node.last_seen = now
            self._count("statuses", len(statuses))
            self._fence()
            await self.store.commit(nodes=[self.nodes[k] for k in dirty], counters=self.counters)
        if self.snapshots is not None:
            self.snapshots.mark(dirty)

    async def count_deadletters(self, n: int) -> None:
        async with self.lock:
            self._count("deadlettered", n)
            await self.store.commit(counters=self.counters)
