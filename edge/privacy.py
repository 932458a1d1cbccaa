"""The privacy filter: what of an inference may be kept, and the noise added before publishing.

An inference becomes an ``EventRow`` of small integers — predicted class index, confidence bin,
input-length bin (token count, binned), latency bin, error flag — plus its time and model id.
The text, its tokens and its exact length never leave ``derive_rows``: there is no field that
could hold them. Feedback holds only labels that are among the model's own labels.

Optional differential privacy: every published count (class counts, the three histograms,
feedback confusion) gets independent two-sided geometric noise, the discrete Laplace mechanism
(Ghosh, Roughgarden, Sundararajan 2009). One inference changes at most ``SENSITIVITY`` of
those counts by 1 each, so noise with ``alpha = exp(-epsilon / SENSITIVITY)`` makes a window
epsilon-DP per inference. ``count`` and ``errors`` stay exact (the wire contract).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

from slmops.shared.histogram import Histogram, bin_index
from slmops.shared.messages import (
    EmbeddingHistograms,
    EmbeddingStats,
    GenerationHistograms,
    HistogramEdges,
    Privacy,
    TelemetryAggregate,
)
from slmops.shared.vocabulary import DP_SENSITIVITY

__all__ = [
    "SENSITIVITY",
    "SENSITIVITY_OOS",
    "EventRow",
    "add_noise",
    "bins",
    "derive_rows",
    "embedding_bins",
    "embedding_rows",
    "error_rows",
    "generation_row",
    "suppress",
    "two_sided_geometric",
    "unpack_bins",
    "unpack_generation",
]

#: Counts one inference can change: its class, confidence, length and latency bins, and one
#: feedback cell.
SENSITIVITY = DP_SENSITIVITY
#: ... and its out-of-scope cell, for models that count them (``Privacy.sensitivity``).
SENSITIVITY_OOS = DP_SENSITIVITY + 1


class EventRow(NamedTuple):
    """One inference as stored in SQLite: derived numbers only (never text)."""

    t: float
    model_id: int
    label: int  #: class index, -1 for a failed inference (embedding models: packed projection bins)
    conf_bin: int  #: confidence bin (embedding models: norm bin)
    len_bin: int
    lat_bin: int
    error: int
    #: Out-of-scope signs (OR of ``shared.messages.OOS_*``); 0 when the model counts none.
    oos: int = 0


def bins(edges: Sequence[float], values: npt.NDArray[np.floating[Any]] | Sequence[float]) -> list[int]:
    """``shared.histogram.bin_index`` of each value (same clamping); vectorized for long
    inputs — numpy's fixed cost (~25 µs a call) loses to ``bisect`` below ~64 values."""
    if len(values) <= 64:
        return [bin_index(edges, float(v)) for v in values]
    e = np.asarray(edges, dtype=np.float64)
    idx = np.searchsorted(e, np.asarray(values, dtype=np.float64), side="right") - 1
    return [int(i) for i in np.clip(idx, 0, len(e) - 2)]


def derive_rows(
    index: Sequence[int],
    confidence: npt.NDArray[np.floating[Any]] | Sequence[float],
    input_length: Sequence[int],
    *,
    t: float,
    model_id: int,
    edges: HistogramEdges,
    latency_ms: float,
    oos: Sequence[int] | None = None,
) -> list[EventRow]:
    """Event rows for one micro-batch: each inference's class index and bins — the only
    things of it that are kept. ``latency_ms`` is the batch's model time, which every
    inference in it shared."""
    lat_bin = bin_index(edges.latency_ms, latency_ms)
    conf_bins = bins(edges.confidence, confidence)
    len_bins = bins(edges.input_length, input_length)
    if oos is None:
        return [
            EventRow(t, model_id, int(i), c, n, lat_bin, 0)
            for i, c, n in zip(index, conf_bins, len_bins, strict=True)
        ]
    return [
        EventRow(t, model_id, int(i), c, n, lat_bin, 0, f)
        for i, c, n, f in zip(index, conf_bins, len_bins, oos, strict=True)
    ]


