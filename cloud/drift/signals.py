"""The drift signals of an aggregate, as count vectors, and the references they are tested
against (docs/architecture.md §7).

Signals: ``class_prior`` (predicted-class counts), ``confidence``, ``input_length`` and
``latency`` (histograms), ``error_rate`` (errors vs successes, one-sided: only a rise counts),
``accuracy`` (wrong vs right predictions from app feedback, one-sided: only a fall in accuracy
counts), and the out-of-scope shares ``oos_low_confidence`` (top probability below the
manifest's threshold), ``oos_foreign_script`` (a letter outside the training scripts) and, for
tokenizer models whose manifest sets ``unknown_token_share``, ``oos_unknown_token`` (a token
the tokenizer does not know), all one-sided, from ``TelemetryAggregate.out_of_scope``; for embedding models
``embedding_projection`` (the projections' histograms on the manifest's fixed directions, the
directions' bins side by side in one vector) and ``embedding_norm``. The
reference of a signal comes from the model manifest's ``ReferenceProfile`` when it has one;
latency and error rate never come from the manifest (held-out data says nothing about a
device's speed or its apps' failures), so they, and any signal the manifest lacks, are tested
against the production baseline only (``DriftDetector``).
"""

from __future__ import annotations

import itertools
from datetime import datetime

import msgspec

from slmops.cloud.drift.stats import geometric_noise_var, normalise
from slmops.shared.messages import (
    OOS_CELLS,
    OOS_FOREIGN_SCRIPT,
    OOS_LOW_CONFIDENCE,
    OOS_UNKNOWN_TOKEN,
    ModelManifest,
    TelemetryAggregate,
)
from slmops.shared.vocabulary import DP_SENSITIVITY, DriftReference, DriftSignal

__all__ = [
    "INPUT_SIDE",
    "NOISED",
    "ONE_SIDED",
    "OOS_SIGNALS",
    "SIGNALS",
    "UNKNOWN_TOKEN",
    "Acc",
    "SignalRef",
    "extract",
    "manifest_refs",
]

SIGNALS = tuple(DriftSignal)
#: Signals of the inputs alone (not of the model): a new version inherits their baseline.
INPUT_SIDE = (DriftSignal.INPUT_LENGTH, DriftSignal.OOS_FOREIGN_SCRIPT, DriftSignal.OOS_UNKNOWN_TOKEN)
#: Out-of-scope signals: (signal, the ``OOS_*`` bit whose share it is). The unknown-token one
#: is extracted only for groups whose manifest counts it (``extract(unknown_token=True)``).
OOS_SIGNALS = (
    (DriftSignal.OOS_LOW_CONFIDENCE, OOS_LOW_CONFIDENCE),
    (DriftSignal.OOS_FOREIGN_SCRIPT, OOS_FOREIGN_SCRIPT),
)
UNKNOWN_TOKEN = (DriftSignal.OOS_UNKNOWN_TOKEN, OOS_UNKNOWN_TOKEN)
#: Two-cell signals tested one-sided: the cell whose rise is evidence.
ONE_SIDED = {
    "error_rate": 0,
    "accuracy": 0,
    "oos_low_confidence": 0,
    "oos_foreign_script": 0,
    "oos_unknown_token": 0,
    "empty_output": 0,
    "refusal": 0,
}
#: Signals whose counts carry the edge's DP noise ("every histogram and class count").
NOISED = frozenset(set(DriftSignal) - {DriftSignal.ERROR_RATE})


class SignalRef(msgspec.Struct, kw_only=True):
    """A signal's reference distribution (smoothed) and how many counts it was built from."""

    probs: list[float]
    n_ref: float
    #: "manifest", "baseline:<id>", "first_windows" (legacy state) or "node_baseline".
    source: str
    #: The period the reference was pooled from (aggregate window times; None: the manifest).
    start: datetime | None = None
    end: datetime | None = None


