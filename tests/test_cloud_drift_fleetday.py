"""False events per fleet-day (issue 14): the round's BH level is capped by a per-fleet-day
budget, and a node's baseline pools tested windows, not aggregates (sparse feedback made
node accuracy baselines of one window: 83% of the 2,424 false events per fleet-day that
``slmops bench drift`` measured at 10,000 nodes)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from slmops.bench._fleet import LABELS, MODEL, SyntheticFleet, manifest_for
from slmops.cloud.config import DriftConfig
from slmops.cloud.drift import DriftDetector
from slmops.cloud.drift.detector import round_level


def test_the_round_level_spreads_the_fleet_day_budget_over_the_day() -> None:
    cfg = DriftConfig()
    # 10,000 nodes, 1-minute windows: the per-node-window term alone was 0.5 (capped at 0.1).
    assert round_level(cfg, 10_000, 60.0) == pytest.approx(0.5 / 1440)
    # 2-second windows: 43,200 rounds a day share the same budget.
    assert round_level(cfg, 10_000, 2.0) == pytest.approx(0.5 / 43_200)
    # A 3-node fleet with hour-long windows: the per-node-window term is the smaller.
    assert round_level(cfg, 3, 3600.0) == pytest.approx(3 * 5e-5)
    assert round_level(cfg, 0, 3600.0) == pytest.approx(5e-5)
    with pytest.raises(ValueError, match="target_false_per_fleet_day"):
        DriftConfig(target_false_per_fleet_day=0)


def test_the_detector_uses_the_windows_length_of_the_round() -> None:
    fleet = SyntheticFleet("len", 2, 1)
    det = DriftDetector(DriftConfig(calibration_windows=20_000), clock=lambda: datetime.now(UTC))
    det.add_group(fleet.fleet, MODEL, manifest_for())
    for w in (1, 2, 3):
        for i in range(2):
            agg = fleet.aggregate(i, w)
            agg.window_end = agg.window_start + timedelta(seconds=2)
            det.observe(agg)
    (g,) = det.groups.values()
    assert g.window_s == 2.0
    # A window closed early (milliseconds long) counts as 1 s, not as 86,400,000 rounds a day.
    for i in range(2):
        agg = fleet.aggregate(i, 4)
        agg.window_end = agg.window_start + timedelta(milliseconds=5)
        det.observe(agg)
    assert g.window_s == 1.0


def test_a_node_baseline_of_sparse_feedback_pools_20_tested_windows() -> None:
    """One node, 10 feedback answers per aggregate: a tested accuracy window needs 100, so it
    pools 10 aggregates. The node's accuracy baseline exists only after 20 tested windows
    (200 aggregates) and holds ~2,000 answers (before: after the first tested window, ~100)."""
    fleet = SyntheticFleet("fb", 1, 3)
    det = DriftDetector(DriftConfig(calibration_windows=20_000), clock=lambda: datetime.now(UTC))
    det.add_group(fleet.fleet, MODEL, manifest_for())

    def send(w: int) -> None:
        agg = fleet.aggregate(0, w)
        agg.feedback = {LABELS[0]: {LABELS[0]: 9, LABELS[1]: 1}}
        det.observe(agg)

    unit = None
    for w in range(1, 191):
        send(w)
        unit = next(iter(det.units.values()))
        assert "accuracy" not in unit.refs, w
    for w in range(191, 211):
        send(w)
    assert unit is not None
    ref = unit.refs["accuracy"]
    assert ref.source == "node_baseline"
    assert 1900 <= ref.n_ref <= 2100


def test_the_fleet_day_bench_runs_every_signal_through_the_real_detector() -> None:
    """``slmops bench drift``'s fleet-day scenario, small (100 nodes, 30 counted windows):
    the figures it reports, every signal on (accuracy and the three out-of-scope shares)."""
    from slmops.bench.drift import _fleet_day

    day = _fleet_day(quick=True)
    assert day["scenario"] == "drift_false_events_per_fleet_day"
    assert day["nodes"] == 100
    assert day["windows_counted"] == 30
    assert day["node_windows"] == 3000
    signals = set(day["signals"])  # type: ignore[call-overload]
    assert {"accuracy", "oos_foreign_script", "oos_low_confidence", "oos_unknown_token"} <= signals
    assert isinstance(day["project"], float)
    assert isinstance(day["upper_95"], float)
    assert day["upper_95"] >= day["project"]
    assert day["upper_95"] >= 3.69 * 1440 / 30 - 0.1  # the bound is never below that of 0 events