def embedding_bins(
    vectors: npt.NDArray[np.float32], norms: npt.NDArray[np.float32], stats: EmbeddingStats
) -> tuple[list[int], list[int]]:
    """Per embedding: its projection bins on ``stats.directions`` packed into one integer
    (mixed radix, base = bins per direction; what the event row's class column holds for an
    embedding model) and its norm bin. Only these bins are kept, never the vector."""
    d = np.asarray(stats.directions, dtype=np.float32)
    proj = vectors @ d.T  # [n, k]
    base = len(stats.projection_edges) - 1
    packed = np.zeros(len(vectors), dtype=np.int64)
    for j in range(d.shape[0] - 1, -1, -1):
        packed = packed * base + np.asarray(bins(stats.projection_edges, proj[:, j]), dtype=np.int64)
    return [int(x) for x in packed], bins(stats.norm_edges, norms)


def embedding_rows(
    packed: Sequence[int],
    norm_bins: Sequence[int],
    input_length: Sequence[int],
    *,
    t: float,
    model_id: int,
    edges: HistogramEdges,
    latency_ms: float,
) -> list[EventRow]:
    """Event rows of an embedding model's micro-batch: packed projection bins and the norm
    bin (from ``embedding_bins``) in place of class and confidence bin."""
    lat_bin = bin_index(edges.latency_ms, latency_ms)
    len_bins = bins(edges.input_length, input_length)
    return [
        EventRow(t, model_id, p, nb, n, lat_bin, 0)
        for p, nb, n in zip(packed, norm_bins, len_bins, strict=True)
    ]


def unpack_bins(packed: int, k: int, base: int) -> list[int]:
    """The ``k`` projection bins ``embedding_bins`` packed into ``packed``."""
    out = []
    for _ in range(k):
        packed, b = divmod(packed, base)
        out.append(b)
    return out


#: Bits of a generation row's ``oos`` column: output-token bin, tokens/s bin (6 bits each),
#: empty answer (1), refusal category index + 1 (0 = none).
_GEN_BITS = 6


def generation_row(
    *,
    t: float,
    model_id: int,
    reason: int,
    loglik_bin: int,
    prompt_bin: int,
    ttft_bin: int,
    output_bin: int,
    tps_bin: int,
    empty: bool,
    refusal: int | None,
) -> EventRow:
    """One generation as an event row of small integers: ``label`` = stop-reason index (into
    the manifest's labels), ``conf`` = prompt-likelihood bin (-1: not sampled), ``len`` =
    prompt-token bin, ``lat`` = time-to-first-token bin, and the output-token and tokens/s bins,
    the empty flag and the refusal category packed into ``oos``. Never the text or its tokens."""
    mask = (1 << _GEN_BITS) - 1
    packed = (
        (min(output_bin, mask))
        | (min(tps_bin, mask) << _GEN_BITS)
        | (int(empty) << (2 * _GEN_BITS))
        | ((0 if refusal is None else min(refusal + 1, mask)) << (2 * _GEN_BITS + 1))
    )
    return EventRow(t, model_id, reason, loglik_bin, prompt_bin, ttft_bin, 0, packed)


def unpack_generation(packed: int) -> tuple[int, int, int, int]:
    """``(output bin, tokens/s bin, empty 0/1, refusal index or -1)`` of ``generation_row``'s ``oos``."""
    mask = (1 << _GEN_BITS) - 1
    return (
        packed & mask,
        (packed >> _GEN_BITS) & mask,
        (packed >> (2 * _GEN_BITS)) & 1,
        ((packed >> (2 * _GEN_BITS + 1)) & mask) - 1,
    )


def error_rows(n: int, *, t: float, model_id: int) -> list[EventRow]:
    """Rows for ``n`` inferences that failed inside the model (counted as errors)."""
    return [EventRow(t, model_id, -1, 0, 0, 0, 1)] * n


