"""Prometheus metrics of the cloud (``prometheus_client``), served at ``/metrics`` by the
cloud's HTTP server (``web.py``).

One ``CollectorRegistry`` per service (two services in one process, as in tests, do not
share metrics). ``CloudCollector`` reads the service's in-memory state when scraped — in the
event loop's thread, so nothing is read while it changes — and the figures that need a
round trip (stream lag, rollouts, drift events by signal) from ``MetricsRefresher``, an
active-instance task that refreshes them every ``interval`` seconds.

Names: ``slmops_cloud_*``; counters are totals since this state directory began (the
applier's persisted counters), except ``slmops_cloud_deadletters_total`` (by kind, since this
process started: from the dead-letter subject).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskStatus
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from slmops.cloud.ingest.batches import batch_histogram
from slmops.cloud.ingest.presence import ONLINE_WITHIN_S, Forgotten, forgotten, is_hidden, is_online
from slmops.shared.names import DEADLETTER_SUBJECT, TELEMETRY_STREAM

if TYPE_CHECKING:
    from slmops.cloud.analyst.view import ServiceView
    from slmops.cloud.ingest.state import NodeState

__all__ = ["CONTENT_TYPE", "CloudCollector", "MetricsRefresher", "exposition", "registry_for"]

log = structlog.get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Applier counters exported as ``slmops_cloud_<name>_total``.
_COUNTERS = {
    "aggregates": "aggregates applied (each counted once)",
    "duplicates": "duplicate aggregates dropped",
    "late": "aggregates applied out of order",
    "gaps": "seq gaps opened",
    "statuses": "node status reports applied",
    "deadlettered": "messages dead-lettered",
    "unregistered": "aggregates of models without a manifest (counted, not drift-tested)",
    "quarantines": "drift signals quarantined (state-level poison)",
}


_EMPTY_BATCHES = batch_histogram()


class MetricsRefresher:
    """What a scrape cannot compute in the loop: stream lag, rollouts by state, drift events
    by kind/signal/state, dead letters by kind, forgotten nodes (``slmops fleet forget``,
    seen within one ``interval``). ``run`` in the active instance."""

    def __init__(self, svc: ServiceView, interval: float = 5.0) -> None:
        self.svc = svc
        self.interval = interval
        self.lag_messages: float = 0.0
        self.lag_seconds: float = 0.0
        self.rollouts: dict[str, int] = {}
        self.events: dict[tuple[str, str, str], int] = {}
        #: By kind (``ingest.consumers.failure_reason``); the known kinds start at 0 so the
        #: series exist before the first dead letter (alerts use ``increase``).
        self.deadletters: dict[str, int] = dict.fromkeys(("undecodable", "invalid", "rejected", "failed"), 0)
        self.forgotten: dict[tuple[str, str], Forgotten] = {}
        self.refreshed: float = 0.0

    def shown(self) -> Iterator[tuple[tuple[str, str], NodeState]]:
        """The service's nodes, by (fleet, node), but those hidden by a forget record."""
        for key, n in self.svc.nodes.items():
            if not is_hidden(n.last_seen, self.forgotten.get(key)):
                yield key, n

    async def run(self, nc: NATS, js: JetStreamContext, *, task_status: TaskStatus[None]) -> None:
        async def on_deadletter(msg: Any) -> None:
            kind = (msg.headers or {}).get("Slmops-Kind", "unknown")
            self.deadletters[kind] = self.deadletters.get(kind, 0) + 1

        sub = await nc.subscribe(DEADLETTER_SUBJECT, cb=on_deadletter)
        task_status.started()
        try:
            while True:
                try:
                    await self.refresh(js)
                except Exception as exc:  # a metric is never worth the service
                    log.warning("metrics_refresh_failed", error=repr(exc)[:300])
                await anyio.sleep(self.interval)
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def refresh(self, js: JetStreamContext) -> None:
        svc = self.svc
        loop = svc.ingest_loop
        if loop is not None:
            with anyio.fail_after(5):
                info = await js.consumer_info(TELEMETRY_STREAM, loop.durable)
                stream = await js.stream_info(TELEMETRY_STREAM)
            pending = float(info.num_pending or 0) + float(info.num_ack_pending or 0)
            self.lag_messages = pending
            self.lag_seconds = 0.0
            floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
            if pending and stream.state is not None and floor < stream.state.last_seq:
                # The oldest message not yet acknowledged: how long it has waited.
                oldest = await _message_time(js, max(floor + 1, stream.state.first_seq))
                if oldest is not None:
                    self.lag_seconds = max(0.0, (datetime.now(UTC) - _aware(oldest)).total_seconds())
        with anyio.fail_after(5):
            self.forgotten = await forgotten(js)
        from slmops.cloud.rollout import RolloutStore

        counts: dict[str, int] = {}
        with anyio.fail_after(5):
            for state, _rev in await RolloutStore(js).all(parts=False):  # statuses only
                counts[state.status] = counts.get(state.status, 0) + 1
        self.rollouts = counts
        store = svc.store
        if store is not None:
            rows = await store.query(
                "SELECT json_extract(data, '$.kind'), json_extract(data, '$.signal'), "
                "json_extract(data, '$.state'), count(*) FROM events GROUP BY 1, 2, 3"
            )
            self.events = {(k or "drift", s or "", st or ""): int(n) for k, s, st, n in rows}
        self.refreshed = time.time()


