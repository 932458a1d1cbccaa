"""The node's Prometheus exposition (``GET /metrics``), by ``prometheus_client`` (correct
text format and label escaping) instead of hand-written lines.

``NodeCollector`` reads the node's health and statistics when scraped (in the event loop, as
the HTTP handler runs); ``predict_seconds`` is a histogram the API observes per request
(end-to-end inference latency as a client sees it). One registry per API app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "NodeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Request latency buckets (seconds): a batch-1 answer takes ~1 ms here, big batches ~100 ms.
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class _Collector(Collector):
    def __init__(self, node: Any, counts: Callable[[], dict[tuple[str, int], int]]) -> None:
        self.node = node
        self.counts = counts

    def collect(self) -> Iterator[Any]:
        h = self.node.health()
        b = self.node.statistics()
        yield CounterMetricFamily("slmops_edge_predictions", "Inferences served.", b.served)
        yield CounterMetricFamily(
            "slmops_edge_inference_errors", "Inferences that failed in the model.", b.failed
        )
        yield CounterMetricFamily("slmops_edge_batches", "Micro-batches run.", b.batches)
        yield CounterMetricFamily(
            "slmops_edge_model_seconds", "Seconds spent in featurize + ONNX Runtime.", b.model_seconds
        )
        yield GaugeMetricFamily("slmops_edge_outbox_depth", "Aggregates waiting for the cloud.", h["outbox"])
        yield GaugeMetricFamily(
            "slmops_edge_buffer_bytes", "Bytes of the SQLite buffer (db + wal + shm).", h["buffer_bytes"]
        )
        yield GaugeMetricFamily(
            "slmops_edge_link_up", "1 while the NATS link is online.", 1 if h["link"] == "online" else 0
        )
        yield CounterMetricFamily(
            "slmops_edge_published", "Aggregates acknowledged by JetStream.", b.published
        )
        yield CounterMetricFamily(
            "slmops_edge_dropped_inferences",
            "Inferences dropped by outbox compaction.",
            h["dropped_inferences"],
        )
        yield CounterMetricFamily(
            "slmops_edge_dropped_aggregates",
            "Aggregates dropped by outbox compaction.",
            h["dropped_aggregates"],
        )
        info = GaugeMetricFamily(
            "slmops_edge_model_info", "The current model (value 1).", labels=["name", "version", "variant"]
        )
        m = h["model"]
        if m is not None:
            info.add_metric([str(m["name"]), str(m["version"]), str(m["variant"])], 1)
        yield info
        refresher = getattr(self.node, "refresher", None)
        stats = getattr(refresher, "stats", None)
        loads = CounterMetricFamily(
            "slmops_edge_model_refreshes",
            "Model refresh outcomes: installed, rejected (bundle refused), download_failed, blocked.",
            labels=["result"],
        )
        if stats is not None:
            for result, n in (
                ("installed", stats.installs),
                ("rejected", stats.rejections),
                ("download_failed", stats.download_failures),
                ("blocked", stats.blocked_skips),
            ):
                loads.add_metric([result], n)
        yield loads
        gens = getattr(self.node, "generations", None)
        if gens is not None:
            g = gens.statistics()
            done = CounterMetricFamily(
                "slmops_edge_generations",
                "Generation requests by outcome: served, cancelled (client gone), failed, refused_busy.",
                labels=["outcome"],
            )
            for outcome in ("served", "cancelled", "failed", "refused_busy"):
                done.add_metric([outcome], getattr(g, outcome))
            yield done
            yield GaugeMetricFamily("slmops_edge_generations_running", "Generations running now.", g.running)
            yield GaugeMetricFamily(
                "slmops_edge_generations_waiting", "Generations queued for a slot.", g.waiting
            )
        req = CounterMetricFamily(
            "slmops_edge_http_requests", "HTTP requests by path and status.", labels=["path", "code"]
        )
        for (path, status), n in sorted(self.counts().items()):
            req.add_metric([path, str(status)], n)
        yield req


class NodeMetrics:
    """A registry with the node's collector and the request-latency histogram."""

    def __init__(self, node: Any, counts: Callable[[], dict[tuple[str, int], int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(node, counts))
        self.predict_seconds = Histogram(
            "slmops_edge_predict_seconds",
            "Seconds from a /v1/predict or /v1/embed request's texts to its answer.",
            buckets=_BUCKETS,
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
