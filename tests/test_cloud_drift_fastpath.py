"""The detector's ingest fast paths compute exactly what the plain versions compute."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import numpy as np
import pytest
from _cloud_util import PRIOR, make_aggregate, make_manifest

from slmops.cloud.config import DriftConfig
from slmops.cloud.drift import DriftDetector, benjamini_hochberg, window_test
from slmops.cloud.drift.calibrate import Calibrator
from slmops.cloud.drift.stats import window_z, window_z_rows
from slmops.cloud.drift.units import Group, NodeUnit
from slmops.shared.messages import DriftEvent, ModelRef, TelemetryAggregate


def test_window_z_is_window_test_z_bit_for_bit() -> None:
    """Random windows, with and without DP noise, two-sided and one-sided, some cells negative:
    the hot path's ``z`` is the one ``window_test`` computes beside the effect (its own loop)."""
    rng = np.random.default_rng(3)
    for _ in range(2000):
        cells = int(rng.integers(2, 12))
        probs = rng.dirichlet(np.ones(cells)).tolist()
        counts = (rng.multinomial(int(rng.integers(0, 3000)), probs) + rng.integers(-2, 3, cells)).tolist()
        n_ref = float(rng.choice([0.0, 500.0, 1e6]))
        noise = float(rng.choice([0.0, 3.7]))
        upper = 0 if cells == 2 and rng.random() < 0.5 else None
        want, _ = window_test(counts, probs, n_ref, noise, upper_cell=upper)
        assert window_z(counts, probs, n_ref, noise, upper) == want
        assert window_test(counts, probs, n_ref, noise, upper_cell=upper, want_effect=False) == (want, 0.0)
    with pytest.raises(ValueError, match="2 counts against 3"):
        window_z([1, 2], [0.2, 0.3, 0.5], 10.0)


def test_window_z_rows_is_window_z_bit_for_bit() -> None:
    """Many windows at once (mixed cell counts, DP noise, negative cells, empty windows, both
    sidednesses) give exactly the doubles ``window_z`` gives one by one."""
    rng = np.random.default_rng(7)
    rows = []
    for _ in range(1500):
        cells = int(rng.choice([2, 5, 10]))
        probs = rng.dirichlet(np.ones(cells)).tolist()
        n = int(rng.choice([0, 3, 200, 5000]))
        counts = (rng.multinomial(n, probs) + rng.integers(-2, 3, cells)).tolist()
        rows.append((counts, probs, float(rng.choice([0.0, 500.0, 1e6])), float(rng.choice([0.0, 3.7]))))
    got = window_z_rows(*(list(col) for col in zip(*rows, strict=True)))
    assert got == [window_z(*r) for r in rows]
    two = [r for r in rows if len(r[0]) == 2]
    got = window_z_rows(*(list(col) for col in zip(*two, strict=True)), upper_cell=0)
    assert got == [window_z(*r, 0) for r in two]
    assert any(z < 0 for z in got)  # the one-sided flip happened
    with pytest.raises(ValueError, match="2 counts against 3"):
        window_z_rows([[1, 2]], [[0.2, 0.3, 0.5]], [10.0], [0.0])
    with pytest.raises(ValueError, match="row counts differ"):
        window_z_rows([[1, 2]], [], [10.0], [0.0])


def _bh_by_rank(p: list[float], q: float) -> list[bool]:
    """The textbook step-up procedure, rank by rank."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    k = max((r for r, i in enumerate(order, start=1) if p[i] <= q * r / m), default=0)
    return [i in set(order[:k]) for i in range(m)]


def test_benjamini_hochberg_matches_the_rank_by_rank_procedure_with_ties() -> None:
    rng = np.random.default_rng(5)
    for _ in range(500):
        m = int(rng.integers(1, 60))
        # Rounded to 2 decimals: many ties, some of them at the cut.
        p = np.round(rng.beta(0.3, 1.0, m), 2).tolist()
        q = float(rng.choice([0.01, 0.05, 0.1]))
        assert benjamini_hochberg(p, q) == _bh_by_rank(p, q)


def _detector() -> DriftDetector:
    t = datetime(2026, 1, 1, tzinfo=UTC)
    # One calibrator per detector (blocking, seeded): both runs compute the same calibrations.
    cal = Calibrator(allowance=DriftConfig().cusum_allowance, windows=20_000)
    det = DriftDetector(DriftConfig(), clock=lambda: t, calibrator=cal)
    det.add_group("f", ModelRef(name="kw", version=1), make_manifest())
    return det


def _replay(aggs: list[TelemetryAggregate], every: int) -> tuple[bytes, list[DriftEvent]]:
    """``aggs`` through a fresh detector, its state taken every ``every`` aggregates: the
    stored state (encoded) and the events."""
    det = _detector()
    events: list[DriftEvent] = []
    for k, agg in enumerate(aggs, start=1):
        events += det.observe(agg)
        if k % every == 0:
            det.take_dirty()
    det.take_dirty()
    return msgspec.msgpack.encode([list(det.groups.values()), sorted(det.units.items())]), events


def test_round_pooling_is_the_same_whenever_the_state_is_taken() -> None:
    """A round's pooled counts wait for ``take_dirty`` or the round's close: persisting after
    every aggregate or once at the end gives the same events and the same stored state."""
    rng = np.random.default_rng(11)
    sizes = rng.choice([150, 300, 600], size=12)
    aggs = [
        make_aggregate("f", f"n{i}", w, int(sizes[i]), rng, prior=[0.45, 0.3, 0.25] if w > 30 else PRIOR)
        for w in range(1, 45)
        for i in range(12)
        if (w + i) % 9  # some nodes skip some windows: rounds of different sizes
    ]
    runs = [_replay(aggs, every) for every in (1, len(aggs))]
    assert runs[0][1], "the shift opens events"
    assert runs[0] == runs[1]
    # The stored state holds the open round's pooled counts.
    groups_back, _ = msgspec.msgpack.decode(
        runs[0][0], type=tuple[list[Group], list[tuple[tuple[str, str], NodeUnit]]]
    )
    assert groups_back[0].round
    assert groups_back[0].round["class_prior"].windows == len(groups_back[0].round_nodes)


def test_node_tests_run_together_give_the_state_of_tests_run_one_by_one() -> None:
    """Node windows are tested in bulk (``window_z_rows`` from 32 windows of a signal on) at a
    round close or ``take_dirty``: 40 nodes persisted after every aggregate (one window per
    test run, ``window_z``) or every 64 or once at the end give the same state and events."""
    rng = np.random.default_rng(13)
    nodes = 40
    sizes = rng.choice([150, 300, 600], size=nodes)
    aggs = [
        make_aggregate("f", f"n{i}", w, int(sizes[i]), rng, prior=[0.45, 0.3, 0.25] if w > 30 else PRIOR)
        for w in range(1, 45)
        for i in range(nodes)
    ]
    runs = [_replay(aggs, every) for every in (1, 64, len(aggs))]
    assert runs[0][1], "the shift opens events"
    assert runs[0] == runs[1] == runs[2]