async def _message_time(js: JetStreamContext, seq: int) -> datetime | None:
    try:
        with anyio.fail_after(5):
            msg = await js.get_msg(TELEMETRY_STREAM, seq=seq)
    except Exception:  # deleted meanwhile, or no direct get: no figure this time
        return None
    t = getattr(msg, "time", None)
    return t if isinstance(t, datetime) else None


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


class CloudCollector(Collector):
    """The service's metrics, computed at scrape time (see the module docstring)."""

    def __init__(self, svc: ServiceView, refresher: MetricsRefresher) -> None:
        self.svc = svc
        self.refresher = refresher

    def collect(self) -> Iterator[Any]:
        svc = self.svc
        stats = svc.statistics()
        active = GaugeMetricFamily(
            "slmops_cloud_active",
            "1 when this instance holds the lease (is the active one)",
            labels=["holder"],
        )
        active.add_metric([svc.holder], 1.0 if stats.active else 0.0)
        yield active
        yield CounterMetricFamily(
            "slmops_cloud_takeovers", "times this instance became active", stats.takeovers
        )
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(f"slmops_cloud_{name}", doc, stats.counters.get(name, 0))
        yield CounterMetricFamily(
            "slmops_cloud_ingest_batches", "batches pulled (this process)", stats.batches
        )
        yield CounterMetricFamily(
            "slmops_cloud_ingest_messages", "telemetry messages pulled (this process)", stats.messages
        )
        yield GaugeMetricFamily(
            "slmops_cloud_events_pending", "drift events committed, not yet published", stats.events_pending
        )
        yield CounterMetricFamily(
            "slmops_cloud_events_published", "drift events published (this process)", stats.events_published
        )
        r = self.refresher
        yield GaugeMetricFamily(
            "slmops_cloud_ingest_lag_messages", "telemetry messages behind the stream", r.lag_messages
        )
        yield GaugeMetricFamily(
            "slmops_cloud_ingest_lag_seconds",
            "age of the newest stored telemetry message the consumer has not reached",
            r.lag_seconds,
        )
        dl = CounterMetricFamily(
            "slmops_cloud_deadletters", "messages dead-lettered since start, by kind", labels=["kind"]
        )
        for kind, n in sorted(r.deadletters.items()):
            dl.add_metric([kind], n)
        yield dl
        ro = GaugeMetricFamily("slmops_cloud_rollouts", "rollouts by status", labels=["status"])
        for status in ("running", "paused", "completed", "rolled_back", "aborted"):
            ro.add_metric([status], r.rollouts.get(status, 0))
        yield ro
        ev = CounterMetricFamily(
            "slmops_cloud_drift_events",
            "drift events logged, by kind, signal and state",
            labels=["kind", "signal", "state"],
        )
        for (kind, signal, state), n in sorted(r.events.items()):
            ev.add_metric([kind, signal, state], n)
        yield ev
        loop = svc.ingest_loop
        # A standby (or an instance not yet consuming) exports the same histogram, empty.
        yield from (loop.batch_seconds if loop is not None else _EMPTY_BATCHES).collect()
        yield from self._open_events()
        yield from self._nodes()

    def _open_events(self) -> Iterator[Any]:
        g = GaugeMetricFamily(
            "slmops_cloud_drift_events_open", "drift episodes open now", labels=["fleet", "scope", "signal"]
        )
        det = self.svc.detector
        counts: dict[tuple[str, str, str], int] = {}
        if det is not None:
            for grp in det.groups.values():
                for signal, us in grp.fleet_sig.items():
                    if us.open:
                        key = (grp.fleet, "fleet", signal)
                        counts[key] = counts.get(key, 0) + 1
            for (gk, _node), unit in det.units.items():
                fleet = gk.split("/", 1)[0]
                for signal, us in unit.sig.items():
                    if us.open:
                        key = (fleet, "node", signal)
                        counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            g.add_metric(list(key), n)
        yield g

    def _nodes(self) -> Iterator[Any]:
        online = GaugeMetricFamily(
            "slmops_cloud_nodes_online",
            f"nodes heard from within {ONLINE_WITHIN_S:g} s, per fleet",
            labels=["fleet"],
        )
        known = GaugeMetricFamily(
            "slmops_cloud_nodes", "nodes known (but those forgotten), per fleet", labels=["fleet"]
        )
        receipts = CounterMetricFamily(
            "slmops_cloud_loss_receipts_inferences",
            "inferences nodes reported they could not keep (loss receipts), per fleet",
            labels=["fleet"],
        )
        now = datetime.now(UTC)
        per: dict[str, list[int]] = {}
        for (fleet, _node), n in self.svc.nodes.items():  # a forgotten node's receipts stay: a counter
            per.setdefault(fleet, [0, 0, 0])[2] += n.dropped_inferences
        for (fleet, _node), n in self.refresher.shown():
            row = per[fleet]
            row[0] += 1
            row[1] += is_online(n.last_seen, now)
        for fleet, (k, o, d) in sorted(per.items()):
            known.add_metric([fleet], k)
            online.add_metric([fleet], o)
            receipts.add_metric([fleet], d)
        yield known
        yield online
        yield receipts


def registry_for(svc: ServiceView, refresher: MetricsRefresher) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CloudCollector(svc, refresher))
    return reg


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition format (``prometheus_client.generate_latest``)."""
    return generate_latest(registry)