class Acc(msgspec.Struct, kw_only=True):
    """Counts of one signal added over one or more aggregates (exact, associative)."""

    counts: list[float]
    #: Sum of ``counts`` (kept, not recomputed: this is on the ingest hot path).
    total: float = 0.0
    noise: float = 0.0  #: summed per-cell DP noise variance
    windows: int = 0
    start: datetime | None = None
    end: datetime | None = None

    @property
    def n(self) -> float:
        """Inferences counted (DP noise can make single cells negative, rarely the sum)."""
        return self.total if self.total > 0 else 0.0

    def add(self, counts: list[float], noise: float, start: datetime, end: datetime) -> None:
        if len(counts) != len(self.counts):
            raise ValueError(f"{len(counts)} cells added to an accumulator of {len(self.counts)}")
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.total += sum(counts)
        self.noise += noise
        self.windows += 1
        if self.start is None or start < self.start:
            self.start = start
        if self.end is None or end > self.end:
            self.end = end

    def merge(self, other: Acc) -> None:
        """Add ``other``'s counts, noise, windows and time range (in place)."""
        if len(other.counts) != len(self.counts):
            raise ValueError(f"{len(other.counts)} cells merged into an accumulator of {len(self.counts)}")
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total
        self.noise += other.noise
        self.windows += other.windows
        for t in (other.start, other.end):
            if t is not None:
                self.start = t if self.start is None or t < self.start else self.start
                self.end = t if self.end is None or t > self.end else self.end

    def copy(self) -> Acc:
        return Acc(
            counts=list(self.counts),
            total=self.total,
            noise=self.noise,
            windows=self.windows,
            start=self.start,
            end=self.end,
        )

    @classmethod
    def empty(cls, cells: int) -> Acc:
        return cls(counts=[0.0] * cells)


def extract(
    agg: TelemetryAggregate, labels: list[str], edges: dict[str, list[float]], unknown_token: bool = False
) -> dict[str, tuple[list[float], float]]:
    """Each signal's ``(counts, noise_var)`` in this aggregate; signals it cannot provide
    (no feedback, histogram with other edges than the model's) are left out, and so is the
    unknown-token share unless ``unknown_token`` (the model's manifest counts it)."""
    noise = (
        geometric_noise_var(agg.privacy.epsilon, agg.privacy.sensitivity or DP_SENSITIVITY)
        if agg.privacy.mechanism != "none"
        else 0.0
    )
    out: dict[str, tuple[list[float], float]] = {}
    # Integer counts are used as they are (int is a float for msgspec and arithmetic): no
    # conversion on the hot path. The lists are never mutated downstream.
    cc = agg.class_counts
    if labels:
        out["class_prior"] = ([cc.get(label, 0) for label in labels], noise)
    for signal, hist in (
        ("confidence", agg.confidence),
        ("input_length", agg.input_length),
        ("latency", agg.latency_ms),
    ):
        want = edges.get(signal)
        if want is None or hist.edges == want:
            out[signal] = (hist.counts, noise)  # type: ignore[assignment]
    if agg.count > 0:
        out["error_rate"] = ([agg.errors, max(agg.count - agg.errors, 0)], 0.0)
    right = wrong = 0
    for truth, predicted in agg.feedback.items():
        for label, c in predicted.items():
            if label == truth:
                right += c
            else:
                wrong += c
    if right + wrong > 0:
        out["accuracy"] = ([float(wrong), float(right)], noise)
    emb = agg.embedding
    if emb is not None and emb.projections:
        for signal, hists in (
            (DriftSignal.EMBEDDING_PROJECTION, emb.projections),
            (DriftSignal.EMBEDDING_NORM, [emb.norm]),
        ):
            want = edges.get(signal)
            if want is None or all(h.edges == want for h in hists):
                # Each direction sees the same embeddings: the directions' bins side by side,
                # each count divided by the directions' number, so the vector counts the
                # window's inferences once (its test is the mean of the per-direction tests,
                # not their sum: conservative, as the directions are not independent).
                k = len(hists)
                out[signal] = ([c / k for h in hists for c in h.counts], noise / (k * k))
    gen = agg.generation
    if gen is not None:
        want = edges.get(DriftSignal.OUTPUT_TOKENS)
        if want is None or gen.output_tokens.edges == want:
            out[DriftSignal.OUTPUT_TOKENS] = (gen.output_tokens.counts, noise)  # type: ignore[assignment]
        answered = agg.count - agg.errors
        if answered > 0:
            out[DriftSignal.EMPTY_OUTPUT] = ([gen.empty, answered - gen.empty], noise)
            if gen.refusals:
                refused = sum(gen.refusals.values())
                # Each category's count is noised on its own: the sum carries their noise.
                out[DriftSignal.REFUSAL] = ([refused, answered - refused], noise * len(gen.refusals))
    oos = agg.out_of_scope
    if len(oos) == OOS_CELLS:
        total = sum(oos)
        for signal, bit in (*OOS_SIGNALS, UNKNOWN_TOKEN) if unknown_token else OOS_SIGNALS:
            hit = sum(c for i, c in enumerate(oos) if i & bit)
            # Each cell is a sum of OOS_CELLS / 2 noised counts.
            out[signal] = ([hit, total - hit], noise * OOS_CELLS / 2)
    return out