def two_sided_geometric(rng: np.random.Generator, alpha: float, size: int) -> list[int]:
    """``size`` draws of the two-sided geometric distribution P(k) ∝ alpha^|k| (integers)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if size == 0:
        return []
    p = 1.0 - alpha
    # The difference of two i.i.d. geometric variables (failures before a success) is
    # two-sided geometric; numpy's geometric counts trials, so subtract the two offsets.
    a = rng.geometric(p, size) - 1
    b = rng.geometric(p, size) - 1
    return [int(x) for x in a - b]


def add_noise(
    agg: TelemetryAggregate, epsilon: float, rng: np.random.Generator, labels: Sequence[str]
) -> TelemetryAggregate:
    """A copy of ``agg`` with geometric noise on every count it could publish — every label's
    class count and every (true, predicted) feedback cell over the model's ``labels``, even
    those that are 0, since leaving zeros out would reveal them — and ``privacy`` stating
    it. Noised counts may be negative: clamping would bias every sum the cloud makes."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    # An embedding inference changes one bin per direction, the norm, length and latency bins.
    emb = agg.embedding
    sensitivity = max(SENSITIVITY, len(emb.projections) + 3) if emb is not None else SENSITIVITY
    if agg.out_of_scope:  # ... and one out-of-scope cell
        sensitivity += SENSITIVITY_OOS - SENSITIVITY
    gen = agg.generation
    if gen is not None:  # ... its output-token and tokens/s bins, stop reason, empty, refusal
        sensitivity += 5
    alpha = math.exp(-epsilon / sensitivity)

    def noisy(h: Histogram) -> Histogram:
        noise = two_sided_geometric(rng, alpha, len(h.counts))
        return Histogram(edges=list(h.edges), counts=[c + n for c, n in zip(h.counts, noise, strict=True)])

    names = sorted(set(labels) | set(agg.class_counts))
    class_noise = two_sided_geometric(rng, alpha, len(names))
    feedback: dict[str, dict[str, int]] = {}
    for true in sorted(set(names) | set(agg.feedback)):
        row = agg.feedback.get(true, {})
        cells = sorted(set(names) | set(row))
        noise = two_sided_geometric(rng, alpha, len(cells))
        feedback[true] = {c: row.get(c, 0) + n for c, n in zip(cells, noise, strict=True)}
    return msgspec.structs.replace(
        agg,
        class_counts={lb: agg.class_counts.get(lb, 0) + n for lb, n in zip(names, class_noise, strict=True)},
        confidence=noisy(agg.confidence),
        input_length=noisy(agg.input_length),
        latency_ms=noisy(agg.latency_ms),
        feedback=feedback,
        out_of_scope=[
            c + n
            for c, n in zip(
                agg.out_of_scope, two_sided_geometric(rng, alpha, len(agg.out_of_scope)), strict=True
            )
        ],
        privacy=Privacy(k=agg.privacy.k, epsilon=epsilon, mechanism="geometric", sensitivity=sensitivity),
        embedding=(
            EmbeddingHistograms(projections=[noisy(h) for h in emb.projections], norm=noisy(emb.norm))
            if emb is not None
            else None
        ),
        generation=_noisy_generation(gen, rng, alpha, noisy) if gen is not None else None,
    )


def _noisy_generation(
    gen: GenerationHistograms,
    rng: np.random.Generator,
    alpha: float,
    noisy: Callable[[Histogram], Histogram],
) -> GenerationHistograms:
    def counts(d: dict[str, int]) -> dict[str, int]:
        keys = sorted(d)
        return {k: d[k] + n for k, n in zip(keys, two_sided_geometric(rng, alpha, len(keys)), strict=True)}

    return GenerationHistograms(
        output_tokens=noisy(gen.output_tokens),
        tokens_per_s=noisy(gen.tokens_per_s),
        stop_reasons=counts(gen.stop_reasons),
        empty=gen.empty + two_sided_geometric(rng, alpha, 1)[0],
        refusals=counts(gen.refusals),
        loglik_sampled=gen.loglik_sampled,
    )


def suppress(agg: TelemetryAggregate) -> TelemetryAggregate:
    """A copy without anything beyond the exact counts: what goes out once the DP budget is
    spent (``privacy.mechanism = "suppressed"``)."""

    def empty(h: Histogram) -> Histogram:
        return Histogram.empty(h.edges)

    return msgspec.structs.replace(
        agg,
        class_counts={},
        confidence=empty(agg.confidence),
        input_length=empty(agg.input_length),
        latency_ms=empty(agg.latency_ms),
        feedback={},
        out_of_scope=[],
        privacy=Privacy(k=agg.privacy.k, epsilon=None, mechanism="suppressed"),
        embedding=(
            EmbeddingHistograms(
                projections=[empty(h) for h in agg.embedding.projections], norm=empty(agg.embedding.norm)
            )
            if agg.embedding is not None
            else None
        ),
        generation=(
            GenerationHistograms(
                output_tokens=empty(agg.generation.output_tokens),
                tokens_per_s=empty(agg.generation.tokens_per_s),
            )
            if agg.generation is not None
            else None
        ),
    )
