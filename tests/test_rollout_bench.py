"""`slmops bench recalibration --quick` runs end to end and reports each shift with its baseline."""

from __future__ import annotations

import pytest

from slmops.bench import REQUIRED_KEYS, run_scenario


@pytest.mark.anyio
async def test_recalibration_bench_quick_reports_project_baseline_and_ratio() -> None:
    results = await run_scenario("recalibration", quick=True)
    assert [r["scenario"] for r in results][-1] == "recalibration/mean"
    assert len(results) == 4  # three shifts and their mean
    for r in results:
        assert all(k in r for k in REQUIRED_KEYS)
        assert 0 < r["baseline"] <= 1
        assert 0 < r["project"] <= 1
        assert r["ratio"] == pytest.approx(r["project"] / r["baseline"], rel=1e-3)
        assert r["units"] == "accuracy"
