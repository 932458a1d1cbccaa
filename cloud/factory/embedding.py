"""Embedding drift statistics of an embedding model (``EmbeddingStats`` in its manifest) and
its reference histograms, from held-out texts.

A few fixed random unit directions (seeded) are drawn once per model; aggregates carry the
histogram of the served embeddings' projections on each, and of their norms. Bin edges are
held-out quantiles, so each bin holds about the same share of the reference traffic and a
shift of the embedding distribution along any direction moves counts between bins.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from slmops.shared.histogram import Histogram
from slmops.shared.messages import EmbeddingStats

__all__ = ["embedding_histograms", "embedding_stats"]


def _edges(values: npt.NDArray[np.float64], bins: int, low: float, high: float) -> list[float]:
    qs = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]) if len(values) else np.array([])
    inner = sorted({round(float(q), 6) for q in qs if low < q < high})
    return [low, *inner, high]


def embedding_stats(
    vectors: npt.NDArray[np.float32],
    norms: npt.NDArray[np.float32],
    *,
    directions: int = 4,
    bins: int = 10,
    seed: int = 0,
) -> EmbeddingStats:
    """Directions ([``directions``][dim], seeded unit vectors) and quantile edges from the
    held-out embeddings ``vectors`` [n, dim] (L2-normalised) and their ``norms`` [n] before
    normalisation. Projections of unit vectors lie in [-1, 1]; norms in [0, ∞)."""
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"need held-out embeddings [n, dim] with n > 0, got shape {list(vectors.shape)}")
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(directions, vectors.shape[1]))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    dirs = np.round(d, 6)
    proj = np.asarray(vectors, np.float64) @ dirs.T
    top = float(np.max(norms)) if len(norms) else 1.0
    return EmbeddingStats(
        directions=dirs.tolist(),
        projection_edges=_edges(proj.ravel(), bins, -1.0, 1.0),
        norm_edges=_edges(np.asarray(norms, np.float64), bins, 0.0, max(2.0 * top, 1.0) * 1e3),
    )


def embedding_histograms(
    stats: EmbeddingStats, vectors: npt.NDArray[np.float32], norms: npt.NDArray[np.float32]
) -> tuple[list[Histogram], Histogram]:
    """The projection histograms (one per direction) and the norm histogram of ``vectors``,
    binned as the edge bins them (``shared.histogram``)."""
    proj = np.asarray(vectors, np.float32) @ np.asarray(stats.directions, np.float32).T
    return (
        [Histogram.of(stats.projection_edges, proj[:, j].tolist()) for j in range(proj.shape[1])],
        Histogram.of(stats.norm_edges, np.asarray(norms).tolist()),
    )
