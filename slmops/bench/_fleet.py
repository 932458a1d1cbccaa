"""Synthetic fleets for the cloud benches: per-node class mixes and window sizes, aggregates
built with ``shared.messages`` exactly as an edge node sends them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

from slmops.shared.histogram import Histogram
from slmops.shared.messages import (
    HistogramEdges,
    ModelManifest,
    ModelRef,
    Preprocessing,
    Privacy,
    ReferenceProfile,
    TelemetryAggregate,
)

__all__ = ["SyntheticFleet", "manifest_for", "synthetic_aggregate", "synthetic_manifest"]

LABELS = ["greeting", "billing", "support", "sales", "other"]
CONF_EDGES = [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0001]
LEN_EDGES = [0.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 1e9]
LAT_EDGES = [0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 1e9]
PRIOR = np.array([0.30, 0.25, 0.20, 0.15, 0.10])
CONF_P = np.array([0.01, 0.02, 0.04, 0.06, 0.09, 0.13, 0.12, 0.15, 0.18, 0.20])
LEN_P = np.array([0.05, 0.15, 0.30, 0.30, 0.15, 0.04, 0.01])
LAT_P = np.array([0.10, 0.30, 0.35, 0.15, 0.06, 0.03, 0.01])
T0 = datetime(2026, 1, 1, tzinfo=UTC)
MODEL = ModelRef(name="bench", version=1, variant="fp32")
#: Confusion of the reference (true -> predicted), 85-92% right, for BBSE/EM.
_ACC = [0.92, 0.88, 0.86, 0.85, 0.87]


def confusion() -> dict[str, dict[str, int]]:
    k = len(LABELS)
    out: dict[str, dict[str, int]] = {}
    for j, truth in enumerate(LABELS):
        row = {label: round(1000 * (1 - _ACC[j]) / (k - 1)) for label in LABELS}
        row[truth] = round(1000 * _ACC[j])
        out[truth] = row
    return out


def _cond() -> np.ndarray:
    """P(pred = i | true = j)."""
    c = confusion()
    m = np.array([[c[t][p] for t in LABELS] for p in LABELS], dtype=float)
    result: np.ndarray = m / m.sum(axis=0, keepdims=True)
    return result


COND = _cond()


def synthetic_manifest(
    model: ModelRef, labels: list[str], edges: HistogramEdges, reference: ReferenceProfile
) -> ModelManifest:
    """A manifest that carries only what drift detection reads (labels, edges, reference):
    no model file behind it, for benches and tests that publish synthetic aggregates."""
    return ModelManifest(
        name=model.name,
        version=model.version,
        variant=model.variant,
        sha256="0" * 64,
        size_bytes=1,
        inputs=[],
        outputs=[],
        preprocessing=Preprocessing(),
        labels=labels,
        edges=edges,
        reference=reference,
        created=T0,
    )


def synthetic_aggregate(
    fleet: str,
    node: str,
    model: ModelRef,
    seq: int,
    predicted: dict[str, int],
    rng: np.random.Generator,
    *,
    edges: HistogramEdges,
    shares: tuple[np.ndarray | list[float], np.ndarray | list[float], np.ndarray | list[float]],
    error_rate: float,
    epsilon: float | None = None,
) -> TelemetryAggregate:
    """The one-minute window ``seq`` (starting ``seq`` minutes after ``T0``) of ``node`` with
    these predicted-class counts: its errors (rate ``error_rate``) and its confidence, input
    length and latency histograms (cell ``shares``, over ``edges``) drawn from ``rng`` in that
    order. ``epsilon`` only states DP noise (none is added)."""
    n = sum(predicted.values())
    start = T0 + timedelta(minutes=seq)
    conf_p, len_p, lat_p = shares

    def hist(cells: list[float], p: np.ndarray | list[float]) -> Histogram:
        return Histogram(edges=cells, counts=[int(c) for c in rng.multinomial(n, p)])

    return TelemetryAggregate(
        fleet=fleet,
        node=node,
        model=model,
        seq=seq,
        window_start=start,
        window_end=start + timedelta(minutes=1),
        count=n,
        errors=int(rng.binomial(n, error_rate)),
        class_counts=predicted,
        confidence=hist(edges.confidence, conf_p),
        input_length=hist(edges.input_length, len_p),
        latency_ms=hist(edges.latency_ms, lat_p),
        privacy=Privacy(k=5, epsilon=epsilon, mechanism="geometric" if epsilon else "none"),
    )


#: The bench model's histogram edges.
EDGES = HistogramEdges(confidence=CONF_EDGES, input_length=LEN_EDGES, latency_ms=LAT_EDGES)


def manifest_for(model: ModelRef = MODEL, count: int = 50_000) -> ModelManifest:
    pred = COND @ PRIOR
    ref = ReferenceProfile(
        count=count,
        class_counts={label: round(p * count) for label, p in zip(LABELS, pred, strict=True)},
        confidence=Histogram(edges=CONF_EDGES, counts=[round(p * count) for p in CONF_P]),
        input_length=Histogram(edges=LEN_EDGES, counts=[round(p * count) for p in LEN_P]),
        accuracy=float(np.dot(np.diag(COND), PRIOR)),
        confusion=confusion(),
        priors={label: float(p) for label, p in zip(LABELS, PRIOR, strict=True)},
    )
    return synthetic_manifest(
        model,
        LABELS,
        HistogramEdges(confidence=CONF_EDGES, input_length=LEN_EDGES, latency_ms=LAT_EDGES),
        ref,
    )


class SyntheticFleet:
    """``nodes`` nodes, each with its own true class mix (Dirichlet around the fleet's) and
    window size (100..2000 inferences); ``window(w, ...)`` yields one aggregate per node."""

    def __init__(self, fleet: str, nodes: int, seed: int, *, concentration: float = 200.0) -> None:
        self.fleet = fleet
        self.rng = np.random.default_rng(seed)
        self.names = [f"node-{i:03d}" for i in range(nodes)]
        self.mix = self.rng.dirichlet(PRIOR * concentration, size=nodes)
        self.sizes = self.rng.choice([100, 200, 400, 800, 2000], size=nodes, p=[0.2, 0.3, 0.25, 0.15, 0.1])

    def aggregate(
        self,
        i: int,
        seq: int,
        *,
        prior: np.ndarray | None = None,
        conf: np.ndarray = CONF_P,
        length: np.ndarray = LEN_P,
        epsilon: float | None = None,
    ) -> TelemetryAggregate:
        rng = self.rng
        n = int(self.sizes[i])
        true_mix = self.mix[i] if prior is None else prior
        predicted = rng.multinomial(n, COND @ true_mix)
        counts = {label: int(c) for label, c in zip(LABELS, predicted, strict=True)}
        return synthetic_aggregate(
            self.fleet, self.names[i], MODEL, seq, counts, rng,
            edges=EDGES, shares=(conf, length, LAT_P), error_rate=0.005, epsilon=epsilon,
        )  # fmt: skip
