"""What the factory measures of a model on held-out data and writes into its manifest: the
reference profile (drift reference, docs/architecture.md §7) and the smoke tests a node runs before a swap.

Everything is measured through ``shared.runtime.Session`` on the exported ONNX model, i.e.
exactly the path a node serves with, not the training code's arithmetic.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from slmops.shared.histogram import Histogram
from slmops.shared.messages import HeldOutScores, HistogramEdges, OutOfScopeSpec, ReferenceProfile, SmokeTest
from slmops.shared.runtime import Session
from slmops.shared.scope import foreign, scripts_of

__all__ = ["DEFAULT_EDGES", "OOS_RATE", "out_of_scope_spec", "reference_profile", "smoke_tests"]

#: Share of held-out inputs the low-confidence threshold is calibrated to flag.
OOS_RATE = 0.05

#: Bin edges of the default classifier's aggregates. Confidence starts at 1/12 for 12 classes;
#: input lengths are word counts (chat utterances: median ~6); latency in ms, where one ORT call
#: on this model takes ~0.1 ms and a loaded edge device tens of ms.
DEFAULT_EDGES = HistogramEdges(
    confidence=[0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0],
    input_length=[0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 64, 1_000_000],
    # Up to 10 s: a transformer on a busy 2-core device answers in hundreds of ms, and a p95
    # gate needs bins there (the old top edge, 100 ms, left everything slower in a catch-all).
    latency_ms=[0, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 1e6],
)


def reference_profile(
    session: Session,
    texts: Sequence[str],
    true_labels: Sequence[int],
    edges: HistogramEdges,
    *,
    latency_samples: int = 200,
) -> ReferenceProfile:
    """Predicted-class counts, confidence/input-length histograms, accuracy, confusion
    (true -> predicted), true-label priors and per-example scores (no text) of ``texts``;
    latency measured one text per call (as a node serves) on the first ``latency_samples``."""
    if len(texts) != len(true_labels) or not texts:
        raise ValueError(f"need as many labels as texts (>0), got {len(texts)} and {len(true_labels)}")
    labels = session.manifest.labels
    preds = session.predict(list(texts))
    confusion: dict[str, dict[str, int]] = {}
    class_counts: dict[str, int] = {}
    correct = 0
    for truth, pred in zip(true_labels, preds, strict=True):
        true_name = labels[truth]
        row = confusion.setdefault(true_name, {})
        row[pred.label] = row.get(pred.label, 0) + 1
        class_counts[pred.label] = class_counts.get(pred.label, 0) + 1
        correct += int(pred.index == truth)
    latency = Histogram.empty(edges.latency_ms)
    session.predict([texts[0]])  # the first call allocates; it is not what a node sees later
    for text in texts[:latency_samples]:
        t0 = time.perf_counter()
        session.predict([text])
        latency.add((time.perf_counter() - t0) * 1000.0)
    counts = np.bincount(np.asarray(true_labels), minlength=len(labels))
    return ReferenceProfile(
        count=len(texts),
        class_counts=dict(sorted(class_counts.items())),
        confidence=Histogram.of(edges.confidence, (p.confidence for p in preds)),
        input_length=Histogram.of(edges.input_length, (p.input_length for p in preds)),
        latency_ms=latency,
        accuracy=correct / len(texts),
        confusion={k: dict(sorted(v.items())) for k, v in sorted(confusion.items())},
        priors={labels[i]: float(c / counts.sum()) for i, c in enumerate(counts)},
        held_out=HeldOutScores(
            true=[int(t) for t in true_labels],
            probs=[[round(x, 6) for x in p.probs] for p in preds],
            lengths=[p.input_length for p in preds],
        ),
    )


def out_of_scope_spec(
    profile: ReferenceProfile,
    train_texts: Sequence[str],
    held_out_texts: Sequence[str],
    rate: float = OOS_RATE,
    unknown: Sequence[int] | None = None,
) -> OutOfScopeSpec:
    """How nodes count out-of-scope inputs of this model: the low-confidence threshold is the
    ``rate`` quantile of the held-out top probabilities (``profile.held_out``), so about
    ``rate`` of held-out inputs fall below it; the scripts are the training text's; the
    shares are what the held-out texts show. ``unknown`` (tokenizer models): the unknown
    tokens of each held-out text; the share of texts with one becomes
    ``unknown_token_share``, and nodes then count that sign. ``ValueError`` without
    held-out scores."""
    if profile.held_out is None or not profile.held_out.probs:
        raise ValueError("the reference profile has no held-out scores to calibrate a threshold on")
    top = np.sort(np.asarray([max(p) for p in profile.held_out.probs], dtype=np.float64))
    threshold = float(np.quantile(top, rate))
    below = float(np.mean(top < threshold))
    scripts = scripts_of(train_texts)
    frozen = frozenset(scripts)
    foreign_share = sum(foreign(t, frozen) for t in held_out_texts) / max(1, len(held_out_texts))
    return OutOfScopeSpec(
        threshold=round(threshold, 6),
        rate=rate,
        scripts=scripts,
        low_confidence_share=below,
        foreign_script_share=foreign_share,
        unknown_token_share=(
            sum(1 for u in unknown if u > 0) / max(1, len(unknown)) if unknown is not None else None
        ),
        count=len(top),
    )


def smoke_tests(session: Session, texts: Sequence[str], *, tolerance: float) -> list[SmokeTest]:
    """One smoke test per label where possible: for each label, the text among ``texts`` it is
    predicted for with the highest confidence; expected label and probabilities are the
    model's own answers, so a node checks it runs *this* model the same way."""
    preds = session.predict(list(texts))
    best: dict[str, int] = {}
    for i, p in enumerate(preds):
        j = best.get(p.label)
        if j is None or p.confidence > preds[j].confidence:
            best[p.label] = i
    chosen = sorted(best.values(), key=lambda i: session.manifest.labels.index(preds[i].label))
    return [
        SmokeTest(
            text=texts[i],
            label=preds[i].label,
            probs=[round(x, 6) for x in preds[i].probs],
            tolerance=tolerance,
        )
        for i in chosen
    ]
