"""Unit tests of the drift statistics: fast and seeded."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import numpy as np
import pytest
from _cloud_util import LABELS, PRIOR, make_aggregate, make_manifest

from slmops.cloud.config import DriftConfig
from slmops.cloud.drift import DriftDetector, benjamini_hochberg, calibrate, window_test
from slmops.cloud.drift.calibrate import simulate_z
from slmops.cloud.drift.labelshift import bbse_priors, confusion_matrix, em_priors, expected_accuracy
from slmops.cloud.drift.stats import geometric_noise_var, normalise
from slmops.cloud.ingest.dedupe import Admit, SeqTracker
from slmops.shared.messages import ModelRef, TelemetryAggregate


def _null_levels(probs: list[float], n: int, seed: int, length: int = 2000, streams: int = 300) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = simulate_z(np.asarray(probs), n, 20_000, 0.0, (length, streams), rng)
    s = np.zeros(streams)
    out = []
    for t in range(length):
        s = np.maximum(0.0, s + z[t] - 0.5)
        if t >= 50:
            out.append(s.copy())
    return np.concatenate(out)


@pytest.mark.parametrize(("probs", "n"), [([0.5, 0.3, 0.2], 100), ([0.1] * 10, 500)])
def test_calibrated_threshold_gives_at_most_the_target_rate_on_fresh_null_data(
    probs: list[float], n: int
) -> None:
    """On null data simulated with another seed, a null CUSUM stands above the calibrated
    threshold at between a quarter of and the target rate (conservative, not useless)."""
    cal = calibrate(probs, n, 20_000, windows=100_000, seed=1)
    levels = _null_levels(probs, n, seed=99)
    for target in (1e-2, 1e-3):
        rate = float((levels >= cal.threshold(target)).mean())
        assert target / 4 <= rate <= target * 1.15, (target, rate)


def test_window_test_null_includes_dp_noise() -> None:
    """With DP noise in the counts, the per-window z is ~N(0,1) only when the noise variance
    is part of the null: ignoring it makes 'significant' windows far more common."""
    rng = np.random.default_rng(3)
    probs = normalise([500.0, 300.0, 200.0], smoothing=0)
    noise_var = geometric_noise_var(1.0, 5.0)
    alpha = np.exp(-1.0 / 5.0)
    with_noise = without = 0
    trials = 4000
    for _ in range(trials):
        counts = rng.multinomial(200, probs).astype(float)
        counts += rng.geometric(1 - alpha, 3) - rng.geometric(1 - alpha, 3)
        z_with, _ = window_test(list(counts), probs, 1e9, noise_var * 1)
        z_without, _ = window_test(list(counts), probs, 1e9, 0.0)
        with_noise += z_with > 2.326
        without += z_without > 2.326
    assert with_noise / trials < 0.02
    assert without / trials > 2 * with_noise / trials


def test_benjamini_hochberg_rejects_the_step_up_set() -> None:
    """BH at q=0.05 over 10 p-values rejects exactly the largest k with p_(k) ≤ k q / m."""
    p = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216]
    assert benjamini_hochberg(p, 0.05) == [True, True] + [False] * 8
    assert benjamini_hochberg([0.01, 0.02, 0.03], 0.05) == [True, True, True]
    with pytest.raises(ValueError, match="q must be"):
        benjamini_hochberg(p, 0.0)


def _shifted_predictions(true_prior: list[float], n: int, seed: int) -> tuple[list[float], np.ndarray]:
    conf = make_manifest().reference.confusion  # type: ignore[union-attr]
    joint = confusion_matrix(LABELS, conf, None)
    cond = joint / joint.sum(axis=0, keepdims=True)
    q = cond @ np.asarray(true_prior)
    return list(np.random.default_rng(seed).multinomial(n, q).astype(float)), joint


@pytest.mark.parametrize("true_prior", [[0.3, 0.3, 0.4], [0.45, 0.35, 0.2], [0.1, 0.2, 0.7]])
def test_em_and_bbse_estimate_shifted_priors_within_l1_0_03(true_prior: list[float]) -> None:
    """From 20k predictions under a label shift, both estimators land within L1 0.03."""
    predicted, joint = _shifted_predictions(true_prior, 20_000, seed=5)
    for estimate in (em_priors(predicted, joint), bbse_priors(predicted, joint)):
        assert abs(sum(estimate) - 1) < 1e-9
        assert sum(abs(a - b) for a, b in zip(estimate, true_prior, strict=True)) < 0.03


def test_expected_accuracy_follows_the_change_in_confidence() -> None:
    assert expected_accuracy(0.80, 0.85, 0.90) == pytest.approx(0.85)
    assert expected_accuracy(0.7, None, None) == pytest.approx(0.7)
    assert expected_accuracy(None, 0.8, 0.9) is None


def test_seq_tracker_counts_each_seq_once_and_reports_holes() -> None:
    t = SeqTracker()
    assert [t.admit(s) for s in (1, 2, 2, 5, 4)] == [
        Admit.NEW,
        Admit.NEW,
        Admit.DUPLICATE,
        Admit.NEW,
        Admit.LATE,
    ]
    assert (t.contiguous, t.high, t.missing, t.missing_ranges()) == (2, 5, 1, [(3, 3)])
    assert t.admit(3) is Admit.LATE
    assert (t.contiguous, t.pending, t.missing) == (5, [], 0)
    assert t.admit(4) is Admit.DUPLICATE
    with pytest.raises(ValueError, match="seq must be an int >= 1"):
        t.admit(0)


def test_seq_tracker_bounds_pending_by_abandoning_the_oldest_hole() -> None:
    t = SeqTracker()
    t.admit(1)
    for s in range(3, 3 + 20):  # 2 never comes
        t.admit(s, max_pending=16)
    assert t.abandoned == 1
    assert t.missing == 0
    assert t.admit(2, max_pending=16) is Admit.DUPLICATE  # too late: indistinguishable


def _run_fleet(
    shift_at: int | None, windows: int, nodes: int = 20, seed: int = 0
) -> list[tuple[int, str, str | None, str]]:
    rng = np.random.default_rng(seed)
    det = DriftDetector(DriftConfig(calibration_windows=50_000), clock=lambda: datetime.now(UTC))
    model = ModelRef(name="kw", version=1)
    det.add_group("f", model, make_manifest())
    sizes = rng.choice([150, 300, 600], size=nodes)
    found: list[tuple[int, str, str | None, str]] = []
    for w in range(1, windows + 1):
        prior = [0.43, 0.3, 0.27] if shift_at is not None and w >= shift_at else PRIOR
        for i in range(nodes):
            for e in det.observe(make_aggregate("f", f"n{i}", w, int(sizes[i]), rng, prior=prior)):
                # The production baseline's announcement (issue 14) is not an alarm.
                if e.kind != "baseline":
                    found.append((w, e.signal, e.node, e.state))
    return found


def test_detector_stays_quiet_on_stationary_traffic() -> None:
    """20 nodes x 60 windows drawn from the reference: no drift or skew event (only the
    baseline's announcement, which _run_fleet leaves out)."""
    assert _run_fleet(None, 60) == []


def test_detector_opens_a_fleet_event_within_three_windows_of_a_7_point_shift() -> None:
    events = _run_fleet(20, 26)
    opened = [(w, s, n) for w, s, n, st in events if st == "opened"]
    assert opened, events
    w, signal, node = opened[0]
    assert (signal, node) == ("class_prior", None)
    assert 20 <= w <= 23


def test_accuracy_from_app_feedback_opens_an_event_only_when_it_falls() -> None:
    """Feedback (true -> predicted counts) is the accuracy signal, tested one-sided against
    the manifest's accuracy (0.9): a rise to 0.97 opens nothing, a fall to 0.75 opens."""
    rng = np.random.default_rng(8)
    det = DriftDetector(DriftConfig(calibration_windows=50_000), clock=lambda: datetime.now(UTC))
    det.add_group("f", ModelRef(name="kw", version=1), make_manifest())

    def with_feedback(agg: TelemetryAggregate, accuracy: float) -> TelemetryAggregate:
        right = int(rng.binomial(200, accuracy))
        feedback = {"alpha": {"alpha": right, "beta": 200 - right}}
        return msgspec.structs.replace(agg, feedback=feedback)

    opened = []
    for w in range(1, 41):
        accuracy = 0.97 if w <= 20 else 0.75
        for i in range(6):
            agg = with_feedback(make_aggregate("f", f"n{i}", w, 200, rng), accuracy)
            opened += [(w, e.signal, e.node) for e in det.observe(agg) if e.state == "opened"]
    accuracy_events = [(w, node) for w, signal, node in opened if signal == "accuracy"]
    assert accuracy_events, opened
    assert all(w > 20 for w, _ in accuracy_events)
    assert accuracy_events[0][1] is None  # the fleet-wide test sees it first
