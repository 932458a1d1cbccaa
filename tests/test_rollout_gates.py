"""Cohorts and gates as plain functions: stable, growing cohorts; each gate judges only with
enough samples and fails on what it watches; config validation names the bad value."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from _models import EDGES
from slmops.cloud.rollout import Metrics, RolloutConfig, cohort, evaluate, hash_point, total_variation
from slmops.cloud.rollout.gates import GateResult, install_gate, verdict
from slmops.shared.histogram import Histogram
from slmops.shared.messages import ModelRef, Privacy, ReferenceProfile, TelemetryAggregate

NODES = [f"node{i}" for i in range(200)]


def test_cohort_is_stable_grows_and_has_the_asked_size() -> None:
    assert hash_point("f", "a") == hash_point("f", "a")
    assert 0 <= hash_point("f", "a") < 100
    c5 = cohort("f", NODES, 5)
    assert len(c5) == 10
    assert c5 == cohort("f", list(reversed(NODES)), 5)  # order of discovery does not matter
    c25 = cohort("f", NODES, 25, already=c5)
    assert c5 < c25
    assert len(c25) == 50
    assert cohort("f", NODES, 100) == set(NODES)
    assert len(cohort("f", NODES[:3], 5)) == 1  # at least one node
    assert cohort("other", NODES, 5) != c5  # fleets are hashed apart
    with pytest.raises(ValueError, match="percent"):
        cohort("f", NODES, 0)


def _agg(node: str, seq: int, *, n: int = 100, lat: float = 1.5, errors: int = 0,
         mix: dict[str, float] | None = None, conf: float = 0.85,
         acc: float | None = None) -> TelemetryAggregate:  # fmt: skip
    mix = mix or {"alpha": 0.4, "beta": 0.35, "gamma": 0.25}
    feedback = {"alpha": {"alpha": round(acc * n), "gamma": n - round(acc * n)}} if acc is not None else {}
    now = datetime.now(UTC)
    return TelemetryAggregate(
        fleet="f",
        node=node,
        model=ModelRef(name="m", version=1),
        seq=seq,
        window_start=now,
        window_end=now,
        count=n,
        errors=errors,
        class_counts={k: round(v * n) for k, v in mix.items()},
        confidence=Histogram.of(EDGES.confidence, [conf] * n),
        input_length=Histogram.of(EDGES.input_length, [5] * n),
        latency_ms=Histogram.of(EDGES.latency_ms, [lat] * n),
        privacy=Privacy(k=1),
        feedback=feedback,
    )


def _metrics(*aggs: TelemetryAggregate) -> Metrics:
    m = Metrics()
    for a in aggs:
        m.add(a)
    return m


CFG = RolloutConfig(min_samples=200)


def test_metrics_count_each_window_once() -> None:
    m = _metrics(_agg("a", 1), _agg("a", 1), _agg("a", 2))
    assert m.count == 200


def test_gates_wait_until_the_canary_has_enough_samples() -> None:
    results = evaluate(CFG, _metrics(_agg("a", 1)), [_metrics(_agg("b", 1), _agg("b", 2))],
                       canary_ref=None, control_ref=None)  # fmt: skip
    assert verdict(results) == "waiting"


@pytest.mark.parametrize(
    ("canary", "gate"),
    [
        ({"lat": 15.0}, "latency_p95"),
        ({"errors": 10}, "error_rate"),
        ({"mix": {"alpha": 1.0}}, "drift"),
        ({"conf": 0.55}, "confidence"),
        ({"acc": 0.7}, "accuracy"),
    ],
)
def test_each_gate_fails_on_what_it_watches(canary: dict[str, object], gate: str) -> None:
    control = _metrics(*(_agg("b", i, acc=0.9) for i in range(1, 4)))
    good = evaluate(CFG, _metrics(_agg("a", 1, acc=0.9), _agg("a", 2, acc=0.9)), [control],
                    canary_ref=None, control_ref=None)  # fmt: skip
    assert verdict(good) == "pass"
    canary = {"acc": 0.9, **canary}
    bad = _metrics(_agg("a", 1, **canary), _agg("a", 2, **canary))  # type: ignore[arg-type]
    results = {r.name: r.outcome for r in evaluate(CFG, bad, [control], canary_ref=None, control_ref=None)}
    assert results[gate] == "fail", results
    assert [k for k, v in results.items() if v == "fail"] == [gate]


def test_drift_is_judged_against_each_versions_own_reference() -> None:
    """A recalibrated version predicts a new class mix on purpose: compared with its own
    reference (which holds the new priors) it passes; a version stuck on one class fails."""
    hist = Histogram.of(EDGES.confidence, [0.85] * 10)
    ref_old = ReferenceProfile(count=100, class_counts={"alpha": 40, "beta": 35, "gamma": 25},
                               confidence=hist, input_length=hist)  # fmt: skip
    ref_new = ReferenceProfile(count=100, class_counts={"alpha": 80, "beta": 10, "gamma": 10},
                               confidence=hist, input_length=hist)  # fmt: skip
    control = _metrics(*(_agg("b", i) for i in range(1, 4)))
    shifted = {"alpha": 0.8, "beta": 0.1, "gamma": 0.1}
    recal = _metrics(_agg("a", 1, mix=shifted), _agg("a", 2, mix=shifted))
    out = {r.name: r for r in evaluate(CFG, recal, [control], canary_ref=ref_new, control_ref=ref_old)}
    assert out["drift"].outcome == "pass"
    stuck = _metrics(_agg("a", 1, mix={"beta": 1.0}), _agg("a", 2, mix={"beta": 1.0}))
    out = {r.name: r for r in evaluate(CFG, stuck, [control], canary_ref=ref_new, control_ref=ref_old)}
    assert out["drift"].outcome == "fail"
    assert total_variation({"a": 1}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.5)


def test_install_gate_counts_failed_nodes_against_the_limit() -> None:
    cfg = RolloutConfig(max_failures=0.1)
    assert install_gate(cfg, 20, 2).outcome == "pass"
    assert install_gate(cfg, 20, 3).outcome == "fail"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stages": [5, 25]}, "last stage must be 100"),
        ({"stages": [25, 5, 100]}, "increase strictly"),
        ({"max_failures": 1.5}, "max_failures"),
        ({"min_samples": 0}, "min_samples"),
        ({"max_latency_ratio": 0}, "max_latency_ratio"),
        ({"max_accuracy_drop": 0}, "max_accuracy_drop"),
        ({"min_feedback": 0}, "min_feedback"),
    ],
)
def test_config_refuses_bad_values_naming_them(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RolloutConfig(**kwargs)  # type: ignore[arg-type]


def test_chance_at_the_minimum_sample_count_does_not_fail_a_good_version() -> None:
    """5 errors in 200 against a 1% control is within chance (not significant); a 12-class
    sample of 200 that is 0.12 from its own source by chance is within the drift limit."""
    control = _metrics(*(_agg("b", i, errors=1) for i in range(1, 41)))  # 1% of 4000
    canary = _metrics(_agg("a", 1, errors=3), _agg("a", 2, errors=2))
    out = {r.name: r for r in evaluate(CFG, canary, [control], canary_ref=None, control_ref=None)}
    assert out["error_rate"].canary == pytest.approx(0.025)
    assert out["error_rate"].outcome == "pass"
    worse = _metrics(_agg("a", 1, errors=12), _agg("a", 2, errors=12))  # 12%: significant
    out = {r.name: r for r in evaluate(CFG, worse, [control], canary_ref=None, control_ref=None)}
    assert out["error_rate"].outcome == "fail"
    labels = [f"c{i}" for i in range(12)]
    source = dict.fromkeys(labels, 1 / 12)
    rng = np.random.default_rng(0)
    counts = rng.multinomial(200, [1 / 12] * 12)
    sample = Metrics()
    sample.class_counts = {label: int(c) for label, c in zip(labels, counts, strict=True)}
    assert total_variation(sample.class_counts, source) > 0.08
    hist = Histogram.of(EDGES.confidence, [0.85] * 10)
    ref = ReferenceProfile(
        count=1200, class_counts=dict.fromkeys(labels, 100), confidence=hist, input_length=hist
    )
    sample.count = 200
    out = {r.name: r for r in evaluate(CFG, sample, [], canary_ref=ref, control_ref=None)}
    assert out["drift"].outcome == "pass"
    assert (out["drift"].canary or 0) < 0.05


def test_latency_below_the_floor_never_fails_the_ratio() -> None:
    """0.2 ms → 0.9 ms is 4.5x, but sub-floor: noise-level figures do not roll a version back."""
    control = _metrics(*(_agg("b", i, lat=0.15) for i in range(1, 4)))
    canary = _metrics(_agg("a", 1, lat=0.9), _agg("a", 2, lat=0.9))
    out = {r.name: r for r in evaluate(CFG, canary, [control], canary_ref=None, control_ref=None)}
    assert (out["latency_p95"].canary or 0) / (out["latency_p95"].control or 1) > 1.5
    assert out["latency_p95"].outcome == "pass"
    strict = RolloutConfig(min_samples=200, latency_floor_ms=0.0)
    out = {r.name: r for r in evaluate(strict, canary, [control], canary_ref=None, control_ref=None)}
    assert out["latency_p95"].outcome == "fail"


def test_accuracy_gate_needs_labelled_answers_a_real_drop_and_falls_back_to_held_out() -> None:
    """Feedback accuracy: no or too little feedback passes saying so; a small or chance-level
    drop passes; 0.90 -> 0.70 on 200 labelled answers fails; without control feedback the
    canary's held-out accuracy is the control; negative (DP-noised) cells are not counted."""
    control = _metrics(*(_agg("b", i, acc=0.9) for i in range(1, 11)))
    cfg = RolloutConfig(min_samples=200, min_feedback=100)

    def gate(canary: Metrics, controls: list[Metrics], ref: ReferenceProfile | None = None) -> GateResult:
        results = evaluate(cfg, canary, controls, canary_ref=ref, control_ref=None)
        return next(r for r in results if r.name == "accuracy")

    none = gate(_metrics(_agg("a", 1), _agg("a", 2)), [control])
    assert (none.outcome, none.samples) == ("pass", 0)
    assert "labelled" in none.detail
    small = gate(_metrics(_agg("a", 1, acc=0.87), _agg("a", 2, acc=0.87)), [control])
    assert small.outcome == "pass"
    worse = gate(_metrics(_agg("a", 1, acc=0.7), _agg("a", 2, acc=0.7)), [control])
    assert worse.outcome == "fail"
    assert (worse.canary, worse.control, worse.samples) == (0.7, 0.9, 200)
    # 0.84 against 0.90 on 200 answers: over the 0.05 limit, but within chance (z ~ 2.0 < 2.33).
    chance = gate(_metrics(_agg("a", 1, acc=0.84), _agg("a", 2, acc=0.84)), [control])
    assert chance.outcome == "pass"
    hist = Histogram.of(EDGES.confidence, [0.85] * 10)
    ref = ReferenceProfile(
        count=400, class_counts={"alpha": 1}, confidence=hist, input_length=hist, accuracy=0.9
    )
    held_out = gate(_metrics(_agg("a", 1, acc=0.7), _agg("a", 2, acc=0.7)), [], ref)
    assert held_out.outcome == "fail"
    assert "held-out" in held_out.detail
    alone = gate(_metrics(_agg("a", 1, acc=0.7), _agg("a", 2, acc=0.7)), [])
    assert (alone.outcome, alone.detail.startswith("no control")) == ("pass", True)
    noisy = _agg("a", 3, acc=0.9)
    noisy.feedback["beta"] = {"beta": -2, "alpha": -1}
    m = _metrics(noisy)
    assert (m.right, m.wrong) == (90, 10)