def manifest_refs(manifest: ModelManifest) -> dict[str, SignalRef]:
    """References a manifest provides (class prior, confidence, input length, accuracy)."""
    ref = manifest.reference
    if ref is None:
        return {}
    out: dict[str, SignalRef] = {}
    if ref.class_counts and manifest.labels:
        counts = [float(ref.class_counts.get(label, 0)) for label in manifest.labels]
        if sum(counts) > 0:
            out["class_prior"] = SignalRef(
                probs=normalise(counts), n_ref=sum(counts), source=DriftReference.MANIFEST
            )
    for signal, hist, edges in (
        ("confidence", ref.confidence, manifest.edges.confidence),
        ("input_length", ref.input_length, manifest.edges.input_length),
    ):
        if hist.edges == edges and hist.total > 0:
            out[signal] = SignalRef(
                probs=normalise([float(c) for c in hist.counts]),
                n_ref=float(hist.total),
                source=DriftReference.MANIFEST,
            )
    spec = manifest.out_of_scope
    if spec is not None and spec.count > 0:
        shares = [
            ("oos_low_confidence", spec.low_confidence_share),
            ("oos_foreign_script", spec.foreign_script_share),
        ]
        if spec.unknown_token_share is not None:
            shares.append(("oos_unknown_token", spec.unknown_token_share))
        for signal, share in shares:
            out[signal] = SignalRef(
                probs=normalise([share * spec.count, (1 - share) * spec.count]),
                n_ref=float(spec.count),
                source="manifest",
            )
    emb = ref.embedding
    stats = manifest.embedding
    if emb is not None and stats is not None and emb.projections:
        for signal, hists, edges in (
            (DriftSignal.EMBEDDING_PROJECTION, emb.projections, stats.projection_edges),
            (DriftSignal.EMBEDDING_NORM, [emb.norm], stats.norm_edges),
        ):
            counts = [float(c) for h in hists for c in h.counts]
            if all(h.edges == edges for h in hists) and sum(counts) > 0:
                # As ``extract``: all directions' bins in one vector, counting each text once.
                out[signal] = SignalRef(
                    probs=normalise(counts), n_ref=float(hists[0].total), source=DriftReference.MANIFEST
                )
    out.update(_generation_refs(manifest))
    if ref.accuracy is not None and 0 <= ref.accuracy <= 1:
        wrong = 1.0 - ref.accuracy
        # The manifest's accuracy is a point estimate; its count is the held-out size.
        out["accuracy"] = SignalRef(
            probs=normalise([wrong * ref.count, ref.accuracy * ref.count]),
            n_ref=float(ref.count),
            source=DriftReference.MANIFEST,
        )
    return out


def _generation_refs(manifest: ModelManifest) -> dict[str, SignalRef]:
    """A generation model's references from its held-out prompts (``GenerationSpec.reference``)."""
    spec = manifest.generation
    gref = spec.reference if spec is not None else None
    if spec is None or gref is None or spec.reference_prompts <= 0:
        return {}
    n = float(spec.reference_prompts)
    out: dict[str, SignalRef] = {}
    hist = gref.output_tokens
    if hist.edges == spec.edges.output_tokens and hist.total > 0:
        out[DriftSignal.OUTPUT_TOKENS] = SignalRef(
            probs=normalise([float(c) for c in hist.counts]),
            n_ref=float(hist.total),
            source=DriftReference.MANIFEST,
        )
    out[DriftSignal.EMPTY_OUTPUT] = SignalRef(
        probs=normalise([float(gref.empty), n - gref.empty]), n_ref=n, source=DriftReference.MANIFEST
    )
    if gref.refusals:
        refused = float(sum(gref.refusals.values()))
        out[DriftSignal.REFUSAL] = SignalRef(
            probs=normalise([refused, n - refused]), n_ref=n, source=DriftReference.MANIFEST
        )
    return out


def mean_of_histogram(counts: list[float], edges: list[float]) -> float | None:
    """Mean of a histogram by bin midpoints (None when empty)."""
    total = sum(c for c in counts if c > 0)
    if total <= 0:
        return None
    mids = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    return sum(max(c, 0) * m for c, m in zip(counts, mids, strict=True)) / total
