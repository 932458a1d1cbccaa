"""Skew vs drift in the detector (issue 14): the first rounds of a model version are compared
with the manifest once (a ``skew`` event), drift is watched against a production baseline,
and a further shift while an event is open opens a new episode."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from slmops.bench._fleet import LEN_P, MODEL, SyntheticFleet, manifest_for
from slmops.cloud.config import DriftConfig
from slmops.cloud.drift import DriftDetector
from slmops.shared.messages import DriftEvent

NODES = 20
#: Quick calibrations (50k simulated windows): the test is about semantics, not the last digit.
CONFIG = DriftConfig(calibration_windows=50_000)
_LONG = np.array([0.0, 0.0, 0.0, 0.1, 0.4, 0.3, 0.2])


def _run(plan: list[dict[str, np.ndarray]], seed: int = 5) -> list[tuple[int, DriftEvent]]:
    """Feed ``plan`` (one dict of traffic per window, same for every node) through a detector."""
    fleet = SyntheticFleet("skew", NODES, seed)
    det = DriftDetector(CONFIG, clock=lambda: datetime.now(UTC))
    det.add_group(fleet.fleet, MODEL, manifest_for())
    out: list[tuple[int, DriftEvent]] = []
    for w, traffic in enumerate(plan, start=1):
        for i in range(NODES):
            out += [(w, e) for e in det.observe(fleet.aggregate(i, w, **traffic))]  # type: ignore[arg-type]
    return out


def _moved(mix: np.ndarray, frm: int, to: int, pts: float) -> np.ndarray:
    out = mix.copy()
    out[frm] -= pts
    out[to] += pts
    return out


def test_skewed_from_the_start_is_one_skew_event_and_no_drift() -> None:
    """Traffic longer than the manifest's from window 1: one skew event naming input_length,
    a baseline event, and no drift event in 40 windows."""
    long = 0.7 * LEN_P + 0.3 * _LONG
    events = _run([{"length": long}] * 40)
    kinds = [(e.kind, e.signal, e.state) for _, e in events]
    assert kinds[0] == ("baseline", "baseline", "opened"), kinds
    skews = [e for _, e in events if e.kind == "skew"]
    assert len(skews) == 1, kinds
    assert "input_length" in skews[0].differences
    assert skews[0].differences["input_length"] > 0.1
    assert "input length moved toward" in skews[0].summary
    assert skews[0].reference == "manifest"
    assert [e for _, e in events if e.kind == "drift"] == []


def test_a_later_change_opens_a_new_event_against_the_baseline() -> None:
    """Skewed from the start, then at window 21 the class mix moves by 10 points: a drift event
    opens against the automatic baseline (named, with its period), not the manifest."""
    fleet = SyntheticFleet("skew", NODES, 5)
    base = fleet.mix.mean(axis=0)
    plan = [{"length": 0.7 * LEN_P + 0.3 * _LONG}] * 20 + [
        {"length": 0.7 * LEN_P + 0.3 * _LONG, "prior": _moved(base, 0, 4, 0.10)}
    ] * 10
    events = _run(plan)
    drift = [(w, e) for w, e in events if e.kind == "drift" and e.state == "opened"]
    assert drift, [(e.kind, e.signal, e.state) for _, e in events]
    w, first = drift[0]
    assert 21 <= w <= 24
    assert first.signal == "class_prior"
    assert first.scope == "fleet"
    assert first.reference == "baseline:auto-1"
    assert first.reference_start is not None
    assert first.reference_end is not None
    assert "since the baseline:auto-1 of" in first.summary


def _episodes(second: np.ndarray) -> list[tuple[int, DriftEvent]]:
    fleet = SyntheticFleet("skew", NODES, 5)
    base = fleet.mix.mean(axis=0)
    first = _moved(base, 0, 4, 0.06)
    plan: list[dict[str, np.ndarray]] = [{}] * 10 + [{"prior": first}] * 10 + [{"prior": second}] * 10
    return [
        (w, e)
        for w, e in _run(plan)
        if e.kind == "drift" and e.signal == "class_prior" and e.scope == "fleet"
    ]


def test_a_further_shift_in_the_same_direction_opens_a_new_episode() -> None:
    fleet = SyntheticFleet("skew", NODES, 5)
    base = fleet.mix.mean(axis=0)
    events = _episodes(_moved(base, 0, 4, 0.16))
    opened = [(w, e) for w, e in events if e.state == "opened"]
    assert len(opened) == 2, [(w, e.id, e.state) for w, e in events]
    (w1, e1), (w2, e2) = opened
    assert 11 <= w1 <= 13
    assert 21 <= w2 <= 24
    assert e1.id != e2.id
    assert e2.supersedes == e1.id
    assert "same direction" in e2.summary


def test_a_shift_in_another_direction_opens_a_new_episode() -> None:
    fleet = SyntheticFleet("skew", NODES, 5)
    base = fleet.mix.mean(axis=0)
    events = _episodes(_moved(_moved(base, 0, 4, 0.06), 1, 2, 0.08))
    opened = [(w, e) for w, e in events if e.state == "opened"]
    assert len(opened) == 2, [(w, e.id, e.state) for w, e in events]
    assert opened[1][1].supersedes == opened[0][1].id
    assert "another direction" in opened[1][1].summary


def test_an_open_event_on_steady_shifted_traffic_opens_no_new_episode() -> None:
    fleet = SyntheticFleet("skew", NODES, 5)
    base = fleet.mix.mean(axis=0)
    events = _episodes(_moved(base, 0, 4, 0.06))
    assert [e.state for _, e in events if e.state == "opened"] == ["opened"], [e.id for _, e in events]


def test_drift_watch_fits_120_columns() -> None:
    """Every line ``drift watch`` prints for an event (long names, a long summary, a
    superseded episode) and its header fit 120 columns."""
    from slmops.cli_cloud import (
        _EVENT_HEADER,
        _EVENT_WIDTHS,
        WATCH_COLUMNS,
        _event_lines,
        _event_wide,
        _line,
    )
    from slmops.shared.messages import ModelRef

    now = datetime.now(UTC)
    e = DriftEvent(
        id="x" * 80,
        fleet="f" * 64,
        scope="node",
        node="n" * 64,
        model=ModelRef(name="m" * 64, version=12345, variant="int8-l3"),
        signal="oos_foreign_script",
        statistic="cusum_chi2_z",
        value=123.456,
        p_value=1e-12,
        effect_size=0.98765,
        window_start=now,
        window_end=now,
        state="opened",
        severity="critical",
        reference="baseline:analyst-12345",
        time=now,
        summary="class mix moved toward sports (+9 pts) and money (+6 pts) since the baseline " * 5,
        supersedes="y" * 90,
    )
    lines = [_line(_EVENT_HEADER, _EVENT_WIDTHS), *_event_lines(e)]
    assert len(lines) >= 3
    assert max(len(x) for x in lines) <= WATCH_COLUMNS, [len(x) for x in lines]
    # The long fields the table cuts are in --wide, whole.
    table = "\n".join(lines)
    wide = "\n".join(_event_wide(e))
    for whole in (e.fleet, e.node, e.model.name, e.id, e.supersedes, e.summary.strip()):
        assert whole is not None
        assert whole not in table
        assert whole in wide
    assert "int8-l3" in wide


def test_drift_watch_wide_and_json_flags() -> None:
    """``drift watch --help`` offers --wide and --json, and says the table fits 120 columns."""
    from click.testing import CliRunner

    from slmops.cli import main
    from slmops.cli_cloud import WATCH_COLUMNS

    out = CliRunner().invoke(main, ["drift", "watch", "--help"], terminal_width=120).output
    assert "--wide" in out
    assert "--json" in out
    assert "120 columns" in out
    assert max(len(x) for x in out.splitlines()) <= WATCH_COLUMNS


def test_a_new_version_inherits_the_input_side_baseline_and_builds_its_own_for_outputs() -> None:
    """v2 of the model on the same fleet starts with v1's baseline for input length (and the
    foreign-script share: inputs do not depend on the model), not for the class mix."""
    from slmops.shared.messages import ModelRef

    fleet = SyntheticFleet("skew", NODES, 5)
    det = DriftDetector(CONFIG, clock=lambda: datetime.now(UTC))
    det.add_group(fleet.fleet, MODEL, manifest_for())
    for w in range(1, 8):
        for i in range(NODES):
            det.observe(fleet.aggregate(i, w))
    v1 = det.groups[f"skew/{MODEL.name}/1/{MODEL.variant}"]
    assert v1.refs["input_length"].source == "baseline:auto-1"
    v2 = ModelRef(name=MODEL.name, version=2, variant=MODEL.variant)
    det.add_group(fleet.fleet, v2, manifest_for(v2))
    g2 = det.groups[f"skew/{MODEL.name}/2/{MODEL.variant}"]
    assert g2.refs["input_length"] == v1.refs["input_length"]
    assert "class_prior" not in g2.refs


def test_recalibration_never_acts_on_skew_alone() -> None:
    from slmops.cloud.recalibration.loop import is_label_shift
    from slmops.shared.messages import ModelRef

    now = datetime.now(UTC)
    base = DriftEvent(
        id="e", fleet="f", scope="fleet", model=ModelRef(name="m", version=1), signal="class_prior",
        statistic="s", value=1.0, effect_size=0.1, window_start=now, window_end=now, state="opened",
        time=now, estimated_priors={"a": 0.5, "b": 0.5},
    )  # fmt: skip
    import msgspec

    assert is_label_shift(base)
    assert not is_label_shift(msgspec.structs.replace(base, kind="skew"))
    assert not is_label_shift(msgspec.structs.replace(base, kind="baseline"))
