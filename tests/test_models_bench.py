"""`slmops bench refresh --quick` runs end to end and reports every figure with its baseline."""

from __future__ import annotations

import pytest

from slmops.bench import REQUIRED_KEYS
from slmops.bench.refresh import run


@pytest.mark.anyio
async def test_refresh_bench_quick_reports_project_baseline_and_ratio() -> None:
    results = await run(quick=True)
    assert [r["scenario"] for r in results] == [
        "refresh_int8_size",
        "refresh_int8_speed",
        "refresh_delivery",
        "refresh_online",
        "refresh_reconnect",
    ]
    for r in results:
        assert all(k in r for k in REQUIRED_KEYS), r
        project, baseline, ratio = r["project"], r["baseline"], r["ratio"]
        assert isinstance(project, int | float)
        assert isinstance(baseline, int | float)
        assert project > 0
        assert baseline > 0
        assert ratio == pytest.approx(project / baseline)
    size = results[0]
    assert isinstance(size["ratio"], float)
    assert size["ratio"] < 0.35
    assert isinstance(size["top1_agreement"], float)
    assert size["top1_agreement"] >= 0.99
    assert results[3]["nodes"] == results[4]["nodes"] == 5
