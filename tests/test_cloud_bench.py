"""`slmops bench drift|ingest --quick` run end to end and report figures beside baselines."""

from __future__ import annotations

import pytest

from slmops.bench import REQUIRED_KEYS, run_scenario

pytestmark = pytest.mark.anyio


async def test_drift_bench_quick_reports_every_scenario_beside_the_rules() -> None:
    results = await run_scenario("drift", quick=True)
    assert all(all(k in r for k in REQUIRED_KEYS) for r in results)
    by_name = {str(r["scenario"]): r for r in results}
    assert {"drift_false_events", "drift_prior_5pt_fleet", "drift_prior_estimate"} <= set(by_name)
    false_events = by_name["drift_false_events"]
    assert isinstance(false_events["project"], float)
    assert isinstance(false_events["baseline"], float)
    assert false_events["baseline"] > false_events["project"]  # PSI>=0.1 over-alarms
    assert {"chi2_p05", "adwin"} <= set(by_name["drift_prior_5pt_fleet"])


async def test_ingest_bench_quick_measures_project_and_bare_fetch_ack() -> None:
    (result,) = await run_scenario("ingest", quick=True)
    assert all(k in result for k in REQUIRED_KEYS)
    project, baseline = result["project"], result["baseline"]
    assert isinstance(project, float)
    assert isinstance(baseline, float)
    assert project > 0
    assert baseline > 0
    assert result["ratio"] == pytest.approx(project / baseline, rel=1e-2)
    batched = result["bare_fetch_batch_ack_all"]
    assert isinstance(batched, float)
    assert batched > 0
    assert result["ratio_to_bare_fetch_batch_ack_all"] == pytest.approx(project / batched, rel=1e-2)
