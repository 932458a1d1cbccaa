"""Quality gates of a rollout stage: canary against control on merged telemetry aggregates.

Each gate needs ``min_samples`` inferences of the canary before it judges (until then it says
"waiting: 37/200 predictions"). The control is the previous version measured IN THE SAME
PERIOD as the canary (``cloud.rollout.tracker``: both under the same load); while the fleet
has a control group (nodes outside the rollout that sent telemetry since it started) and it
has too few samples in that period, the gates wait too. A fleet with no control group (one
node, every node in the rollout from its first stage, or the others offline) is judged
against the version's own reference, and each verdict says so. Every verdict names
both figures. Gates:

* ``install``: nodes that rejected the bundle or rolled back on their own, as a fraction of the
  stage's nodes, at most ``max_failures``.
* ``error_rate``: fails when canary rate − control rate exceeds ``max_error_rate_increase``
  and the increase is significant (one-sided two-proportion z-test at 1%): at the minimum
  sample count a good version with a 1% base rate would otherwise fail by chance ~5% of the
  time.
* ``latency_p95``: canary p95 / control p95 ≤ ``max_latency_ratio`` (histogram quantiles),
  or the canary's p95 below ``latency_floor_ms``. A failure must show in the median too (a
  slower version moves the whole distribution; on a busy CPU the tail alone is mostly time
  slices given to other processes) and hold against the canary's own nodes (their previous
  version in the minutes before the switch: one node slow whatever it runs is not the
  version's fault). A latency failure is final only at the end of the stage's soak
  (the controller judges it on the whole soak; the other gates roll back at once). Without
  a control group those same nodes before the switch are the comparison; else the version's
  reference latency, and then a failure is only reported, not acted on (``advisory``): the
  factory measured that figure on another machine, one text at a time, under another load,
  so a one-node fleet (the README tour's) on a busy machine would otherwise be rolled back
  for the load alone (seen: median 94.7 ms against the reference's 37.1 ms at load 11).
* ``tokens_per_s`` (generation models only): the canary's median decode rate may be at most
  ``max_latency_ratio`` times lower than the control's. For a generation model
  ``latency_p95`` is the time to first token, ``confidence`` the prompt likelihood and
  ``drift`` the stop-reason mix (``shared.messages.GenerationHistograms``).
* ``quality`` (generation models, only with ``min_quality``): the version's quality set
  (``GenerationSpec.quality``, exact match / containment) as run by each canary node after it
  installed the version (``NodeStatus.quality``): the cases passed over all reporting canary
  nodes, as a share of those run, must be at least ``min_quality``. It waits until every
  canary node that runs the version has reported; a version without a quality set fails it.
* ``confidence``: control mean confidence − canary's ≤ ``max_confidence_drop``; the difference
  of mean confidences is the label-free expected-accuracy change (Guillory et al. 2021).
* ``accuracy``: accuracy from app feedback (``TelemetryAggregate.feedback``: true label ->
  predicted label -> count); control's (else the canary's reference accuracy, measured on
  held-out data) − canary's may be at most ``max_accuracy_drop``, and the drop must be
  significant (one-sided two-proportion z-test at 1%). Each side needs ``min_feedback``
  labelled answers; with fewer the gate passes saying so, since apps need not send feedback.
* ``drift``: each side's class mix against its own version's reference (total variation);
  canary's may exceed control's by at most ``max_drift_increase``. A version answering one
  class whatever the input fails here; a recalibrated one, whose reference holds its new
  priors, does not. Each distance has the one expected from sampling alone subtracted (a
  sample of 200 over 12 classes is ~0.09 from its own source by chance, close to the limit).
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec

from slmops.cloud.config import RolloutConfig
from slmops.shared.histogram import Histogram, HistogramMismatch
from slmops.shared.messages import QualityScore, ReferenceProfile, TelemetryAggregate

__all__ = [
    "GateResult",
    "Metrics",
    "describe",
    "evaluate",
    "install_gate",
    "quality_gate",
    "total_variation",
    "verdict",
]

Outcome = Literal["pass", "fail", "waiting"]


class Metrics:
    """Aggregates merged by adding counts, each ``(node, install, seq)`` counted once (a
    reinstalled node starts again at seq 1 under a new install id)."""

    __slots__ = (
        "class_counts",
        "confidence",
        "count",
        "errors",
        "latency",
        "nodes",
        "right",
        "seen",
        "tokens_per_s",
        "wrong",
    )

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.class_counts: dict[str, int] = {}
        self.confidence: Histogram | None = None
        self.latency: Histogram | None = None
        self.nodes: set[str] = set()
        self.seen: set[tuple[str, str, int]] = set()
        #: Generation models: the tokens/s histogram (None: no generation telemetry).
        self.tokens_per_s: Histogram | None = None
        #: Labelled answers from app feedback: predicted label equal to / other than the truth.
        self.right = 0
        self.wrong = 0

    def add(self, agg: TelemetryAggregate, *, latency: bool = True) -> bool:
        """Merge ``agg``; False (nothing changed) if it was already counted. ``latency=False``
        leaves its latency out (a node's first window on a new version: warm-up)."""
        key = (agg.node, agg.install, agg.seq)
        if key in self.seen:
            return False
        try:
            confidence = agg.confidence if self.confidence is None else self.confidence.merge(agg.confidence)
            if not latency:
                latency_h = self.latency
            elif self.latency is None:
                latency_h = agg.latency_ms
            else:
                latency_h = self.latency.merge(agg.latency_ms)
            tps = self.tokens_per_s
            if agg.generation is not None and latency:
                gen = agg.generation.tokens_per_s
                tps = gen if tps is None else tps.merge(gen)
        except HistogramMismatch:
            return False  # another build of the model with other edges: not comparable
        self.seen.add(key)
        self.confidence, self.latency, self.tokens_per_s = confidence, latency_h, tps
        self.count += agg.count
        self.errors += agg.errors
        for label, n in agg.class_counts.items():
            self.class_counts[label] = self.class_counts.get(label, 0) + n
        for truth, predicted in agg.feedback.items():
            for label, n in predicted.items():
                if n > 0:  # DP noise can make a cell negative
                    if label == truth:
                        self.right += n
                    else:
                        self.wrong += n
        self.nodes.add(agg.node)
        return True

    @property
    def labelled(self) -> int:
        return self.right + self.wrong

    @property
    def accuracy(self) -> float:
        return self.right / self.labelled if self.labelled else math.nan

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    @property
    def latency_p95(self) -> float:
        return self.latency.quantile(0.95) if self.latency is not None else math.nan

    @property
    def mean_confidence(self) -> float:
        return _hist_mean(self.confidence) if self.confidence is not None else math.nan


def _hist_mean(h: Histogram) -> float:
    counts = [max(c, 0) for c in h.counts]  # DP noise can make a count negative
    total = sum(counts)
    if total == 0:
        return math.nan
    mids = [(a + b) / 2 for a, b in zip(h.edges, h.edges[1:], strict=False)]
    return sum(m * c for m, c in zip(mids, counts, strict=True)) / total


def total_variation(counts: dict[str, int], reference: dict[str, int] | dict[str, float]) -> float:
    """Total variation distance between two class mixes (counts or probabilities)."""
    a = {k: max(v, 0) for k, v in counts.items()}
    b = {k: max(float(v), 0.0) for k, v in reference.items()}
    sa, sb = sum(a.values()), sum(b.values())
    if sa <= 0 or sb <= 0:
        return 0.0
    labels = set(a) | set(b)
    return 0.5 * sum(abs(a.get(k, 0) / sa - b.get(k, 0.0) / sb) for k in labels)


class GateResult(msgspec.Struct, kw_only=True):
    name: str
    outcome: Outcome
    canary: float | None = None
    control: float | None = None
    limit: float | None = None
    samples: int = 0
    detail: str = ""


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


def install_gate(config: RolloutConfig, stage_nodes: int, failures: int) -> GateResult:
    rate = failures / stage_nodes if stage_nodes else 0.0
    return GateResult(
        name="install",
        outcome="fail" if rate > config.max_failures else "pass",
        canary=round(rate, 6),
        limit=config.max_failures,
        samples=stage_nodes,
        detail=f"{failures} of {stage_nodes} nodes rejected the version or rolled back",
    )


#: One-sided 1% quantile of the standard normal.
_Z_ONE_SIDED_1PCT = 2.326


def _excess_tv(m: Metrics, source: dict[str, int] | dict[str, float]) -> float:
    """Total variation of ``m``'s class mix from ``source`` minus what a sample of its size
    drawn from ``source`` shows on average (normal approximation: E|X| = σ·√(2/π) per
    class), floored at 0."""
    tv = total_variation(m.class_counts, source)
    total = sum(max(float(v), 0.0) for v in source.values())
    n = sum(max(v, 0) for v in m.class_counts.values())
    if total <= 0 or n <= 0:
        return tv
    probs = [max(float(v), 0.0) / total for v in source.values()]
    noise = 0.5 * sum(math.sqrt(2 * p * (1 - p) / (math.pi * n)) for p in probs)
    return max(0.0, tv - noise)


def _ref_mix(ref: ReferenceProfile | None) -> dict[str, int] | dict[str, float] | None:
    if ref is None:
        return None
    return ref.class_counts or ref.priors or None


def evaluate(
    config: RolloutConfig,
    canary: Metrics,
    controls: list[Metrics],
    *,
    canary_ref: ReferenceProfile | None,
    control_ref: ReferenceProfile | None,
    expect_control: bool = False,
    before: Metrics | None = None,
    source: str = "control",
) -> list[GateResult]:
    """The metric gates (not ``install``). ``controls`` in order of preference; the first
    with ``min_samples`` is the control. ``expect_control``: the fleet has a control group,
    so without enough control samples the gates wait (rather than fall back on the
    reference). ``before``: the previous version on the canary's own nodes just before they
    switched, which confirms a latency failure (see the module docstring). ``source`` names
    the control in each verdict (e.g. "control, same period 12:00:01-12:00:40 UTC")."""
    n = config.min_samples
    names = ("error_rate", "latency_p95", "confidence", "accuracy", "drift")
    control = next((c for c in controls if c.count >= n), None)
    if canary.count < n:
        return _waiting(names, canary.count, f"waiting: {canary.count}/{n} predictions")
    if control is None and expect_control:
        have = max((c.count for c in controls), default=0)
        return _waiting(names, canary.count, f"waiting: control {have}/{n} predictions in the same period")
    against = source if control is not None else "no control group: the version's own reference"
    results: list[GateResult] = []
    # Error rate: without a control the canary is held to the increase over zero.
    err_base = "no control group: zero"
    c_err = control.error_rate if control is not None else 0.0
    increase = canary.error_rate - c_err
    se = math.sqrt(
        canary.error_rate * (1 - canary.error_rate) / canary.count
        + (c_err * (1 - c_err) / control.count if control is not None else 0.0)
    )
    significant = increase > _Z_ONE_SIDED_1PCT * se
    results.append(
        GateResult(
            name="error_rate",
            outcome="fail" if increase > config.max_error_rate_increase and significant else "pass",
            canary=_num(canary.error_rate),
            control=_num(c_err),
            limit=config.max_error_rate_increase,
            samples=canary.count,
            detail=f"canary {canary.error_rate:.2%} vs {c_err:.2%} ({against if control else err_base})",
        )
    )
    results.append(_latency_gate(config, canary, control, canary_ref, before, against))
    if canary.tokens_per_s is not None:
        results.append(_tokens_per_s_gate(config, canary, control, before, against))
    # Confidence: control's mean, else the canary's reference.
    c_conf = control.mean_confidence if control is not None else math.nan
    if math.isnan(c_conf) and canary_ref is not None:
        c_conf = _hist_mean(canary_ref.confidence)
    conf = canary.mean_confidence
    if math.isnan(c_conf) or math.isnan(conf):
        results.append(
            GateResult(
                name="confidence",
                outcome="pass",
                canary=_num(conf),
                detail="no control group and no reference",
            )
        )
    else:
        results.append(
            _worse_by_gate(
                "confidence",
                conf,
                c_conf,
                c_conf - conf,
                config.max_confidence_drop,
                canary.count,
                f"mean confidence {conf:.3f} vs {c_conf:.3f} ({against})",
            )
        )
    results.append(_accuracy_gate(config, canary, controls, canary_ref))
    # Drift: each side against its own version's reference; without references, canary
    # against control directly.
    can_mix, ctl_mix = _ref_mix(canary_ref), _ref_mix(control_ref)
    if can_mix is not None:
        d_can = _excess_tv(canary, can_mix)
        d_ctl = _excess_tv(control, ctl_mix or can_mix) if control is not None else 0.0
        detail = "class mix vs own reference (total variation beyond sampling noise)"
        if control is None:
            detail += "; no control group: canary alone"
    elif control is not None:
        d_can, d_ctl = _excess_tv(canary, control.class_counts), 0.0
        detail = "class mix vs control (total variation beyond sampling noise)"
    else:
        d_can, d_ctl, detail = math.nan, math.nan, "no reference and no control group"
    if math.isnan(d_can):
        results.append(GateResult(name="drift", outcome="pass", detail=detail))
    else:
        results.append(
            _worse_by_gate(
                "drift", d_can, d_ctl, d_can - d_ctl, config.max_drift_increase, canary.count, detail
            )
        )
    return results


def _waiting(names: tuple[str, ...], samples: int, detail: str) -> list[GateResult]:
    return [GateResult(name=g, outcome="waiting", samples=samples, detail=detail) for g in names]


def _worse_by_gate(
    name: str, canary: float, control: float, worse: float, limit: float, samples: int, detail: str
) -> GateResult:
    """A gate that fails when the canary is ``worse`` than control by more than ``limit``
    (``worse`` is the difference in the direction that hurts, in the units of ``limit``)."""
    return GateResult(
        name=name,
        outcome="fail" if worse > limit else "pass",
        canary=_num(canary),
        control=_num(control),
        limit=limit,
        samples=samples,
        detail=detail,
    )


def _latency_gate(
    config: RolloutConfig,
    canary: Metrics,
    control: Metrics | None,
    canary_ref: ReferenceProfile | None,
    before: Metrics | None,
    against: str,
) -> GateResult:
    """See the module docstring (``latency_p95``)."""
    n = config.min_samples
    limit = config.max_latency_ratio
    own = before.latency if before is not None and before.count >= n else None
    advisory = False
    if control is not None:
        base, what = control.latency, against
    elif own is not None:
        # No control group: the canary's own nodes just before the switch are the fairest
        # comparison (same devices); the factory's figure was measured on another machine.
        base, what, own = (
            own,
            "no control group: the canary's nodes on the previous version just before",
            None,
        )
    elif canary_ref is not None and canary_ref.latency_ms is not None:
        base, what = canary_ref.latency_ms, "no control group: the version's own reference"
        advisory = True
    else:
        base, what = None, ""
    lat = canary.latency_p95
    c_lat = base.quantile(0.95) if base is not None else math.nan
    if math.isnan(c_lat) or c_lat <= 0 or math.isnan(lat) or canary.latency is None or base is None:
        return GateResult(
            name="latency_p95", outcome="pass", canary=_num(lat), detail="no control group and no reference"
        )
    ratio = lat / c_lat
    med, c_med = canary.latency.quantile(0.5), base.quantile(0.5)
    med_ratio = med / c_med if c_med > 0 else math.inf
    over = ratio > limit and lat > config.latency_floor_ms
    detail = (
        f"p95 {lat:.3g} ms vs {c_lat:.3g} ms, ratio {ratio:.2f} (limit {limit:g}; {what}); "
        f"median {med:.3g} vs {c_med:.3g} ms"
    )
    if over and med_ratio <= limit:
        # Only the tail moved: on a shared CPU the tail is mostly time slices given to other
        # processes (two versions of one speed showed 20 ms against 10.8 ms in the same 6 s
        # on 2 cores at load 9), while a slower version moves the whole distribution.
        over = False
        detail += f": the median is within the limit ({med_ratio:.2f}), only the tail moved"
    if over and own is not None and own.quantile(0.95) > 0 and lat / own.quantile(0.95) <= limit:
        # Slower than the control but not than the same nodes were just before: the nodes
        # (their device, their load), not the version.
        over = False
        detail += (
            f"; the canary's nodes ran {own.quantile(0.95):.3g} ms on the previous version just before: "
            "not the version"
        )
    if over and advisory:
        over = False
        detail += (
            ": over the limit, advisory only (the factory's figure, not measured in this period on "
            "these nodes)"
        )
    return GateResult(
        name="latency_p95",
        outcome="fail" if over else "pass",
        canary=_num(lat),
        control=_num(c_lat),
        limit=limit,
        samples=canary.count,
        detail=detail,
    )


def _tokens_per_s_gate(
    config: RolloutConfig, canary: Metrics, control: Metrics | None, before: Metrics | None, against: str
) -> GateResult:
    """Generation models: the canary's median tokens/s may be at most ``max_latency_ratio``
    times lower than the control's (else its own nodes' on the previous version just before
    the switch). Medians: a decode rate's tail on a shared CPU is other processes' time slices."""
    base: Histogram | None = None
    what = against
    if control is not None and control.tokens_per_s is not None:
        base = control.tokens_per_s
    elif before is not None and before.tokens_per_s is not None and before.count >= config.min_samples:
        base, what = (
            before.tokens_per_s,
            "no control group: the canary's nodes on the previous version just before",
        )
    tps = canary.tokens_per_s.quantile(0.5) if canary.tokens_per_s is not None else math.nan
    if base is None or math.isnan(tps):
        return GateResult(name="tokens_per_s", outcome="pass", canary=_num(tps), detail="no control group")
    c_tps = base.quantile(0.5)
    slower = c_tps / tps if tps > 0 else math.inf
    return GateResult(
        name="tokens_per_s",
        outcome="fail" if slower > config.max_latency_ratio else "pass",
        canary=_num(tps),
        control=_num(c_tps),
        limit=config.max_latency_ratio,
        samples=canary.count,
        detail=f"median {tps:.3g} vs {c_tps:.3g} tokens/s, {slower:.2f}x slower "
        f"(limit {config.max_latency_ratio:g}; {what})",
    )


def quality_gate(
    config: RolloutConfig, scores: dict[str, QualityScore | None], missing: str = ""
) -> GateResult | None:
    """The ``quality`` gate (module docstring) over the canary nodes serving the version and
    their reported scores (None: not reported yet); None when ``min_quality`` is not set.
    ``missing``: the version's variants without a quality set (their nodes never report one),
    which fails the gate at once."""
    need = config.min_quality
    if need is None:
        return None
    if missing:
        return GateResult(
            name="quality",
            outcome="fail",
            limit=need,
            detail=f"the rollout requires a quality set; variant(s) {missing} have none "
            "(GenerationSpec.quality)",
        )
    have = {n: s for n, s in scores.items() if s is not None}
    if len(have) < len(scores) or not scores:
        return GateResult(
            name="quality",
            outcome="waiting",
            limit=need,
            samples=len(have),
            detail=f"waiting: quality set run on {len(have)}/{len(scores)} canary nodes",
        )
    total = sum(s.total for s in have.values())
    if total == 0:
        return GateResult(
            name="quality",
            outcome="fail",
            limit=need,
            detail="the version has no quality set (GenerationSpec.quality) but the rollout requires one",
        )
    passed = sum(s.passed for s in have.values())
    share = passed / total
    return GateResult(
        name="quality",
        outcome="fail" if share < need else "pass",
        canary=_num(share),
        limit=need,
        samples=total,
        detail=f"{passed} of {total} quality cases passed on {len(have)} canary nodes "
        f"({', '.join(f'{n} {s.passed}/{s.total}' for n, s in sorted(have.items()))})",
    )


def describe(result: GateResult) -> str:
    """One line naming the gate, its outcome and both figures, for events and summaries."""
    parts = [f"{result.name} {result.outcome}"]
    if result.canary is not None or result.control is not None:
        parts.append(f"canary {result.canary} vs control {result.control} (limit {result.limit})")
    if result.detail:
        parts.append(result.detail)
    return ": ".join(parts[:1]) + (": " + "; ".join(parts[1:]) if len(parts) > 1 else "")


def _accuracy_gate(
    config: RolloutConfig, canary: Metrics, controls: list[Metrics], canary_ref: ReferenceProfile | None
) -> GateResult:
    """See the module docstring (``accuracy``)."""
    need = config.min_feedback
    if canary.labelled < need:
        return GateResult(
            name="accuracy",
            outcome="pass",
            canary=_num(canary.accuracy),
            samples=canary.labelled,
            detail=f"canary has < {need} labelled answers (app feedback)",
        )
    control = next((c for c in controls if c.labelled >= need), None)
    if control is not None:
        c_acc, c_n, source = control.accuracy, control.labelled, "control feedback"
    elif canary_ref is not None and canary_ref.accuracy is not None and canary_ref.count > 0:
        c_acc, c_n, source = canary_ref.accuracy, canary_ref.count, "canary's held-out accuracy"
    else:
        return GateResult(
            name="accuracy",
            outcome="pass",
            canary=_num(canary.accuracy),
            samples=canary.labelled,
            detail="no control: no labelled control answers and no reference accuracy",
        )
    acc, n = canary.accuracy, canary.labelled
    drop = c_acc - acc
    se = math.sqrt(acc * (1 - acc) / n + c_acc * (1 - c_acc) / c_n)
    significant = drop > _Z_ONE_SIDED_1PCT * se
    return GateResult(
        name="accuracy",
        outcome="fail" if drop > config.max_accuracy_drop and significant else "pass",
        canary=_num(acc),
        control=_num(c_acc),
        limit=config.max_accuracy_drop,
        samples=n,
        detail=f"against {source} ({c_n} answers)",
    )


def verdict(results: list[GateResult]) -> Outcome:
    if any(r.outcome == "fail" for r in results):
        return "fail"
    if any(r.outcome == "waiting" for r in results):
        return "waiting"
    return "pass"
